"""`pipeline report SWEEP_DIR`: one static page for a whole sweep (a folder with summary.csv).

Which run is best at each L0: the runs table (sortable, every column of summary.csv), explained
variance against L0 and CE loss recovered against L0 with each frontier drawn (the runs no other run
beats on both), every run's loss, L0 and explained-variance curves from its metrics.jsonl, and a
link to each run's feature report (`pipeline report RUN`), written here with `features`.

CE loss recovered comes from summary.csv where the sweep ran with `--eval`, else from `ce_contexts`
eval contexts per run (`analysis.evaluate_ce`, the model loaded once; added to summary.csv as `--eval`
adds them, so the next page has them), else the page says how to get it. Same rules as the feature report:
one self-contained file (inline CSS, SVG and a few lines of
JS), no server, no network; ids `#runs-table`, `#pareto-ev`, `#pareto-ce`, `#curves-loss`,
`#curves-l0`, `#curves-ev`, `#curve-legend`.
"""

from __future__ import annotations

import csv
import html
import json
import math
import os
import shlex
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from analysis.svg import Point, Series, color, svg_lines, svg_scatter
from trainer.plots import CURVES_PNG, arch_color, read_curves

FEATURES_DIR = "report"
"""A run's feature report goes to RUN/report/index.html."""


@dataclass
class SweepReportConfig:
    """Everything `pipeline report SWEEP_DIR` takes."""

    sweep: str
    """A `pipeline sweep` output folder: summary.csv and one folder per run."""
    out: str | None = None
    """Directory for index.html (default: the sweep folder itself)."""
    features: bool = False
    """Also write each finished run's feature report (RUN/report/index.html) and link it."""
    cache: str | None = None
    """Cache for feature reports and CE (default: the cache each run was trained on)."""
    ce_contexts: int = 0
    """CE loss recovered on this many eval contexts for runs whose summary lacks it (0: only summary.csv's)."""
    device: str = "auto"
    """auto, cpu, cuda, ..."""


def is_sweep_dir(path: str | Path) -> bool:
    return (Path(path) / "summary.csv").is_file()


def _number(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        try:
            value = float(text)
            return value if math.isfinite(value) else None
        except ValueError:
            return text or None


def read_summary(sweep: Path) -> list[dict]:
    """summary.csv's rows, numbers as numbers, empty cells as None."""
    with open(sweep / "summary.csv", newline="") as f:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]


def write_summary_csv(sweep: Path, rows: list[dict]) -> None:
    """summary.csv again, with the CE columns `pipeline sweep --eval` adds (written atomically)."""
    from trainer.sweep import EVAL_COLUMNS

    columns = list(rows[0]) + [c for c in EVAL_COLUMNS if c not in rows[0] and any(c in r for r in rows)]
    tmp = sweep / "summary.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c) for c in columns})
    tmp.replace(sweep / "summary.csv")


def run_cache(sweep: Path, run: str) -> str | None:
    """The cache a run was trained on, from its cfg.json."""
    cfg = sweep / run / "cfg.json"
    if not cfg.is_file():
        return None
    return ((json.loads(cfg.read_text()).get("metadata") or {}).get("training_config") or {}).get("cache")


def frontier(points: list[tuple[float, float]]) -> list[bool]:
    """For each (x, y): whether no other point has x <= and y >= with one of them strict (lower L0
    and higher score is better)."""
    return [not any((x2 <= x and y2 >= y) and (x2 < x or y2 > y) for x2, y2 in points) for x, y in points]


def scatter(rows: list[dict], y: str, ylabel: str, elem_id: str) -> tuple[str, set[str]]:
    """(the SVG, the runs on its frontier) of `y` against L0 over the finished runs that have both."""
    ok = [r for r in rows if r.get("status") == "ok" and isinstance(r.get("l0"), (int, float))
          and isinstance(r.get(y), (int, float))]
    if not ok:
        return "", set()
    front = frontier([(r["l0"], r[y]) for r in ok])
    points = [Point(r["l0"], r[y], str(r.get("arch")), r["run"], f) for r, f in zip(ok, front)]
    colors = {p.group: arch_color(p.group) for p in points}  # as pareto.png colours them
    return (svg_scatter(points, "L0 (eval split)", ylabel, elem_id, colors=colors),
            {p.label for p in points if p.on_frontier})


def curves(sweep: Path, runs: list[str]) -> tuple[str, str]:
    """(the curve charts, their legend) from each run's metrics.jsonl; colours by run order."""
    data = {r: read_curves(sweep / r / "metrics.jsonl") for r in runs}
    charts = []
    for key, label, elem in (("loss", "loss", "curves-loss"), ("l0", "L0", "curves-l0"),
                             ("explained_variance", "explained variance", "curves-ev"),
                             ("eval_explained_variance", "eval explained variance", "curves-eval-ev")):
        if key.startswith("eval_") and not any(key in d for d in data.values()):
            continue  # logged only with eval_every
        series = [Series(r, d.get("tokens", []), d.get(key, [])) for r, d in data.items()]
        charts.append(f'<figure><figcaption>{html.escape(label)}</figcaption>'
                      f'{svg_lines(series, "tokens", label, elem)}</figure>')
    legend = "".join(f'<label><input type="checkbox" value="{html.escape(r)}" checked>'
                     f'<span class="swatch" style="background:{color(i)}"></span>{html.escape(r)}</label>'
                     for i, r in enumerate(runs))
    return "".join(charts), f'<div id="curve-legend">{legend}</div>'


COLUMNS = {"run": "run", "arch": "arch", "hook": "hook", "d_sae": "d_sae", "target_l0": "target L0",
           "k_or_coefficient": "k / coef",
           "lr": "lr", "l0": "L0", "explained_variance": "EV", "ce_recovered_zero": "CE rec. (zero)",
           "ce_recovered_mean": "CE rec. (mean)", "kl": "KL", "dead_fraction": "dead", "tokens_per_s": "tokens/s",
           "status": "status"}


def _cell(value: Any, column: str = "") -> str:
    if isinstance(value, float) and column == "tokens_per_s":
        return f'<td class="num" data-v="{value!r}">{value:,.0f}</td>'
    if isinstance(value, float):
        return f'<td class="num" data-v="{value!r}">{value:.4g}</td>'
    if isinstance(value, int):
        return f'<td class="num" data-v="{value}">{value}</td>'
    return f'<td>{html.escape("" if value is None else str(value))}</td>'


def runs_table(rows: list[dict], links: dict[str, str], commands: dict[str, str], fronts: dict[str, set[str]]) -> str:
    """The sortable table: summary.csv's columns (known ones first), the frontiers a run is on, and
    its feature report (a link, or the command that writes it)."""
    # A column every finished run has the same value in (the hook, d_sae, lr, usually) is said once,
    # above the table: the table then fits a window.
    ok = [r for r in rows if r.get("status") == "ok"]
    same = {c: ok[0].get(c) for c in {k for r in rows for k in r} - {"run", "status"}
            if len(ok) > 1 and len({json.dumps(r.get(c)) for r in ok}) == 1}
    cols = [c for c in COLUMNS if any(c in r for r in rows) and c not in same] + sorted(
        {k for r in rows for k in r} - set(COLUMNS) - set(same))
    every = ", ".join(f"{COLUMNS.get(c, c)} {v:.4g}" if isinstance(v, float) else f"{COLUMNS.get(c, c)} {v}"
                      for c, v in sorted(same.items(), key=lambda kv: list(COLUMNS).index(kv[0])
                                         if kv[0] in COLUMNS else len(COLUMNS))
                      if c != "hook" and v is not None)  # the hook: in the page's first line
    head = "".join(f'<th title="click to sort">{html.escape(COLUMNS.get(c, c))}</th>' for c in cols)
    body = []
    for r in rows:
        name = str(r["run"])
        cells = []
        for c in cols:
            if c == "run":
                run = (f'<a href="{html.escape(links[name])}">{html.escape(name)}</a>' if name in links
                       else html.escape(name))
                cells.append(f'<td class="run" data-v="{html.escape(name)}">{run}</td>')
            elif c == "status":
                status = str(r.get("status") or "")
                cells.append(f'<td class="status" title="{html.escape(status)}">{html.escape(status.split(":")[0])}</td>')
            else:
                cells.append(_cell(r.get(c), c))
        on = [label for label, members in fronts.items() if name in members]
        cells.append(f'<td class="front">{html.escape(", ".join(on))}</td>')
        # Not the command itself in the cell (~90 characters: the table ran past the page's right
        # edge): it is the cell's hover text, and the line above the table says how to write them all.
        report = (f'<a class="feature-link" href="{html.escape(links[name])}">features</a>' if name in links
                  else f'<span class="feature-command" title="{html.escape(commands[name])}">not written</span>'
                  if name in commands else "")
        cells.append(f"<td>{report}</td>")
        body.append(f'<tr data-run="{html.escape(name)}">{"".join(cells)}</tr>')
    return ((f'<p class="meta" id="every-run">Every run: {html.escape(every)}</p>' if every else "")
            + f'<div class="table-wrap"><table id="runs-table"><thead><tr>{head}<th title="click to sort">frontier</th><th>feature report</th>'
            f'</tr></thead><tbody>{"".join(body)}</tbody></table></div>')


CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:20px;margin:0 0 8px}h2{font-size:16px;margin:24px 0 8px}p.meta{color:#555;margin:2px 0}
.charts{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}figure{margin:0}
figcaption{font-size:12px;color:#555;margin-bottom:2px}
svg text{font-size:10px;fill:#444}svg .label{font-size:11px}svg .axis{stroke:#444}svg .grid{stroke:#eee}
svg .note{fill:#a33;font-size:12px}svg .legend{font-size:11px}
svg .point{stroke:#fff;stroke-width:1}svg .point.on-frontier{stroke:#000;stroke-width:1.5}
svg .frontier{fill:none;stroke:#000;stroke-width:1;stroke-dasharray:4 3}
svg .curve{fill:none;stroke-width:1.5;opacity:.85}svg .hl{stroke-width:3.5;opacity:1}svg .point.hl{r:7}
.hidden{display:none}
table#runs-table{border-collapse:collapse;font-size:13px}
#runs-table th{cursor:pointer;text-align:left;border-bottom:2px solid #999;padding:3px 8px;user-select:none;
  vertical-align:bottom}
#runs-table th.asc::after{content:" \\25B2"}#runs-table th.desc::after{content:" \\25BC"}
#runs-table td{padding:2px 8px;border-bottom:1px solid #eee;white-space:nowrap}#runs-table td.num{text-align:right}
#runs-table tr:hover td,#runs-table tr.hl td{background:#fff6d8}#runs-table td.front{color:#555;font-size:12px}
.feature-command{font-size:12px;color:#777;cursor:help}.table-wrap{overflow-x:auto;max-width:100%}
#curve-legend{display:flex;flex-wrap:wrap;gap:4px 14px;margin:8px 0;font-size:12px}
#curve-legend .swatch{display:inline-block;width:14px;height:3px;margin:0 4px 3px 2px;vertical-align:middle}
.note{color:#a33}
"""

JS = r"""
const table = document.getElementById("runs-table");
const value = (td) => td.dataset.v !== undefined ? td.dataset.v : td.textContent.trim();
for (const th of table.querySelectorAll("th")) {
  th.addEventListener("click", () => {
    const i = [...th.parentNode.children].indexOf(th);
    const asc = !th.classList.contains("asc");
    for (const other of table.querySelectorAll("th")) other.classList.remove("asc", "desc");
    th.classList.add(asc ? "asc" : "desc");
    const rows = [...table.tBodies[0].rows];
    rows.sort((a, b) => {
      const x = value(a.cells[i]), y = value(b.cells[i]);
      if (x === "" || y === "") return (x === "") - (y === "");  // empty cells last
      const nx = Number(x), ny = Number(y);
      const c = isNaN(nx) || isNaN(ny) ? x.localeCompare(y) : nx - ny;
      return asc ? c : -c;
    });
    for (const r of rows) table.tBodies[0].appendChild(r);
  });
}
const marks = (run) => document.querySelectorAll(`svg [data-run="${CSS.escape(run)}"]`);
for (const box of document.querySelectorAll("#curve-legend input")) {
  box.addEventListener("change", () => {
    for (const el of document.querySelectorAll(`.curve[data-run="${CSS.escape(box.value)}"]`)) {
      el.classList.toggle("hidden", !box.checked);
    }
  });
}
for (const tr of table.tBodies[0].rows) {
  tr.addEventListener("mouseenter", () => marks(tr.dataset.run).forEach((el) => el.classList.add("hl")));
  tr.addEventListener("mouseleave", () => marks(tr.dataset.run).forEach((el) => el.classList.remove("hl")));
}
document.body.dataset.ready = "1";
"""


def _feature_options(options: dict) -> dict:
    from analysis.report import ReportConfig

    known = {f.name for f in fields(ReportConfig)} - {"sae", "cache", "out"}
    bad = sorted(set(options) - known)
    if bad:
        raise PipelineError(f"unknown feature-report option(s) {', '.join(bad)}; known: {', '.join(sorted(known))}")
    return options


def build_sweep_report(cfg: SweepReportConfig, feature_options: dict | None = None) -> Path:
    """Write the sweep page (OUT/index.html, OUT defaulting to the sweep folder) and, with
    `cfg.features`, each finished run's feature report (`feature_options`: more ReportConfig fields)."""
    from analysis.report import ReportConfig, build_report

    sweep = Path(cfg.sweep)
    if not is_sweep_dir(sweep):
        raise PipelineError(f"{sweep} has no summary.csv: pass a `pipeline sweep` output folder, or an SAE folder "
                            "with --cache")
    rows = read_summary(sweep)
    out = Path(cfg.out) if cfg.out else sweep
    out.mkdir(parents=True, exist_ok=True)
    ok = [r["run"] for r in rows if r.get("status") == "ok" and (sweep / str(r["run"]) / "cfg.json").is_file()]
    caches = {r: cfg.cache or run_cache(sweep, r) for r in ok}
    options = _feature_options(feature_options or {})
    if cfg.features:
        for r in ok:
            if not caches[r]:
                raise PipelineError(f"run {r} names no cache in its cfg.json; pass --cache")
            build_report(ReportConfig(sae=str(sweep / r), cache=caches[r], out=str(sweep / r / FEATURES_DIR),
                                      **{"device": cfg.device, **options}))
    if cfg.ce_contexts and any(r.get("ce_recovered_zero") is None for r in rows if r["run"] in ok):
        from analysis.evaluate_ce import ce_columns

        missing = [r for r in rows if r["run"] in ok and r.get("ce_recovered_zero") is None]
        device = cfg.device if cfg.device != "auto" else "cuda" if _cuda() else "cpu"
        ce_columns(caches[missing[0]["run"]], cfg.ce_contexts)(missing, sweep, device)
        write_summary_csv(sweep, rows)  # as `pipeline sweep --eval` writes them: the next page has them too
    links = {r: os.path.relpath(sweep / r / FEATURES_DIR / "index.html", out) for r in ok
             if (sweep / r / FEATURES_DIR / "index.html").is_file()}
    commands = {r: shlex.join(["pipeline", "report", str(sweep / r), "--cache", caches[r] or "CACHE", "--out",
                               str(sweep / r / FEATURES_DIR)]) for r in ok if r not in links}
    ev_svg, ev_front = scatter(rows, "explained_variance", "explained variance (eval split)", "pareto-ev")
    ce_svg, ce_front = scatter(rows, "ce_recovered_zero", "CE loss recovered (zero ablation)", "pareto-ce")
    if not ce_svg:
        ce_svg = ('<p class="note" id="pareto-ce-missing">No CE loss recovered in summary.csv: run the sweep with '
                  "--eval, or this report with --ce-contexts N (the model the cache names is run).</p>")
    curve_charts, legend = curves(sweep, [str(r["run"]) for r in rows if (sweep / str(r["run"])).is_dir()])
    pngs = [r for r in ok if (sweep / r / CURVES_PNG).is_file()]
    n_ok = sum(r.get("status") == "ok" for r in rows)
    hooks = {r.get("hook") for r in rows if r.get("status") == "ok"}
    page = (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>Sweep report: {html.escape(str(sweep))}'
        f'</title><style>{CSS}</style></head><body><h1>Sweep report</h1>'
        f'<p class="meta">{html.escape(str(sweep.resolve()))}: {len(rows)} runs, {n_ok} finished'
        + (f"; cache {html.escape(str(next(iter(set(caches.values())))))}" if len(set(caches.values())) == 1 else "")
        + (f"; hook {html.escape(str(next(iter(hooks))))}" if len(hooks) == 1 else "")
        + '</p><h2>Which run is best at each L0</h2><p class="meta">Dashed: the frontier, runs that no other run '
        'beats on both L0 (lower) and the score (higher). Hover a table row to find its run.</p>'
        f'<div class="charts">{ev_svg}{ce_svg}</div>'
        f'<h2>Runs</h2><p class="meta">Click a column to sort.'
        + (f' Feature reports: <code>{html.escape(shlex.join(["pipeline", "report", str(sweep), "--features"]))}</code> '
           'writes every run\'s (hover "not written" for one run\'s command).' if commands else "")
        + f'</p>{runs_table(rows, links, commands, {"EV": ev_front, "CE": ce_front})}'
        f'<h2>Training curves</h2><p class="meta">From each run\'s metrics.jsonl ({len(pngs)} of the runs also have '
        f'{CURVES_PNG} in their folder). Untick a run to hide it.</p>{legend}<div class="charts">{curve_charts}</div>'
        f'<script>{JS}</script></body></html>')
    path = out / "index.html"
    path.write_text(page, encoding="utf-8")
    return path


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
