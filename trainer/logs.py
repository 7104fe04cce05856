"""Where training metrics go: a rich progress bar with metric lines on the console, and W&B.

The JSONL file is written by the loop itself (`LoopConfig.metrics_path`); these are the loggers a
run adds on top. W&B runs offline when no API key is configured, so a run never blocks on a login
and never fails for lack of a network; `wandb sync` uploads it later. The key is read by wandb
from the environment or the user's netrc and never passes through this code.
"""

from __future__ import annotations

import os
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class ConsoleLog:
    """A progress bar over the run's tokens (with tokens/s) and one line per logging step."""

    def __init__(self, total_tokens: int, description: str = "train", run_names: list[str] | None = None):
        self.console = Console(stderr=False)
        self.run_names = run_names
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[rate]} tok/s"), TimeRemainingColumn(),
                                 console=self.console, transient=True)
        self.task = self.progress.add_task(description, total=total_tokens, rate="-")
        self.progress.start()

    def __call__(self, m: dict) -> None:
        self.progress.update(self.task, completed=m["tokens"], rate=f"{m.get('tokens_per_s', 0):,.0f}")
        for r in range(len(m["mse"])):
            name = f"{self.run_names[r]}  " if self.run_names and len(self.run_names) > 1 else ""
            line = (f"{name}step {m['step']:>6}  tokens {m['tokens']:>10,}  {m.get('tokens_per_s', 0):>8,.0f} tok/s  "
                    f"mse {m['mse'][r]:.4g}  expl.var {m['explained_variance'][r]:.3f}  L0 {m['l0'][r]:.1f}  "
                    f"dead {m['dead_fraction'][r]:.3f}  dense {m['dense_fraction'][r]:.3f}")
            if "eval_explained_variance" in m:
                line += f"  eval expl.var {m['eval_explained_variance'][r]:.3f}"
            if r in m.get("failed", []):
                line += "  [red]stopped: loss NaN/Inf[/red]"
            self.progress.console.print(line, highlight=False)

    def close(self) -> None:
        self.progress.stop()


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


class WandbLog:
    """One W&B run per SAE (run r of a stack logs to `runs[r]`), offline without a key."""

    def __init__(self, project: str, names: list[str], configs: list[dict], out_dirs: list[Path],
                 group: str | None = None):
        import wandb

        mode = wandb_mode()
        self.runs = [wandb.init(project=project, name=name, config=config, group=group, dir=str(out_dir),
                                mode=mode, reinit="create_new")
                     for name, config, out_dir in zip(names, configs, out_dirs)]

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
