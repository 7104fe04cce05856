"""Where training metrics go: a rich progress bar with metric lines on the console, and W&B.

The JSONL file is written by the loop itself (`LoopConfig.metrics_path`); these are the loggers a
run adds on top. Console lines fit 100 columns and are never wrapped, so a log written to a file
reads as it does on a terminal. W&B runs offline when no API key is configured, so a run never
blocks on a login and never fails for lack of a network; `wandb sync` uploads it later. It prints
nothing itself (one line here says where the runs are). The key is read by wandb from the
environment or the user's netrc and never passes through this code.
"""

from __future__ import annotations

import os
import secrets
import string
import time
from pathlib import Path

from pipeline.console import Heartbeat, duration, log_console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

WANDB_ID_FILE = "wandb_run_id"
"""In a run's folder: its W&B run id, so a resumed run continues the same W&B run."""


def _short(x: float) -> str:
    """A count in 3 significant digits: 819k, 4.1M."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.0f}"


def _fields(m: dict, r: int, prefix: str = "") -> str | None:
    """Run r's reconstruction and sparsity metrics (the `prefix`ed ones, e.g. eval_), or None."""
    keys = ("mse", "explained_variance", "l0", "dead_fraction", "dense_fraction")
    values = [m.get(prefix + k) for k in keys]
    if any(not isinstance(v, list) or r >= len(v) or v[r] is None for v in values):
        return None
    mse, ev, l0, dead, dense = (v[r] for v in values)
    return f"mse {mse:#.3g}  EV {ev:.3f}  L0 {l0:.1f}  dead {dead:.1%}  dense {dense:.1%}"


def progress_head(step: int, tokens: int, tokens_per_s: float, total_steps: int | None = None,
                  total_tokens: int | None = None) -> str:
    """Where a run is: step of total (percentage), tokens, the current tokens/s and the ETA at that rate."""
    at = f"step {step:>5}"
    if total_steps:
        at += f"/{total_steps} ({step / total_steps:.0%})"
    head = f"{at}  {_short(tokens):>5} tok  {_short(tokens_per_s):>5} tok/s"
    if total_tokens and tokens_per_s > 0 and tokens < total_tokens:
        head += f"  ETA {duration((total_tokens - tokens) / tokens_per_s)}"
    return head


def metric_lines(m: dict, run_names: list[str] | None = None, total_steps: int | None = None,
                 total_tokens: int | None = None) -> list[str]:
    """A logging step's console lines: a head (`progress_head`), then a line per run (named when
    there are several), and an eval line under a run when `m` has eval metrics. EV is the explained
    variance; dead and dense are fractions of the latents. Within 100 columns up to 6-digit steps
    and 30-character run names."""
    lines = [progress_head(m["step"], m["tokens"], m.get("tokens_per_s", 0), total_steps, total_tokens)]
    several = run_names is not None and len(m["mse"]) > 1
    width = max(map(len, run_names)) if several else 0
    for r in range(len(m["mse"])):
        lead = f"  {run_names[r]:<{width}}" if several else "  train"
        stopped = r in m.get("failed", [])
        lines.append(f"{lead}  " + ("stopped: loss NaN/Inf, kept at its last good weights" if stopped
                                    else _fields(m, r)))
        evals = None if stopped else _fields(m, r, "eval_")
        if evals:
            lines.append(f"{'eval':>{len(lead)}}  {evals}")
    return lines


class ConsoleLog:
    """A progress bar over the run's tokens (with tokens/s; on a terminal only), the lines of each
    logging step, and between them (off a terminal, where there is no bar) a progress line at least
    every `every` seconds from what `progress(step, tokens)` last heard: a first line at once, and on
    a resume the step it resumed from."""

    def __init__(self, total_tokens: int, description: str = "train", run_names: list[str] | None = None,
                 total_steps: int | None = None, every: float = 10.0):
        self.console = log_console()
        self.run_names, self.total_tokens, self.total_steps = run_names, total_tokens, total_steps
        self.progress_bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[rate]} tok/s"), TimeRemainingColumn(),
                                     console=self.console, transient=True)
        self.task = self.progress_bar.add_task(description, total=total_tokens, rate="-")
        self.at: tuple[int, int] | None = None  # (step, tokens) the loop last reported
        self.window = (time.perf_counter(), 0)  # (time, tokens) of the last line: its rate is the current one
        steps = f"{total_steps:,} steps, " if total_steps else ""
        self.heartbeat = Heartbeat(self._line, every, self.console)
        self.console.print(f"{description}: {steps}{_short(total_tokens)} tokens", markup=False, highlight=False,
                           soft_wrap=True)
        if self.console.is_terminal:  # in a file it would only add blank lines
            self.progress_bar.start()
        else:
            self.heartbeat.__enter__()

    def progress(self, step: int, tokens: int) -> None:
        """Where the loop is (every step; nothing printed here). The first call of a resumed run says so."""
        if self.at is None:
            self.window = (time.perf_counter(), tokens)
            if step:
                of = f" of {self.total_steps:,}" if self.total_steps else ""
                self.console.print(f"resumed from step {step:,}{of} ({_short(tokens)} tokens)", markup=False,
                                   highlight=False, soft_wrap=True)
        self.at = (step, tokens)

    def _line(self) -> str | None:
        if self.at is None:
            return None
        step, tokens = self.at
        now = time.perf_counter()
        rate = (tokens - self.window[1]) / max(now - self.window[0], 1e-9)
        self.window = (now, tokens)
        return progress_head(step, tokens, rate, self.total_steps, self.total_tokens)

    def __call__(self, m: dict) -> None:
        self.window = (time.perf_counter(), m["tokens"])
        self.heartbeat.beat()
        self.progress_bar.update(self.task, completed=m["tokens"], rate=f"{m.get('tokens_per_s', 0):,.0f}")
        for line in metric_lines(m, self.run_names, self.total_steps, self.total_tokens):
            self.progress_bar.console.print(line, highlight=False, markup=False, soft_wrap=True)

    def close(self) -> None:
        self.heartbeat.close()
        if self.progress_bar.live.is_started:
            self.progress_bar.stop()


def wandb_mode() -> str:
    """'online' with an API key (or an explicit WANDB_MODE), else 'offline'."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:  # a `wandb login` leaves the key in ~/.netrc
        import netrc

        if netrc.netrc().authenticators("api.wandb.ai"):
            return "online"
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        pass
    return "offline"


def wandb_run_id(out_dir: Path, resume: bool) -> str:
    """The W&B run id of the run in `out_dir`: the stored one when resuming, else a new one (stored)."""
    path = Path(out_dir) / WANDB_ID_FILE
    if resume and path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # as W&B's own
    path.write_text(run_id + "\n")
    return run_id


class WandbLog:
    """One W&B run per SAE (run r of a stack logs to `runs[r]`), offline without a key. `resume`:
    continue the W&B runs stored in `out_dirs` (a resumed training) instead of starting new ones."""

    def __init__(self, project: str, names: list[str], configs: list[dict], out_dirs: list[Path],
                 group: str | None = None, resume: bool = False):
        import wandb

        mode = wandb_mode()
        quiet = wandb.Settings(silent=True, console="off")  # its banners were most of a log's lines
        self.runs = [wandb.init(project=project, name=name, config=config, group=group, dir=str(out_dir),
                                mode=mode, reinit="create_new", id=wandb_run_id(out_dir, resume), resume="allow",
                                settings=quiet)
                     for name, config, out_dir in zip(names, configs, out_dirs)]
        if mode == "offline":
            where = out_dirs[0] if len(out_dirs) == 1 else Path(out_dirs[0]).parent / "*"
            print(f"W&B offline; to upload: wandb sync {where}/wandb/offline-run-*", flush=True)
        elif mode != "disabled" and self.runs:
            print(f"W&B: {self.runs[0].url if len(self.runs) == 1 else self.runs[0].project_url}", flush=True)

    def __call__(self, m: dict) -> None:
        for r, run in enumerate(self.runs):
            run.log({k: (v[r] if isinstance(v, list) and k != "failed" else v) for k, v in m.items()
                     if k not in ("step", "failed")}, step=m["step"])

    def summary(self, metrics: list[dict]) -> None:
        for run, m in zip(self.runs, metrics):
            run.summary.update(m)

    def close(self) -> None:
        for run in self.runs:
            run.finish()
