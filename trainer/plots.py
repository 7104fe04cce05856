"""A run's training curves: `metrics.jsonl` read back, and drawn as `training_curves.png` in the run's
folder at the end of `pipeline train` and of each run of a sweep (for users without W&B).

`pipeline train` logs one line per log step whose values are per-run lists (a stack of one run);
a sweep writes each run's own line with plain numbers. Both read the same way here.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

CURVES_PNG = "training_curves.png"
# (panel title, metrics drawn in it): training metrics, and eval-split ones where they were logged.
PANELS = (("loss", ("loss",)), ("L0", ("l0", "eval_l0")),
          ("explained variance", ("explained_variance", "eval_explained_variance")))


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


def write_training_curves(run_dir: str | Path) -> Path | None:
    """RUN/training_curves.png from RUN/metrics.jsonl (loss, L0 and explained variance against
    tokens); None when nothing was logged. Drawing never fails a finished run: a problem is a warning."""
    run_dir = Path(run_dir)
    try:
        cols = read_curves(run_dir / "metrics.jsonl")
        if not cols:
            return None
        from matplotlib.figure import Figure  # no pyplot: no global state, no display, the Agg canvas

        fig = Figure(figsize=(12, 3.4), layout="constrained")
        for ax, (title, keys) in zip(fig.subplots(1, len(PANELS)), PANELS):
            for key in keys:
                pts = [(t, v) for t, v in zip(cols["tokens"], cols.get(key, [])) if t is not None and v is not None]
                if pts:
                    ax.plot(*zip(*pts), marker="o" if key.startswith("eval_") else None, markersize=3,
                            label=key.replace("_", " "))
            ax.set_title(title)
            ax.set_xlabel("tokens")
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=8)
        fig.suptitle(run_dir.name)
        fig.savefig(run_dir / CURVES_PNG, dpi=100)
        return run_dir / CURVES_PNG
    except Exception as e:  # noqa: BLE001 - the run is exported already; a plot is not worth losing it
        warnings.warn(f"could not draw {run_dir / CURVES_PNG}: {e}")
        return None
