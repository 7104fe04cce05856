"""The command line: `pipeline cache | train | sweep | eval | report | pretokenize | info | verify | push | pull` (`python -m pipeline` too).

Each command imports its stage lazily, so `pipeline info` never loads a model.
"""

from __future__ import annotations

import sys
from typing import List, Optional

import typer

from pipeline.cli_help import HelpCommand, HelpGroup
from pipeline.errors import PipelineError


def _finished(message: str) -> None:
    """The command's last line, printed once: by rank 0 under torchrun."""
    from pipeline.distributed import is_main

    if is_main():
        typer.echo(message)


app = typer.Typer(add_completion=False, cls=HelpGroup, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Cache language-model activations once; train many sparse autoencoders from them.")


@app.command(cls=HelpCommand)
def cache(
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Cache directory to write."),
    model: Optional[str] = typer.Option(None, help="'tiny', a TransformerLens name, a HF checkpoint dir, or hf:ID."),
    hook: Optional[List[str]] = typer.Option(None, "--hook", help="Hook name or module path (repeatable)."),
    dataset: Optional[str] = typer.Option(None, help="'stdlib' (default), a local path, or a HF dataset id."),
    dataset_split: Optional[str] = typer.Option(None, help="Split of the source dataset."),
    column: Optional[str] = typer.Option(None, help="Text or token-id column."),
    tokenizer: Optional[str] = typer.Option(None, help="'bytes' or a HF tokenizer; default: the model's."),
    context_size: Optional[int] = typer.Option(None, help="Tokens per packed sequence."),
    tokens: Optional[int] = typer.Option(None, help="Token positions to run through the model, train and eval "
                                                    "together."),
    batch_size: Optional[int] = typer.Option(None, help="Sequences per forward pass."),
    eval_fraction: Optional[float] = typer.Option(None, help="Fraction of the tokens held out as 'eval' (documents "
                                                             "in pieces of one context)."),
    exclude_special_tokens: Optional[bool] = typer.Option(None, "--exclude-special-tokens/--keep-special-tokens",
                                                          help="Skip BOS/separator positions."),
    positions: Optional[str] = typer.Option(None, help="Keep positions START:END of each sequence."),
    dtype: Optional[str] = typer.Option(None, help="Stored dtype: float32, float16, bfloat16."),
    model_dtype: Optional[str] = typer.Option(None, help="dtype the model runs in."),
    format: Optional[str] = typer.Option(None, "--format", help="zarr or arrow."),
    compression: Optional[str] = typer.Option(None, help="Zarr only: zstd or blosc (default none)."),
    shard_mb: Optional[float] = typer.Option(None, help="Target MiB per hook shard."),
    shuffle: Optional[bool] = typer.Option(None, "--shuffle/--no-shuffle", help="Shuffle rows on disk."),
    seed: Optional[int] = typer.Option(None, help="Shuffle seed."),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda, cuda:N."),
    model_kwargs: Optional[str] = typer.Option(None, help="Model loading options: JSON or k=v,k=v."),
    trust_remote_code: Optional[bool] = typer.Option(None, "--trust-remote-code/--no-trust-remote-code",
                                                     help="Run a HF model's own code."),
    resume: Optional[bool] = typer.Option(None, "--resume/--no-resume", help="Continue or extend the cache in --out."),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite/--no-overwrite", help="Replace the cache in --out."),
    config: Optional[str] = typer.Option(None, "--config", help="TOML file with these fields."),
) -> None:
    """Stage 1: run a model once over a dataset and write hook activations to a cache."""
    overrides = dict(locals())  # first, before any import adds names
    from cache_writer.run import CacheConfig, run_cache
    from pipeline.config import build_config, parse_kwargs

    overrides.pop("config")
    overrides["hooks"] = overrides.pop("hook") or None
    overrides["model_kwargs"] = parse_kwargs(model_kwargs)
    if overrides.get("compression") in ("none", "None"):
        overrides["compression"] = None
    cfg = build_config(CacheConfig, config, overrides, section="cache")
    manifest = run_cache(cfg, command=" ".join(["pipeline"] + sys.argv[1:]))
    rows = {s: v["rows"] for s, v in manifest["splits"].items()}
    _finished(f"wrote {cfg.out}: {rows['train']:,} train rows + {rows['eval']:,} eval rows (--tokens counts both), "
               f"hooks {', '.join(manifest['hooks'])}; complete={manifest['complete']}")


@app.command(cls=HelpCommand)
def train(
    cache: Optional[str] = typer.Option(None, help="Cache directory to train on."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Directory the run's folder goes in."),
    name: Optional[str] = typer.Option(None, help="Run name (folder, W&B); default from arch, d_sae, k/l1."),
    hook: Optional[str] = typer.Option(None, "--hook", "--hook-in", help="Hook to read (default: the cache's only hook)."),
    arch: Optional[str] = typer.Option(None, help="topk, batchtopk, matryoshka, jumprelu, gated, standard, or yours."),
    d_sae: Optional[int] = typer.Option(None, help="Number of latents."),
    expansion_factor: Optional[int] = typer.Option(None, help="d_sae = N * d_in (instead of --d-sae)."),
    k: Optional[int] = typer.Option(None, help="TopK: latents per token."),
    initial_k: Optional[int] = typer.Option(None, help="TopK: anneal k down from this value."),
    k_anneal_steps: Optional[int] = typer.Option(None, help="TopK: steps of k annealing."),
    l1: Optional[float] = typer.Option(None, help="standard, gated: L1 coefficient."),
    l1_warmup_steps: Optional[int] = typer.Option(None, help="standard, gated: L1 warm-up steps."),
    l0: Optional[float] = typer.Option(None, help="jumprelu: L0 coefficient."),
    l0_warmup_steps: Optional[int] = typer.Option(None, help="jumprelu: L0 warm-up steps."),
    target_l0: Optional[float] = typer.Option(None, help="End at this L0: k for topk/batchtopk/matryoshka, a "
                                              "controlled L1/L0 coefficient for standard/gated/jumprelu."),
    arch_options: Optional[str] = typer.Option(None, help="Other architecture fields: key=value,... or JSON."),
    lr: Optional[float] = typer.Option(None, help="Adam learning rate."),
    lr_warmup_steps: Optional[int] = typer.Option(None, help="Linear lr warm-up steps."),
    lr_decay: Optional[str] = typer.Option(None, help="constant, cosine or linear."),
    max_grad_norm: Optional[float] = typer.Option(None, help="Gradient clipping per run."),
    b_dec_init: Optional[str] = typer.Option(None, help="geometric_median, mean or zeros."),
    init_scale_search: Optional[bool] = typer.Option(None, "--init-scale-search/--no-init-scale-search",
                                                     help="Grid-search the initial weight scale."),
    normalize: Optional[bool] = typer.Option(None, "--normalize/--no-normalize",
                                             help="Scale rows to mean norm sqrt(d_in) (folded into the export)."),
    batch_size: Optional[int] = typer.Option(None, help="Rows per step."),
    tokens: Optional[int] = typer.Option(None, help="Rows to train on."),
    seed: Optional[int] = typer.Option(None, help="Seed of weights and shuffle."),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda, cuda:N."),
    resident: Optional[str] = typer.Option(None, help="Hold the cache's split on the device and read the disk once: auto (when it fits), yes, no."),
    precision: Optional[str] = typer.Option(None, help="auto (bf16 on CUDA, fp32 on CPU), fp32, tf32 or bf16."),
    kernels: Optional[str] = typer.Option(None, help="auto (the faster per device), fused or plain."),
    log_every: Optional[int] = typer.Option(None, help="Steps between metric lines."),
    eval_every: Optional[int] = typer.Option(None, help="Steps between eval-split metrics (0: at the end)."),
    eval_tokens: Optional[int] = typer.Option(None, help="Eval rows used during training."),
    checkpoint_every: Optional[int] = typer.Option(None, help="Steps between resume checkpoints."),
    n_snapshots: Optional[int] = typer.Option(None, help="SAEs kept along the run (SAELens format)."),
    snapshot_spacing: Optional[str] = typer.Option(None, help="log or linear."),
    resume: Optional[bool] = typer.Option(None, "--resume/--no-resume", help="Continue the run in OUT/NAME."),
    init_from: Optional[str] = typer.Option(None, help="Start from a saved SAE (ours or SAELens's)."),
    wandb: Optional[bool] = typer.Option(None, "--wandb/--no-wandb", help="Log to W&B (offline without a key)."),
    wandb_project: Optional[str] = typer.Option(None, help="W&B project."),
    ddp: Optional[bool] = typer.Option(None, "--ddp/--no-ddp",
                                       help="Data-parallel under torchrun: each rank trains on its part of a batch."),
    hook_out: Optional[str] = typer.Option(None, "--hook-out", help="Transcoder: reconstruct this hook from --hook."),
    skip_bad_shards: Optional[bool] = typer.Option(None, "--skip-bad-shards",
                                                   help="Leave out shards that fail their checksum instead of stopping."),
    import_module: Optional[List[str]] = typer.Option(None, "--import", help="Module that registers architectures."),
    config: Optional[str] = typer.Option(None, "--config", help="TOML file with these fields."),
) -> None:
    """Stage 2: train an SAE from a cache; export it in SAELens's format."""
    overrides = dict(locals())  # first, before any import adds names
    import importlib

    from pipeline.config import build_config, parse_kwargs
    from trainer.run import TrainConfig, run_train

    overrides["arch_options"] = parse_kwargs(arch_options, "--arch-options")

    for name in overrides.pop("import_module") or []:
        importlib.import_module(name)
    overrides.pop("config")
    metrics = run_train(build_config(TrainConfig, config, overrides, section="train"))
    ev = metrics.get("eval_explained_variance", metrics.get("explained_variance"))
    l0 = metrics.get("eval_l0", metrics.get("l0"))
    _finished(f"exported to {metrics['run_dir']}" + (f": explained variance {ev[0]:.3f}, L0 {l0[0]:.1f}" if ev else ""))


@app.command(cls=HelpCommand)
def sweep(
    config: str = typer.Option(..., "--config", help="Sweep TOML: [base] fields and [sweep] lists or [[runs]]."),
    cache: Optional[str] = typer.Option(None, help="Cache directory (overrides [base])."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Directory the runs' folders go in."),
    tokens: Optional[int] = typer.Option(None, help="Rows per run (overrides every run)."),
    batch_size: Optional[int] = typer.Option(None, help="Rows per step (all runs)."),
    expansion_factor: Optional[int] = typer.Option(None, help="d_sae = N * d_in for every run (replaces d_sae)."),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda, cuda:N."),
    resident: Optional[str] = typer.Option(None, help="Hold the cache's split on the device and read the disk once: auto (when it fits), yes, no."),
    precision: Optional[str] = typer.Option(None, help="auto (bf16 on CUDA, fp32 on CPU), fp32, tf32 or bf16."),
    kernels: Optional[str] = typer.Option(None, help="auto (the faster per device), fused or plain."),
    name: Optional[str] = typer.Option(None, help="Sweep name (W&B group); default: the TOML's name or file name."),
    resume: Optional[bool] = typer.Option(None, "--resume/--no-resume", help="Continue the sweep in --out."),
    wandb: Optional[bool] = typer.Option(None, "--wandb/--no-wandb", help="W&B, one run per SAE (offline without a key)."),
    memory_gb: Optional[float] = typer.Option(None, help="Memory the sweep may plan for (default: 90% of free)."),
    with_eval: bool = typer.Option(False, "--eval/--no-eval",
                                   help="Also CE loss recovered and KL per SAE (`pipeline eval`)."),
    eval_contexts: int = typer.Option(64, help="Eval-split contexts for --eval."),
    skip_bad_shards: Optional[bool] = typer.Option(None, "--skip-bad-shards",
                                                   help="Leave out shards that fail their checksum instead of stopping."),
    import_module: Optional[List[str]] = typer.Option(None, "--import", help="Module that registers architectures."),
) -> None:
    """Stage 2: many SAEs from one pass over a cache; summary.csv and pareto.png at the end.

    An option given here overrides the TOML's [base] and every run; the defaults shown apply where neither sets it.
    """
    import importlib
    from pathlib import Path

    from trainer.sweep import load_sweep_spec, run_sweep

    for module in import_module or []:
        importlib.import_module(module)
    spec = load_sweep_spec(config)
    overrides = {k: v for k, v in dict(cache=cache, out=out, tokens=tokens, batch_size=batch_size, device=device,
                                        resident=resident, precision=precision, kernels=kernels, resume=resume,
                                        wandb=wandb, expansion_factor=expansion_factor,
                                        skip_bad_shards=skip_bad_shards).items() if v is not None}
    evaluate_runs = None
    if with_eval:
        from analysis.evaluate_ce import ce_columns
        from trainer.run import TrainConfig

        evaluate_runs = ce_columns(cache or spec.get("base", {}).get("cache") or TrainConfig.cache, eval_contexts)
    rows = run_sweep(spec, overrides, name=name or spec.get("name") or Path(config).stem,
                     memory_budget=int(memory_gb * 2**30) if memory_gb else None, evaluate_runs=evaluate_runs)
    ok = sum(r["status"] == "ok" for r in rows)
    _finished(f"sweep done: {ok} of {len(rows)} runs ok; summary in {Path(out or spec.get('base', {}).get('out', 'runs/default')) / 'summary.csv'}")


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
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Also write the results as JSON to this file."),
) -> None:
    """Stage 2: CE loss recovered (zero and mean ablation) and KL of an SAE spliced into the cache's model."""
    overrides = {k: v for k, v in dict(locals()).items() if v is not None}  # first, before any import
    from analysis.evaluate_ce import EvalConfig, run_eval

    run_eval(EvalConfig(**overrides))


@app.command(cls=HelpCommand)
def report(
    sae: str = typer.Argument(..., help="SAE directory (cfg.json + sae_weights.safetensors; ours or SAELens's)."),
    cache: str = typer.Option(..., help="Cache to read activations and contexts from."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Directory for index.html."),
    split: Optional[str] = typer.Option(None, help="Split to stream over."),
    hook: Optional[str] = typer.Option(None, help="Hook to read (default: the SAE's hook_name)."),
    latents: Optional[str] = typer.Option(None, help="Latents to show: 1,2,3 (default: chosen by --select)."),
    n_latents: Optional[int] = typer.Option(None, help="How many latents to show."),
    select: Optional[str] = typer.Option(None, help="top (densest), random (live), or mixed (half each)."),
    contexts: Optional[int] = typer.Option(None, help="Top-activating contexts per latent."),
    left: Optional[int] = typer.Option(None, help="Tokens shown before the activating token."),
    right: Optional[int] = typer.Option(None, help="Tokens shown after it."),
    max_rows: Optional[int] = typer.Option(None, help="Stop the pass after this many rows (default: all)."),
    ce_contexts: Optional[int] = typer.Option(None, help="Also run `pipeline eval` on N contexts for the summary."),
    seed: Optional[int] = typer.Option(None, help="Seed of the random choice of latents."),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda, cuda:N."),
) -> None:
    """Stage 2: a static HTML page (densities, L0, top contexts per latent) to look at an SAE."""
    overrides = {k: v for k, v in dict(locals()).items() if v is not None}  # first, before any import
    from analysis.report import ReportConfig, build_report, parse_latents

    overrides["latents"] = parse_latents(latents)
    page = build_report(ReportConfig(**{k: v for k, v in overrides.items() if v is not None}))
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
    from pipeline import hub

    config = hub.PushConfig(max_commit_files=max_commit_files, max_commit_bytes=int(max_commit_mb * 2**20),
                            verify=verify, overwrite=overwrite)
    if dry_run:
        plan = hub.plan(path, repo_id, config)
        for i, commit in enumerate(plan.commits):
            typer.echo(f"commit {i + 1}: {len(commit.files)} files, {commit.bytes / 2**20:,.2f} MiB  {commit.message}")
        typer.echo(plan.card)
        return
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

    pull_cache(repo_id, out, hooks=hook or None, split=split, shards=shards, revision=revision, log=typer.echo)


def _resume_command() -> str:
    """This command line with --resume: what continues a run that stopped."""
    import shlex

    prog = sys.argv[0]
    prog = [sys.executable, "-m", "pipeline"] if prog.endswith("__main__.py") else [prog]
    args = sys.argv[1:] + ([] if "--resume" in sys.argv[1:] else ["--resume"])
    return shlex.join(prog + args)


def main() -> None:
    from pipeline.malloc import tune_malloc
    from trainer.interrupt import Interrupted

    tune_malloc()
    try:
        app()
    except PipelineError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except Interrupted as e:
        typer.echo(f"{e}; resume with: {_resume_command()}" if e.checkpoint else str(e), err=True)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
