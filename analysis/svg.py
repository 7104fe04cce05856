"""Inline SVG charts for the static report pages: histograms, scatter plots and line charts.

Every chart is one `<svg>` string with its data drawn in (no script, no fetch), `<title>` elements
as hover text, and classes (`bar`, `point`, `frontier`, `curve`) that the pages' CSS colours and
tests find.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field

from trainer.plots import color, log_range, log_ticks

def ticks(lo: float, hi: float, n: int = 6) -> list[float]:
    """About n round tick values in [lo, hi]."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 5, 10) if step * m >= raw)
    first = math.ceil(lo / step) * step
    return [round(first + i * step, 10) for i in range(int((hi - first) / step + 1e-9) + 1)]


def tick_label(v: float) -> str:
    """A short tick label: 400k, 1.2M, 0.25."""
    if abs(v) >= 1e6:
        return f"{v / 1e6:.4g}M"
    if abs(v) >= 1e4:
        return f"{v / 1e3:.4g}k"
    return f"{v:.4g}"


@dataclass
class Axes:
    """A plot area: data ranges mapped to pixels, linear or log10 on x."""

    x_range: tuple[float, float]
    y_range: tuple[float, float]
    width: int = 520
    height: int = 300
    log_x: bool = False
    margins: tuple[int, int, int, int] = (56, 12, 12, 38)
    """left, right, top, bottom."""

    def sx(self, v: float) -> float:
        ml, mr, _, _ = self.margins
        lo, hi = self.x_range
        if self.log_x:  # values <= 0 (a dead SAE's L0) sit on the axis
            v, lo, hi = math.log10(max(v, lo)), math.log10(lo), math.log10(hi)
        return ml + (v - lo) / ((hi - lo) or 1) * (self.width - ml - mr)

    def sy(self, v: float) -> float:
        _, _, mt, mb = self.margins
        lo, hi = self.y_range
        ph = self.height - mt - mb
        return mt + ph - (v - lo) / ((hi - lo) or 1) * ph

    def frame(self, xlabel: str, ylabel: str) -> str:
        """Axis lines, tick labels and axis labels."""
        ml, mr, mt, mb = self.margins
        x0, x1, y0, y1 = ml, self.width - mr, mt, self.height - mb
        parts = [f'<line class="axis" x1="{x0}" y1="{y1}" x2="{x1}" y2="{y1}"/>'
                 f'<line class="axis" x1="{x0}" y1="{y0}" x2="{x0}" y2="{y1}"/>']
        xt = log_ticks(*self.x_range) if self.log_x else ticks(*self.x_range)
        for v in xt:
            parts.append(f'<text class="tick" x="{self.sx(v):.1f}" y="{y1 + 13}" text-anchor="middle">'
                         f'{tick_label(v)}</text>')
        for v in ticks(*self.y_range, n=5):
            parts.append(f'<line class="grid" x1="{x0}" y1="{self.sy(v):.1f}" x2="{x1}" y2="{self.sy(v):.1f}"/>'
                         f'<text class="tick" x="{x0 - 4}" y="{self.sy(v) + 3:.1f}" text-anchor="end">{tick_label(v)}</text>')
        parts.append(f'<text class="label" x="{(x0 + x1) / 2:.0f}" y="{self.height - 4}" text-anchor="middle">'
                     f'{html.escape(xlabel)}</text><text class="label" x="12" y="{(y0 + y1) / 2:.0f}" '
                     f'text-anchor="middle" transform="rotate(-90 12 {(y0 + y1) / 2:.0f})">{html.escape(ylabel)}</text>')
        return "".join(parts)


def _open(elem_id: str, cls: str, width: int, height: int) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" class="{cls}"' + (f' id="{elem_id}"' if elem_id else "")
            + f' width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">')


def svg_bars(counts: list[float], edges: list[float], xlabel: str, ylabel: str = "count", elem_id: str = "",
             cls: str = "chart", width: int = 520, height: int = 180, note: str = "", signed: bool = False) -> str:
    """An inline SVG histogram: bar i spans edges[i]..edges[i+1] with height counts[i]; `signed`
    gives bars left of 0 the class `neg` (coloured apart)."""
    ax = Axes((edges[0], edges[-1]), (0, max(max(counts, default=0), 1)), width, height, margins=(48, 10, 10, 34))
    parts = [_open(elem_id, cls, width, height)]
    for c, a, b in zip(counts, edges[:-1], edges[1:]):
        if c > 0:
            x0, x1 = ax.sx(a), ax.sx(b)
            neg = " neg" if signed and b <= 0 else ""
            parts.append(f'<rect class="bar{neg}" x="{x0:.1f}" y="{ax.sy(c):.1f}" width="{max(x1 - x0 - 0.5, 0.8):.1f}" '
                         f'height="{ax.sy(0) - ax.sy(c):.1f}"><title>{a:.3g} to {b:.3g}: {c:g}</title></rect>')
    ml, _, mt, mb = ax.margins
    ph, pw = height - mt - mb, width - ml - ax.margins[1]
    top = ax.y_range[1]
    parts.append(f'<line class="axis" x1="{ml}" y1="{mt + ph}" x2="{ml + pw}" y2="{mt + ph}"/>'
                 f'<line class="axis" x1="{ml}" y1="{mt}" x2="{ml}" y2="{mt + ph}"/>')
    for v in ticks(*ax.x_range):
        parts.append(f'<text class="tick" x="{ax.sx(v):.1f}" y="{mt + ph + 13}" text-anchor="middle">{v:g}</text>')
    parts.append(f'<text class="tick" x="{ml - 4}" y="{mt + 8}" text-anchor="end">{top:g}</text>'
                 f'<text class="tick" x="{ml - 4}" y="{mt + ph}" text-anchor="end">0</text>'
                 f'<text class="label" x="{ml + pw / 2:.0f}" y="{height - 4}" text-anchor="middle">'
                 f'{html.escape(xlabel)}</text>'
                 f'<text class="label" x="12" y="{mt + ph / 2:.0f}" text-anchor="middle" '
                 f'transform="rotate(-90 12 {mt + ph / 2:.0f})">{html.escape(ylabel)}</text>')
    if note:
        parts.append(f'<text class="note" x="{ml + pw}" y="{mt + 10}" text-anchor="end">{html.escape(note)}</text>')
    return "".join(parts) + "</svg>"


def _padded(lo: float, hi: float, log: bool = False) -> tuple[float, float]:
    """A data range with a margin, so points do not sit on the axes."""
    if log:
        return log_range(lo, hi)
    pad = (hi - lo) * 0.06 or abs(hi) * 0.1 or 1.0
    return lo - pad, hi + pad


@dataclass
class Point:
    """One run in a scatter plot."""

    x: float
    y: float
    group: str
    """The legend entry (colour)."""
    label: str
    """Hover text's first line, and the `data-run` attribute."""
    on_frontier: bool = False


def svg_scatter(points: list[Point], xlabel: str, ylabel: str, elem_id: str, log_x: bool = True,
                width: int = 560, height: int = 340, colors: dict[str, str] | None = None) -> str:
    """Points coloured by group (`colors`, else by the group's order; legend on the right); the
    frontier points joined by a line."""
    groups = list(dict.fromkeys(p.group for p in points))
    colors = {g: (colors or {}).get(g) or color(i) for i, g in enumerate(groups)}
    legend_w = 16 + 7 * max((len(g) for g in groups), default=0)
    ax = Axes(_padded(min(p.x for p in points), max(p.x for p in points), log_x),
              _padded(min(p.y for p in points), max(p.y for p in points)), width, height, log_x,
              margins=(56, 12 + legend_w, 12, 38))
    parts = [_open(elem_id, "chart scatter", width, height), ax.frame(xlabel, ylabel)]
    front = sorted((p for p in points if p.on_frontier), key=lambda p: p.x)
    if len(front) > 1:
        pts = " ".join(f"{ax.sx(p.x):.1f},{ax.sy(p.y):.1f}" for p in front)
        parts.append(f'<polyline class="frontier" points="{pts}"><title>frontier: no run has a lower {xlabel} '
                     f'and a higher {ylabel}</title></polyline>')
    for p in points:
        c = colors[p.group]
        parts.append(f'<circle class="point{" on-frontier" if p.on_frontier else ""}" data-run="{html.escape(p.label)}" '
                     f'cx="{ax.sx(p.x):.1f}" cy="{ax.sy(p.y):.1f}" r="{5 if p.on_frontier else 4}" fill="{c}">'
                     f'<title>{html.escape(p.label)} ({html.escape(p.group)})&#10;{html.escape(xlabel)} {p.x:.4g}&#10;'
                     f'{html.escape(ylabel)} {p.y:.4g}</title></circle>')
    lx = width - legend_w
    for i, g in enumerate(groups):
        parts.append(f'<circle cx="{lx + 4}" cy="{20 + 16 * i}" r="4" fill="{colors[g]}"/>'
                     f'<text class="legend" x="{lx + 12}" y="{24 + 16 * i}">{html.escape(g)}</text>')
    return "".join(parts) + "</svg>"


@dataclass
class Series:
    """One run's curve: y against x, None where it has no value."""

    name: str
    xs: list[float] = field(default_factory=list)
    ys: list[float | None] = field(default_factory=list)


def svg_lines(series: list[Series], xlabel: str, ylabel: str, elem_id: str, width: int = 380,
              height: int = 240) -> str:
    """One polyline per series (class `curve`, `data-run` its name), in `color(i)` of its index; a
    point logged alone (one log step, or between gaps) is a dot, as a polyline of one point draws
    nothing."""
    vals = [(x, y) for s in series for x, y in zip(s.xs, s.ys) if y is not None and math.isfinite(y)]
    parts = [_open(elem_id, "chart lines", width, height)]
    if not vals:
        return "".join(parts) + f'<text class="note" x="{width / 2}" y="{height / 2}" text-anchor="middle">' \
                                f'no {html.escape(ylabel)} logged</text></svg>'
    xs, ys = [v[0] for v in vals], [v[1] for v in vals]
    ax = Axes((min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1), _padded(min(ys), max(ys)), width, height)
    parts.append(ax.frame(xlabel, ylabel))
    for i, s in enumerate(series):
        segments, cur = [], []
        for x, y in zip(s.xs, s.ys):
            if y is None or not math.isfinite(y):  # a gap (not logged at that step, or NaN)
                segments, cur = segments + ([cur] if cur else []), []
            else:
                cur.append(f"{ax.sx(x):.1f},{ax.sy(y):.1f}")
        segments += [cur] if cur else []
        for seg in segments:
            if len(seg) == 1:
                x, y = seg[0].split(",")
                parts.append(f'<circle class="curve dot" data-run="{html.escape(s.name)}" fill="{color(i)}" '
                             f'cx="{x}" cy="{y}" r="3"><title>{html.escape(s.name)}</title></circle>')
            else:
                parts.append(f'<polyline class="curve" data-run="{html.escape(s.name)}" stroke="{color(i)}" '
                             f'points="{" ".join(seg)}"><title>{html.escape(s.name)}</title></polyline>')
    return "".join(parts) + "</svg>"
