"""A run's training curves and a sweep's Pareto plot, drawn with matplotlib (for users without W&B),
and the colours and log-axis ticks the sweep's HTML page (analysis/svg.py) draws with too.

`training_curves.png` goes in the run's folder at the end of `pipeline train` and of each run of a
sweep, from `metrics.jsonl`: `pipeline train` logs one line per log step whose values are per-run
lists (a stack of one run); a sweep writes each run's own line with plain numbers. Both read the
same way here. `pareto.png` goes in the sweep's folder: explained variance against L0, one colour
per architecture, the same colour as on the sweep's page.
"""

from __future__ import annotations

import json
import math
import warnings
import zlib
from pathlib import Path

CURVES_PNG = "training_curves.png"
PARETO_PNG = "pareto.png"
# (panel title, metrics drawn in it): training metrics, and eval-split ones where they were logged.
PANELS = (("loss", ("loss",)), ("L0", ("l0", "eval_l0")),
          ("explained variance", ("explained_variance", "eval_explained_variance")))
# matplotlib's tab10: distinguishable colours for architectures and runs.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")
# The built-in architectures, each with its own colour in every plot and page, whichever runs a sweep has.
ARCHS = ("topk", "batchtopk", "matryoshka", "standard", "gated", "jumprelu", "transcoder", "topk_transcoder",
         "jumprelu_transcoder")


def color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def arch_color(arch: str) -> str:
    """The colour of an architecture: fixed for the built-ins, from its name for one registered
    elsewhere (the same in every process, unlike the order archs happen to come in)."""
    return color(ARCHS.index(arch) if arch in ARCHS else zlib.crc32(arch.encode()))


def log_ticks(lo: float, hi: float) -> list[float]:
    """Round values in [lo, hi] (lo > 0) for a log axis: 1, 2, 5 x 10^k; only powers of ten when the
    range spans 3 decades or more; 1..9 x 10^k when 1, 2, 5 give fewer than three (a range of about
    a decade or less, where they are far enough apart)."""
    if lo <= 0 or hi <= lo:
        return [lo]
    spans = math.log10(hi / lo)
    out: list[float] = []
    for mults, enough in (((1,), 1),) if spans >= 3 else (((1, 2, 5), 3), (tuple(range(1, 10)), 2)):
        out = [m * 10.0 ** e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
               for m in mults]
        out = [v for v in out if lo * (1 - 1e-9) <= v <= hi * (1 + 1e-9)]
        if len(out) >= enough:
            return out
    return out if len(out) >= 2 else [lo, hi]


def log_range(lo: float, hi: float) -> tuple[float, float]:
    """A log axis's range for data in [lo, hi], with a margin so points do not sit on the axes."""
    lo, hi = max(lo, 1e-12), max(hi, 1e-12)
    return (lo / 1.25, hi * 1.25) if hi > lo else (lo / 2, hi * 2)


def read_curves(path: str | Path) -> dict[str, list[float | None]]:
    """metrics.jsonl as columns: `tokens` and every numeric metric, None where a line lacks it (or it
    is NaN). A missing or empty file gives {}."""
    path = Path(path)
    if not path.is_file():
        return {}
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    cols: dict[str, list[float | None]] = {}
    for i, line in enumerate(lines):
        for key, value in line.items():
            if isinstance(value, list):  # `pipeline train`: a stack of one run
                value = value[0] if len(value) == 1 else None
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            cols.setdefault(key, [None] * i)
            cols[key].append(None if isinstance(value, float) and not math.isfinite(value) else float(value))
        for col in cols.values():
            if len(col) == i:
                col.append(None)
    return cols if "tokens" in cols else {}


def draw_training_curves(cols: dict[str, list[float | None]], title: str):
    """The figure of training_curves.png: loss, L0 and explained variance against tokens. A curve of
    one logged point is drawn as a marker (a line through one point draws nothing)."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display, the Agg canvas

    fig = Figure(figsize=(12, 3.4), dpi=100, layout="constrained")
    for ax, (panel, keys) in zip(fig.subplots(1, len(PANELS)), PANELS):
        for key in keys:
            pts = [(t, v) for t, v in zip(cols["tokens"], cols.get(key, [])) if t is not None and v is not None]
            if pts:
                marked = key.startswith("eval_") or len(pts) == 1
                ax.plot(*zip(*pts), marker="o" if marked else None, markersize=3 if len(pts) > 1 else 6,
                        label=key.replace("_", " "))
        ax.set_title(panel)
        ax.set_xlabel("tokens")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    return fig


def write_training_curves(run_dir: str | Path) -> Path | None:
    """RUN/training_curves.png from RUN/metrics.jsonl; None when nothing was logged. Drawing never
    fails a finished run: a problem is a warning."""
    run_dir = Path(run_dir)
    try:
        cols = read_curves(run_dir / "metrics.jsonl")
        if not cols:
            return None
        draw_training_curves(cols, run_dir.name).savefig(run_dir / CURVES_PNG, dpi=100)
        return run_dir / CURVES_PNG
    except Exception as e:  # noqa: BLE001 - the run is exported already; a plot is not worth losing it
        warnings.warn(f"could not draw {run_dir / CURVES_PNG}: {e}")
        return None


def draw_pareto(rows: list[dict]):
    """The figure of pareto.png: explained variance against L0 (log axis) of the rows that have both,
    one colour per architecture (arch_color), its runs joined in L0 order. The L0 ticks are round
    numbers written plainly (matplotlib's own label a narrow log range at every 10^k multiple, as
    2x10^1 3x10^1 4x10^1..., run together)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

    fig = Figure(figsize=(7.5, 4.5), dpi=120, layout="tight")
    ax = fig.subplots()
    ok = [r for r in rows if r.get("l0") is not None and r.get("explained_variance") is not None]
    for arch in sorted({r["arch"] for r in ok}):
        pts = sorted((r for r in ok if r["arch"] == arch), key=lambda r: r["l0"])
        # Joined: an architecture's frontier reads as one curve (a target_l0 sweep: all at the same L0s).
        ax.plot([r["l0"] for r in pts], [r["explained_variance"] for r in pts], marker="o", color=arch_color(arch),
                label=arch)
    ax.set_xscale("log")
    if ok:
        lo, hi = log_range(min(r["l0"] for r in ok), max(r["l0"] for r in ok))
        ax.set_xlim(lo, hi)
        ax.xaxis.set_major_locator(FixedLocator(log_ticks(lo, hi)))
        ax.xaxis.set_major_formatter(lambda v, _: f"{v:.4g}")
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.legend(title="architecture", loc="upper left", bbox_to_anchor=(1.02, 1))  # outside: it hides no point
    ax.set_xlabel("L0 (eval split)")
    ax.set_ylabel("explained variance (eval split)")
    ax.grid(alpha=0.3)
    ax.set_title("Sparsity / reconstruction frontier")
    return fig


def write_pareto(rows: list[dict], out: str | Path) -> Path:
    """OUT/pareto.png (draw_pareto)."""
    path = Path(out) / PARETO_PNG
    draw_pareto(rows).savefig(path, dpi=120)
    return path
