"""The command line: `pipeline cache | train | sweep | eval | report | pretokenize | info | verify | push | pull` (`python -m pipeline` too).

Each command imports its stage lazily, so `pipeline info` never loads a model.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from typing import Any, List, Optional

import typer

from pipeline.cli_help import HelpCommand, HelpGroup
from pipeline.cli_options import config_options, with_options
from pipeline.errors import PipelineError


def _finished(message: str) -> None:
    """The command's last line, printed once: by rank 0 under torchrun."""
    from pipeline.distributed import is_main

    if is_main():
        typer.echo(message)


app = typer.Typer(add_completion=False, cls=HelpGroup, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Cache language-model activations once; train many sparse autoencoders from them.")


CACHE = ("cache_writer.run", "CacheConfig")
TRAIN = ("trainer.run", "TrainConfig")
CONFIG_FILE = inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
                                default=typer.Option(None, "--config", help="TOML file with these fields."))
IMPORT = inspect.Parameter("import_module", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[List[str]],
                           default=typer.Option(None, "--import", help="Module that registers architectures."))


@app.command(cls=HelpCommand)
@with_options(config_options(*CACHE, decls={"out": ("--out", "-o"), "hooks": ("--hook",),
                                            "exclude_special_tokens": ("--exclude-special-tokens/--keep-special-tokens",)},
                             params={"hooks": "hook"},
                             helps={"hooks": "Hook name or module path (repeatable); default: the middle layer's "
                                             "residual stream.",
                                    "model_kwargs": "Model loading options: JSON or k=v,k=v."}),
              [CONFIG_FILE])
def cache(**options) -> None:
    """Stage 1: run a model once over a dataset and write hook activations to a cache."""
    from cache_writer.run import CacheConfig, run_cache, written_line
    from pipeline.config import build_config, parse_kwargs

    overrides = dict(options)
    config = overrides.pop("config")
    overrides["hooks"] = overrides.pop("hook") or None
    overrides["model_kwargs"] = parse_kwargs(overrides["model_kwargs"])
    if overrides.get("compression") in ("none", "None"):
        overrides["compression"] = None
    cfg = build_config(CacheConfig, config, overrides, section="cache")
    manifest = run_cache(cfg, command=" ".join(["pipeline"] + sys.argv[1:]))
    _finished(written_line(cfg, manifest))


@app.command(cls=HelpCommand)
@with_options(config_options(*TRAIN, decls={"out": ("--out", "-o"), "hook": ("--hook", "--hook-in")},
                             helps={"arch_options": "Other architecture fields: key=value,... or JSON."}),
              [IMPORT, CONFIG_FILE])
def train(**options) -> None:
    """Stage 2: train an SAE from a cache; export it in SAELens's format."""
    from pipeline.config import build_config, parse_kwargs
    from trainer.run import TrainConfig, run_train

    overrides = dict(options)
    overrides["arch_options"] = parse_kwargs(overrides["arch_options"], "--arch-options")
    _import(overrides.pop("import_module"))
    config = overrides.pop("config")
    metrics = run_train(build_config(TrainConfig, config, overrides, section="train"))
    ev = metrics.get("eval_explained_variance", metrics.get("explained_variance"))
    l0 = metrics.get("eval_l0", metrics.get("l0"))
    _finished(f"exported to {metrics['run_dir']}" + (f": explained variance {ev[0]:.3f}, L0 {l0[0]:.1f}" if ev else ""))


SWEEP_OPTIONS = ("cache", "out", "tokens", "batch_size", "expansion_factor", "device", "resident", "precision", "kernels",
                 "resume", "wandb", "skip_bad_shards")


def _import(modules: list[str] | None) -> None:
    """The modules of `--import` (they register architectures); a missing one is one line."""
    import importlib

    for name in modules or []:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            where = "" if e.name == name else f" (it imports {e.name}, which is not installed)"
            raise PipelineError(f"--import {name}: no module {e.name!r}{where}; give a module on PYTHONPATH "
                                "or in the current folder, e.g. --import mymodule for mymodule.py") from None


def _param(name: str, kind: type, option: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind)


@app.command(cls=HelpCommand)
@with_options([_param("config", str, typer.Option(..., "--config", help="Sweep TOML: [base] fields and [sweep] lists "
                                                                         "or [[runs]]."))],
              config_options(*TRAIN, only=SWEEP_OPTIONS, decls={"out": ("--out", "-o")},
                             helps={"cache": "Cache directory (overrides [base]).",
                                    "out": "Directory the runs' folders go in.",
                                    "tokens": "Rows per run (overrides every run).",
                                    "resume": "Continue the sweep in --out."}),
              [_param("name", Optional[str], typer.Option(None, help="Sweep name (W&B group); default: the TOML's name "
                                                                     "or file name.")),
               _param("memory_gb", Optional[float], typer.Option(None, help="Memory the sweep may plan for (default: "
                                                                            "90% of free).")),
               _param("with_eval", bool, typer.Option(False, "--eval/--no-eval", help="Also CE loss recovered and KL "
                                                                                     "per SAE (`pipeline eval`).")),
               _param("eval_contexts", int, typer.Option(64, help="Eval-split contexts for --eval.")), IMPORT])
def sweep(**options) -> None:
    """Stage 2: many SAEs from one pass over a cache; summary.csv and pareto.png at the end.

    An option given here overrides the TOML's [base] and every run; the defaults shown apply where neither sets it.
    """
    from pathlib import Path

    from trainer.sweep import expand_runs, load_sweep_spec, run_sweep

    _import(options["import_module"])
    config, cache = options["config"], options["cache"]
    spec = load_sweep_spec(config)
    overrides = {k: options[k] for k in SWEEP_OPTIONS if options[k] is not None}
    name, memory_gb, eval_contexts = options["name"], options["memory_gb"], options["eval_contexts"]
    evaluate_runs = None
    if options["with_eval"]:
        from analysis.evaluate_ce import ce_columns
        from trainer.run import TrainConfig

        evaluate_runs = ce_columns(cache or spec.get("base", {}).get("cache") or TrainConfig.cache, eval_contexts)
    rows = run_sweep(spec, overrides, name=name or spec.get("name") or Path(config).stem,
                     memory_budget=int(memory_gb * 2**30) if memory_gb else None, evaluate_runs=evaluate_runs)
    ok = sum(r["status"] == "ok" for r in rows)
    summary = Path(expand_runs(spec, overrides)[0].out) / "summary.csv"
    _finished(f"sweep done: {ok} of {len(rows)} runs ok; summary in {summary}")


@app.command("eval", cls=HelpCommand)
def eval_(
    sae: str = typer.Argument(..., help="SAE directory (cfg.json + sae_weights.safetensors; ours or SAELens's)."),
    cache: str = typer.Option(..., help="Cache whose manifest names the model and hook; its sequences are the contexts."),
    split: Optional[str] = typer.Option(None, help="Split whose contexts and mean activation are used."),
    contexts: Optional[int] = typer.Option(None, help="Contexts to run."),
    batch_size: Optional[int] = typer.Option(None, help="Contexts per forward pass."),
    hook: Optional[str] = typer.Option(None, help="Hook the SAE reads and replaces (default: its hook_name; "
                                                  "a transcoder replaces its hook_name_out)."),
    model: Optional[str] = typer.Option(None, help="Load this model instead of the one the manifest names."),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda, cuda:N."),
    max_rows: Optional[int] = typer.Option(None, help="Cached rows the activation metrics read (default: all)."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Also write the results as SAEBench core JSON here."),
) -> None:
    """Stage 2: SAEBench's core metrics, and CE loss recovered and KL of the SAE spliced into the cache's model."""
    overrides = {k: v for k, v in dict(locals()).items() if v is not None}  # first, before any import
    from analysis.core_metrics import run_eval
    from analysis.evaluate_ce import EvalConfig

    run_eval(EvalConfig(**overrides))


@app.command(cls=HelpCommand)
def report(
    path: str = typer.Argument(..., metavar="SAE_OR_SWEEP",
                               help="SAE directory (cfg.json + sae_weights.safetensors), or a sweep folder (summary.csv)."),
    cache: Optional[str] = typer.Option(None, help="Cache to read activations and contexts from (an SAE: needed; "
                                                   "a sweep: default each run's)."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Directory for index.html (a sweep: default its folder)."),
    features: bool = typer.Option(False, "--features", help="Sweep: also write each run's feature report and link it."),
    split: Optional[str] = typer.Option(None, help="Split to stream over."),
    hook: Optional[str] = typer.Option(None, help="Hook to read (default: the SAE's hook_name)."),
    latents: Optional[str] = typer.Option(None, help="Latents to show: 1,2,3 (default: chosen by --select)."),
    n_latents: Optional[int] = typer.Option(None, help="How many latents to show."),
    select: Optional[str] = typer.Option(None, help="top (densest), random (live), or mixed (half each)."),
    contexts: Optional[int] = typer.Option(None, help="Top-activating contexts per latent."),
    left: Optional[int] = typer.Option(None, help="Tokens shown before the activating token."),
    right: Optional[int] = typer.Option(None, help="Tokens shown after it."),
    max_rows: Optional[int] = typer.Option(None, help="Stop the pass after this many rows (default: all)."),
    ce_contexts: Optional[int] = typer.Option(None, help="Also run `pipeline eval` on N contexts for the summary "
                                                         "(a sweep: for runs summary.csv has no CE for)."),
    logits: Optional[bool] = typer.Option(None, "--logits/--no-logits",
                                          help="Logit effects per latent (loads the cache's model)."),
    model: Optional[str] = typer.Option(None, help="Load this model instead of the one the manifest names."),
    seed: Optional[int] = typer.Option(None, help="Seed of the random choice of latents."),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda, cuda:N."),
) -> None:
    """Stage 2: a static HTML page to look at an SAE (densities, L0, logit effects, top contexts per latent),
    or at a sweep (runs table, Pareto plots, training curves, links to each run's page)."""
    overrides = {k: v for k, v in dict(locals()).items() if v is not None}  # first, before any import
    from pipeline.lock import refuse_file_in_way

    if out is not None:  # before minutes of work, not at the end
        refuse_file_in_way(out)
    from analysis.report import ReportConfig, build_report, parse_latents
    from analysis.sweep_report import SweepReportConfig, build_sweep_report, is_sweep_dir

    path, features = overrides.pop("path"), overrides.pop("features")
    if "latents" in overrides:
        overrides["latents"] = parse_latents(latents)
    if is_sweep_dir(path):
        own = {k: overrides.pop(k) for k in ("out", "cache", "ce_contexts") if k in overrides}
        page = build_sweep_report(SweepReportConfig(sweep=path, features=features, device=overrides.get("device", "auto"),
                                                    **own), feature_options=overrides)
    else:
        if cache is None:
            raise PipelineError(f"{path} is not a sweep folder (no summary.csv): an SAE's report needs --cache, the "
                                "cache to read its activations from")
        if features:
            raise PipelineError("--features is for a sweep folder (one with summary.csv); an SAE's page is its "
                                "feature report")
        page = build_report(ReportConfig(sae=path, **overrides))
    typer.echo(f"wrote {page} (open it in a browser; it needs no server)")


@app.command(cls=HelpCommand)
def pretokenize(
    out: str = typer.Option(..., "--out", "-o", help="datasets directory to write."),
    dataset: Optional[str] = typer.Option(None, help="'stdlib' (default), a local path, or a HF dataset id."),
    dataset_split: str = typer.Option("train", help="Split of the source dataset."),
    column: Optional[str] = typer.Option(None, help="Text column."),
    tokenizer: str = typer.Option("bytes", help="'bytes' or a HF tokenizer name/path."),
    context_size: int = typer.Option(128, help="Tokens per packed sequence."),
    eval_fraction: float = typer.Option(0.05, help="Fraction of the tokens held out as 'eval' (documents in pieces "
                                                   "of one context)."),
    max_sequences: Optional[int] = typer.Option(None, help="Stop after this many sequences."),
) -> None:
    """Tokenize and pack a dataset once into a `datasets` directory (`input_ids`, `split`)."""
    from cache_writer.pretokenize import pretokenize as run

    n = run(out, dataset, dataset_split, column, tokenizer, context_size, eval_fraction, max_sequences)
    typer.echo(f"wrote {out}: {n:,} sequences of {context_size} tokens")


@app.command(cls=HelpCommand)
def info(path: str = typer.Argument(..., help="Cache directory.")) -> None:
    """Show a cache's manifest as tables."""
    from pipeline.verify import render_info

    render_info(path)


@app.command(cls=HelpCommand)
def verify(path: str = typer.Argument(..., help="Cache directory.")) -> None:
    """Check every shard against its checksum and size; name any bad one."""
    from pipeline.verify import verify_cache

    problems, manifest = verify_cache(path)
    n = sum(len(s["shards"]) for s in manifest["splits"].values())
    rows = sum(s["rows"] for s in manifest["splits"].values())
    if problems:
        for p in problems:
            typer.echo(f"BAD {p}", err=True)
        raise typer.Exit(1)
    state = "complete" if manifest["complete"] else "incomplete (resumable with --resume)"
    typer.echo(f"OK {path}: {n} shards, {rows:,} rows verified; {state}")


@app.command(cls=HelpCommand)
def push(
    path: str = typer.Argument(..., help="A cache directory (has manifest.json), an SAE export, or a folder of exports."),
    repo_id: str = typer.Argument(..., help="Hub repo ORG/NAME: a dataset repo for a cache, a model repo for SAEs."),
    private: bool = typer.Option(False, "--private", help="Create the repo private."),
    revision: Optional[str] = typer.Option(None, help="Branch to push to (created when missing); default main."),
    max_commit_files: int = typer.Option(256, help="Most files in one commit."),
    max_commit_mb: float = typer.Option(4096.0, help="Most MiB in one commit (an interrupted push re-sends at most this)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a different cache (other config) in the repo."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Check every shard's checksum before sending."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print what a first push sends (commits, card); send nothing."),
) -> None:
    """Upload a cache (dataset repo) or SAEs (model repo, SAELens layout); rerun to resume."""
    from types import SimpleNamespace

    from pipeline import hub
    from pipeline.config import check_sizes

    check_sizes(SimpleNamespace(max_commit_files=max_commit_files, max_commit_mb=max_commit_mb),
                positive=("max_commit_files", "max_commit_mb"))
    config = hub.PushConfig(max_commit_files=max_commit_files, max_commit_bytes=int(max_commit_mb * 2**20),
                            verify=verify, overwrite=overwrite)
    if dry_run:
        plan = hub.plan(path, repo_id, config)
        for i, commit in enumerate(plan.commits):
            typer.echo(f"commit {i + 1}: {len(commit.files)} files, {commit.bytes / 2**20:,.2f} MiB  {commit.message}")
        typer.echo(plan.card)
        return
    with _network("push"):
        plan = hub.push(path, repo_id, private=private, revision=revision, config=config, log=typer.echo)
    kind = "datasets" if hub.is_cache(path) else ""
    url = f"https://huggingface.co/{kind + '/' if kind else ''}{repo_id}"
    typer.echo(f"pushed {path} to {url}: {len(plan.files)} files sent, {len(plan.skipped)} already there")


@app.command(cls=HelpCommand)
def pull(
    repo_id: str = typer.Argument(..., help="Hub dataset repo ORG/NAME holding a cache."),
    out: str = typer.Option(..., "--out", "-o", help="Directory to write the cache (or the part) into."),
    hook: Optional[List[str]] = typer.Option(None, "--hook", help="Hook to pull (repeatable); default all."),
    split: Optional[str] = typer.Option(None, help="train or eval; default both."),
    shards: Optional[str] = typer.Option(None, help="Shard range of each pulled split, e.g. 0:10 (or 3, :5, 10:)."),
    revision: Optional[str] = typer.Option(None, help="Branch, tag or commit; default main."),
) -> None:
    """Download a cache, or some hooks / one split / a shard range of it, checksum-verified."""
    from pipeline.hub import pull_cache

    with _network("pull"):
        pull_cache(repo_id, out, hooks=hook or None, split=split, shards=shards, revision=revision, log=typer.echo)


@contextlib.contextmanager
def _network(action: str):
    """A push or pull: refused at once without a network, one line when the connection breaks."""
    from pipeline.hub.common import check_reachable, is_network_error

    check_reachable(action)
    try:
        yield
    except Exception as e:
        if not is_network_error(e):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise PipelineError(f"the connection to the Hub failed during the {action} ({first}); rerun the same "
                            "command to resume: what arrived is kept") from None


def _resume_command() -> str:
    """This command line with --resume: what continues a run that stopped."""
    import shlex

    prog = sys.argv[0]
    prog = [sys.executable, "-m", "pipeline"] if prog.endswith("__main__.py") else [prog]
    args = sys.argv[1:] + ([] if "--resume" in sys.argv[1:] else ["--resume"])
    return shlex.join(prog + args)


RESUMABLE = ("cache", "train", "sweep")
"""Commands that `--resume` continues."""


def _stopped_line(signum: int) -> str:
    """What a signal outside a training loop's own handling leaves: before a run starts, during its
    export, in any other command."""
    import signal

    line = f"stopped ({signal.Signals(signum).name})"
    if len(sys.argv) > 1 and sys.argv[1] in RESUMABLE:
        return f"{line}; what was finished is kept; rerun with: {_resume_command()}"
    return line


def _warning_line(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
                  line: str | None = None) -> None:
    """A Python warning as one plain line (Python's own format adds file:line, the category and the
    warning's source line: three lines of which one says something to a user)."""
    typer.echo(f"warning: {message}", err=True)


def main() -> None:
    import signal
    import warnings

    try:  # typer keeps its own copy of click since 0.2x
        from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError
    except ImportError:
        from click.exceptions import ClickException, NoArgsIsHelpError, UsageError

    from pipeline.errors import Stopped, raise_stopped
    from pipeline.malloc import tune_malloc
    from trainer.interrupt import Interrupted

    tune_malloc()
    previous = signal.signal(signal.SIGTERM, raise_stopped)  # a training loop takes it over while it runs
    shown = warnings.showwarning
    warnings.showwarning = _warning_line
    try:
        # Not standalone: click would draw a usage error in a box of wrapped lines; ours is one line.
        code = app(standalone_mode=False)
    except UsageError as e:
        if isinstance(e, NoArgsIsHelpError):  # bare `pipeline`: the help, as before
            typer.echo(e.ctx.get_help())
            sys.exit(0)
        where = e.ctx.command_path if e.ctx else "pipeline"
        typer.echo(f"error: {e.format_message().rstrip('.')}; see `{where} --help`", err=True)
        sys.exit(2)
    except ClickException as e:  # a file option's open failing, and the like
        typer.echo(f"error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except typer.Abort:  # Ctrl-C outside a training loop
        typer.echo(_stopped_line(signal.SIGINT), err=True)
        sys.exit(128 + signal.SIGINT)
    except PipelineError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except Interrupted as e:
        typer.echo(f"{e}; resume with: {_resume_command()}" if e.checkpoint else str(e), err=True)
        sys.exit(e.exit_code)
    except Stopped as e:
        typer.echo(_stopped_line(e.signum), err=True)
        sys.exit(128 + e.signum)
    finally:
        signal.signal(signal.SIGTERM, previous)
        warnings.showwarning = shown
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
