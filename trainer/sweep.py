"""`pipeline sweep`: many SAEs from one pass over a cache.

A sweep TOML has a `[base]` table (any `pipeline train` field) and either a `[sweep]` table of
lists, whose product gives the runs, or a list of `[[runs]]` tables of overrides. Every batch is
read once and steps every run: runs of one architecture and shape (and, for the TopK family, one
k) form one stack (the trainer's R dimension, one batched matmul for all of them); different ones
form separate stacks stepped on the same batch. Each run stops at its own token budget, a run that
fails (bad config, NaN/Inf) is reported and the others go on, and the whole sweep checkpoints and
resumes as one.

    OUT/<run>/            the run's export (cfg.json, sae_weights, sparsity), summary.json, metrics.jsonl
    OUT/<set>/layer_<l>/  a per-layer transcoder set's runs (`layers`), one per layer, as any run's;
    OUT/<set>/            and the set in circuit-tracer's format (config.yaml, layer_<l>.safetensors)
    OUT/_sweep/checkpoint every stack, the loader position and the step, written atomically
    OUT/summary.csv       one row per run; OUT/pareto.png: explained variance against L0
"""

from __future__ import annotations

import csv
import itertools
import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

import torch

from pipeline import distributed
from pipeline.config import check_fields, exclusive_fields, layer, load_toml
from pipeline.errors import PipelineError
from pipeline.loader import ActivationLoader, open_source
from pipeline.lock import DirLock, refuse_file_in_way, refuse_inside_cache
from pipeline.verify import refuse_inconsistent
from trainer.checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint, truncate_metrics
from trainer.distributed import spread_stacks
from pipeline.console import log_console
from trainer.logs import ConsoleLog, WandbLog
from trainer.plots import write_pareto
from trainer.registry import get_architecture
from trainer.memory import available_bytes, resident_budget, size, stack_bytes, stacks_bytes
from trainer.run import (ARCH_FIELDS, SplitRows, TrainConfig, arch_fields, calibrate, controlled_target, evaluate,
                         export_metadata, finish_export, relevant_field, resolve_target, resolve_width, resolved_lr,
                         run_config, say_if_fresh, sparsity_knob, wandb_config, warn_if_incomplete, weight_identity)
from trainer.target_l0 import COEFFICIENTS, final_coefficients
from trainer.train import LoopConfig, Stack, StackTrainer, fit

# Fields that must be one value for the whole sweep: one loader pass feeds every run.
SWEEP_WIDE = ("cache", "out", "batch_size", "device", "resident", "normalize", "log_every", "checkpoint_every",
              "resume",
              "wandb", "wandb_project", "eval_every", "eval_tokens", "n_snapshots", "snapshot_spacing", "ddp",
              "skip_bad_shards")
# Fields a stack's runs must share (its shape and the loop's schedule); others may differ per run.
STACK_SHARED = ("arch", "hook", "hook_out", "skip", "d_sae", "l1_warmup_steps", "lr_warmup_steps", "lr_decay",
                "b_dec_init", "init_scale_search", "k_anneal_steps", "init_from", "precision", "kernels")
# Fields a stack pays its largest value of for every run (the TopK family selects and decodes the
# stack's largest k for all of its runs), so runs that differ in them are not stacked where the
# architecture has them: on the 2-core CPU of BENCHMARKS.md, 4 TopK runs of k = 16..128 (d_sae 1024)
# took 564 ms a step as one stack against 342 ms as four, while four runs of one k stack at
# 220 ms against 263 ms.
STACK_BY_COST = ("k", "initial_k")
# Defaults of a sweep over `pipeline train`'s: its runs' folders apart from `make train`'s runs/default.
SWEEP_DEFAULTS = {"out": "runs/sweep"}
# Fields that name a run when they vary across the sweep, with their short labels.
LABELS = {"arch": "", "hook": "", "d_sae": "d", "k": "k", "l1": "l1_", "l0": "l0_", "lr": "lr", "seed": "s",
          "tokens": "t", "initial_k": "k0_", "target_l0": "l0target"}


@dataclass
class SweepPlan:
    """The runs of a sweep, grouped into stacks, and the runs refused before starting."""

    name: str
    """The sweep's name (W&B group)."""
    base: TrainConfig
    """Sweep-wide settings."""
    runs: list[TrainConfig] = field(default_factory=list)
    """Every run, with its name set."""
    stacks: list[list[int]] = field(default_factory=list)
    """Indices into `runs`, one list per stack."""
    refused: dict[str, str] = field(default_factory=dict)
    """Run name -> why it cannot run (a bad config)."""
    sets: dict[str, dict[int, str]] = field(default_factory=dict)
    """Per-layer transcoder sets: set name -> {layer: its run's name} (OUT/<set>/layer_<l>)."""


def expand_runs(spec: dict, overrides: dict) -> tuple[TrainConfig, list[TrainConfig]]:
    """Base config and the run configs of a sweep spec (the parsed TOML); `overrides` (command-line
    values that are not None) apply to the base and to every run."""
    pairs = exclusive_fields(TrainConfig)
    base_data = SWEEP_DEFAULTS | dict(spec.get("base", {}))
    lists = dict(spec.get("sweep", {}))
    explicit = spec.get("runs", [])
    check_fields(base_data, TrainConfig, "[base]")
    check_fields(lists, TrainConfig, "[sweep]")
    for key, values in lists.items():
        if not isinstance(values, list) or not values:
            raise PipelineError(f"[sweep] {key} must be a non-empty list, got {values!r}")
        if key in SWEEP_WIDE:
            raise PipelineError(f"[sweep] cannot vary {key}: one loader pass feeds every run; run separate sweeps")
    if lists and explicit:
        raise PipelineError("give either a [sweep] table of lists or [[runs]] tables, not both")
    base_data = layer({}, base_data, pairs, "[base]")
    base = TrainConfig(**layer(base_data, overrides, pairs, "the command line"))
    if explicit:
        combos = []
        for i, r in enumerate(explicit):
            check_fields(r, TrainConfig, f"[[runs]] #{i + 1}")
            combos.append((r, f"[[runs]] #{i + 1}"))
    else:
        keys = list(lists)
        combos = [(dict(zip(keys, values)), "[sweep]") for values in itertools.product(*(lists[k] for k in keys))]
    runs = [TrainConfig(**layer(layer(base_data, c, pairs, where), overrides, pairs, "the command line"))
            for c, where in combos] or [base]
    return base, runs


def name_runs(runs: list[TrainConfig]) -> list[TrainConfig]:
    """Give each run a readable name from the fields that vary (e.g. `topk-d1024-k32-lr0.001`), and
    drop runs that only differ in fields irrelevant to their architecture (k of a standard SAE)."""
    varying = [f.name for f in fields(TrainConfig)  # an expansion factor shows as its d_sae
               if f.name not in ("name", "expansion_factor")
               and len({json.dumps(getattr(r, f.name)) for r in runs}) > 1]
    out, seen = [], set()
    for r in runs:
        key = json.dumps({k: v for k, v in asdict(r).items() if k == "name" or relevant_field(r, k)}, sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        if r.name is None:
            parts = [r.arch] + [(k if getattr(r, k) else "") if isinstance(getattr(r, k), bool)  # skip: named when on
                                else f"{LABELS.get(k, k + '_')}{getattr(r, k):g}" if isinstance(getattr(r, k), float)
                                else f"{LABELS.get(k, k + '_')}{getattr(r, k)}"
                                for k in varying if k != "arch" and relevant_field(r, k)
                                and getattr(r, k) is not None]  # unset: the architecture's default
            parts = [p for p in parts if p]
            r = replace(r, name="-".join(str(p) for p in parts) if len(parts) > 1 else r.run_name())
        out.append(r)
    names = [r.name for r in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise PipelineError(f"runs {', '.join(dupes)} have the same name; give each a distinct `name`")
    return out


def plan_sweep(spec: dict, overrides: dict, name: str, d_in: dict[str, int]) -> SweepPlan:
    """Expand, name, validate and group the runs. `d_in` maps the cache's hooks to their widths;
    a run whose model cannot be built (k > d_sae, unknown hook...) is refused, the rest go on."""
    base, runs = expand_runs(spec, overrides)
    plan = SweepPlan(name=name, base=base)
    default_hook = next(iter(d_in)) if len(d_in) == 1 else None
    runs = [replace(r, hook=r.hook or default_hook) for r in runs]
    runs = [resolve_width(r, d_in.get(r.hook)) for r in runs]  # before naming: names show d_sae
    for r in name_runs(runs):
        try:
            members = expand_set(r, d_in) if r.layers is not None else [r]
            for m in members:
                if m.hook not in d_in:
                    raise PipelineError(f"hook {m.hook!r} is not in the cache; it has {', '.join(d_in)}")
                if m.hook_out is not None and m.hook_out not in d_in:
                    raise PipelineError(f"hook_out {m.hook_out!r} is not in the cache; it has {', '.join(d_in)}")
                get_architecture(m.arch)(arch_config(m, d_in))  # its own checks (k <= d_sae, ...)
        except PipelineError as e:
            plan.refused[r.name] = str(e)
            continue
        if r.layers is not None:
            plan.sets[r.name] = {int(m.name.rsplit("_", 1)[1]): m.name for m in members}
        plan.runs.extend(resolve_target(m) for m in members)
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(plan.runs):
        # The resolved k (a target L0 sets it), where the architecture has one.
        key = [getattr(r, k) for k in STACK_SHARED] + [getattr(r, k) if ARCH_FIELDS[k] in arch_fields(r.arch)
                                                       else None for k in STACK_BY_COST]
        groups.setdefault(json.dumps(key), []).append(i)
    plan.stacks = list(groups.values())
    return plan


def arch_config(r: TrainConfig, d_in: dict[str, int]):
    """Run `r`'s architecture config, its widths read from the cache's hooks (`d_in`: hook -> width)."""
    return run_config(r, d_in[r.hook], d_in[r.hook_out] if r.hook_out is not None else None)


LAYER = "{layer}"
"""What names each layer's hook in a per-layer set's `hook` and `hook_out`."""


def set_layers(r: TrainConfig, d_in: dict[str, int]) -> list[int]:
    """The layers of set `r`: its list, or for "all" every layer whose two hooks the cache holds."""
    if r.hook is None or r.hook_out is None or LAYER not in r.hook or LAYER not in r.hook_out:
        raise PipelineError(f"a per-layer set (layers) needs hook and hook_out naming each layer's with {LAYER}, "
                            f"e.g. hook = \"blocks.{LAYER}.ln2.hook_normalized\", hook_out = "
                            f"\"blocks.{LAYER}.hook_mlp_out\"; got hook {r.hook!r}, hook_out {r.hook_out!r}")
    if r.layers == "all":
        found = [int(h[len(pre):-len(post) or None]) for h in d_in
                 for pre, post in [r.hook.split(LAYER, 1)] if h.startswith(pre) and h.endswith(post)
                 and h[len(pre):len(h) - len(post)].isdigit()]
        layers = sorted(n for n in found if r.hook_out.replace(LAYER, str(n)) in d_in)
        if not layers:
            raise PipelineError(f"the cache has no layer with both {r.hook} and {r.hook_out}; its hooks: "
                                f"{', '.join(d_in)} (`pipeline cache --preset mlp` writes every layer's MLP input "
                                "and output)")
        return layers
    if not (isinstance(r.layers, list) and r.layers and all(isinstance(n, int) and n >= 0 for n in r.layers)):
        raise PipelineError(f"layers must be \"all\" or a list of layer numbers, got {r.layers!r}")
    if r.layers != sorted(set(r.layers)):
        raise PipelineError(f"layers {r.layers} must increase, each once; e.g. {sorted(set(r.layers))}")
    return list(r.layers)


def expand_set(r: TrainConfig, d_in: dict[str, int]) -> list[TrainConfig]:
    """A per-layer set's runs, one per layer (`<set>/layer_<l>`), each reading its layer's hooks; every
    layer's hooks must be in the cache and as wide as the first layer's (a set has one shape)."""
    runs = []
    for n in set_layers(r, d_in):
        m = replace(r, name=f"{r.name}/layer_{n}", layers=None, hook=r.hook.replace(LAYER, str(n)),
                    hook_out=r.hook_out.replace(LAYER, str(n)))
        missing = [h for h in (m.hook, m.hook_out) if h not in d_in]
        if missing:
            raise PipelineError(f"layer {n}'s {' and '.join(missing)} not in the cache; it has {', '.join(d_in)}")
        runs.append(m)
    first = runs[0]
    for m in runs[1:]:
        for key, name in (("hook", "d_in"), ("hook_out", "d_out")):
            a, b = getattr(first, key), getattr(m, key)
            if d_in[a] != d_in[b]:
                raise PipelineError(f"{name} differs across the set's layers: {b} is {d_in[b]} wide, {a} is "
                                    f"{d_in[a]}; a set's layers share one shape (split it into sets of equal widths)")
    return runs


def check_memory(plan: SweepPlan, d_in: dict[str, int], budget: int, device: torch.device | str = "cpu") -> int:
    """Refuse a sweep whose stacks would not fit in `budget` bytes, saying how many runs would;
    returns the bytes the sweep plans for."""
    def need(stacks: list[list[int]]) -> int:
        plans = []
        for idx in stacks:
            r = plan.runs[idx[0]]
            plans.append(stack_bytes(r.arch, [arch_config(plan.runs[i], d_in) for i in idx],
                                     plan.base.batch_size, r.precision, device, r.kernels))
        return stacks_bytes(plans)

    total = need(plan.stacks)
    if total <= budget:
        return total
    fit, order = 0, [i for idx in plan.stacks for i in idx]
    for n in range(1, len(order) + 1):
        groups: dict[int, list[int]] = {}
        for i in order[:n]:
            groups.setdefault(next(s for s, idx in enumerate(plan.stacks) if i in idx), []).append(i)
        if need(list(groups.values())) > budget:
            break
        fit = n
    raise PipelineError(f"the sweep needs about {size(total)} for {len(order)} runs but {size(budget)} is "
                        f"available: {fit} of its runs fit; lower d_sae or --batch-size, or split the sweep")


def run_sweep(spec: dict, overrides: dict, name: str = "sweep", memory_budget: int | None = None,
              max_steps: int | None = None, evaluate_runs: Callable | None = None) -> list[dict]:
    """Train every run of the sweep; returns one summary row per run (refused runs included).
    `evaluate_runs(rows, out, device)`, when given, adds columns to the rows of the exported runs
    before the summary is written (`pipeline sweep --eval` passes analysis.evaluate_ce.ce_columns:
    CE loss recovered and KL, which need the language model, a layer above this package)."""
    cfg0, _ = expand_runs(spec, overrides)
    # Under torchrun the sweep's stacks are spread over the ranks, each with its own loader over the
    # whole cache (the batches a single process would see); rank 0 writes the summary of all.
    world, rank = distributed.init(cfg0.device), distributed.rank()
    device = torch.device(distributed.device_for(cfg0.device))
    refuse_inconsistent(cfg0.cache)
    d_in = dict(open_source(cfg0.cache).hooks)
    plan = plan_sweep(spec, overrides, name, d_in)
    base, out = plan.base, Path(plan.base.out)
    refuse_inside_cache(out)
    refuse_file_in_way(out)
    if base.ddp:
        raise PipelineError("a sweep spreads its SAEs over the ranks and trains each in one process; "
                            "drop ddp (it is for `pipeline train`)")
    for run_name, why in plan.refused.items():
        if rank == 0:
            print(f"refused {run_name}: {why}", flush=True)
    if not plan.runs:
        raise PipelineError("no run of the sweep can start: " + "; ".join(f"{k}: {v}" for k, v in plan.refused.items()))
    costs = [sum(plan.runs[i].d_sae * max(plan.runs[i].tokens, 1) for i in idx) for idx in plan.stacks]
    mine = spread_stacks(plan.stacks, costs, world)[rank]
    if not mine:  # more ranks than stacks: nothing to train here, only the summary to join
        return _summarize([], plan, out)
    planned = check_memory(replace(plan, stacks=mine), d_in,
                           memory_budget if memory_budget is not None else int(0.9 * available_bytes(device)), device)

    hooks = sorted({h for idx in mine for i in idx for h in (plan.runs[i].hook, plan.runs[i].hook_out) if h})
    # What the plan leaves free may hold the cache: then the disk is read once for every run and epoch.
    budget = resident_budget(device, planned)
    loader = ActivationLoader(base.cache, hooks=hooks, batch_size=base.batch_size, seed=base.seed, device=device,
                              tokens=max(plan.runs[i].tokens for idx in mine for i in idx), normalize=base.normalize,
                              resident=base.resident, resident_budget=budget, skip_bad_shards=base.skip_bad_shards)
    budget -= loader.resident_bytes if loader.resident else 0
    warn_if_incomplete(loader.source, base.cache)
    stacks = []
    for idx in mine:
        runs = [plan.runs[i] for i in idx]
        cls = get_architecture(runs[0].arch)
        model = cls([arch_config(r, d_in) for r in runs]).to(device)
        loop = LoopConfig(lr=[resolved_lr(r) for r in runs], max_grad_norm=[r.max_grad_norm for r in runs],
                          lr_warmup_steps=runs[0].lr_warmup_steps, lr_decay=runs[0].lr_decay,
                          b_dec_init=runs[0].b_dec_init, init_scale_search=runs[0].init_scale_search,
                          precision=runs[0].precision, kernels=runs[0].kernels,
                          total_steps=max(math.ceil(r.tokens / base.batch_size) for r in runs),
                          target_l0=[controlled_target(r) for r in runs])  # per run: None where k is set
        trainer = StackTrainer(model, loop, [math.ceil(r.tokens / base.batch_size) for r in runs])
        stacks.append(SweepStack(trainer, read=_reader(runs[0].hook, runs[0].hook_out), runs=runs, hook=runs[0].hook,
                                 hook_out=runs[0].hook_out))
    if any(r.init_from for s in stacks for r in s.runs):
        from trainer.export import init_from

        for s in stacks:
            for j, r in enumerate(s.runs):
                if r.init_from:
                    init_from(s.trainer.model, r.init_from, run=j, input_scale=loader.scale[s.hook],
                              output_scale=loader.scale[s.hook_out] if s.hook_out else None)

    sweep_dir = out / "_sweep" if world == 1 else out / "_sweep" / f"rank-{rank:05d}-of-{world:05d}"
    with DirLock(sweep_dir, "pipeline sweep"):
        if (sweep_dir / CHECKPOINT).exists() and not base.resume:
            raise PipelineError(f"{out} holds a sweep checkpoint; pass --resume to continue it or choose another --out")
        if base.resume and rank == 0:
            say_if_fresh(sweep_dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        parts = {f"s{i}": (s.trainer.model, s.trainer.opt) for i, s in enumerate(stacks)}
        # One flat dict, so a mismatch is named as `<run>.<field>`; runs in stack order (the checkpoint's).
        identity = {f"{r.name}.{k}": v for s in stacks for r in s.runs for k, v in weight_identity(r).items()}
        resumed = load_checkpoint(sweep_dir, parts, identity)
        tokens = 0
        if resumed:
            loader.load_state_dict(resumed["loader"])
            for i, s in enumerate(stacks):
                s.trainer.load_state(resumed["stacks"][i], resumed["tensors"].get(f"s{i}"))
            tokens = resumed["tokens"]
        run_dirs = [out / r.name for s in stacks for r in s.runs]
        for d in run_dirs:
            d.mkdir(parents=True, exist_ok=True)
            truncate_metrics(d / "metrics.jsonl", tokens)  # lines past the checkpoint come again
        all_runs = [r for s in stacks for r in s.runs]
        console = ConsoleLog(max(r.tokens for r in all_runs), description=name, run_names=[r.name for r in all_runs],
                             total_steps=max(math.ceil(r.tokens / base.batch_size) for r in all_runs))
        console.progress(max(s.trainer.step for s in stacks), tokens)
        wandb_log = (WandbLog(base.wandb_project, [r.name for r in all_runs],
                              [wandb_config(r, loader.source, r.hook) for r in all_runs], run_dirs, group=name,
                              resume=bool(resumed)) if base.wandb else None)

        def checkpoint(step: int, seen: int) -> None:
            save_checkpoint(sweep_dir, parts, {"step": step, "tokens": seen, "loader": loader.state_dict(),
                                               "config": identity, "stacks": [s.trainer.state() for s in stacks]},
                            {f"s{i}": s.trainer.tensors() for i, s in enumerate(stacks)})

        io = {s.io for s in stacks}
        held = ({h: SplitRows(base, h, device, io_scales(loader, h), base.eval_tokens, resident="auto",
                              budget=budget // len(io)) for h in io}
                if base.eval_every and loader.source.shards("eval") else None)
        start_tokens = tokens

        def on_log(step: int, seen: int, tokens_per_s: float) -> None:
            _log_runs({"step": step, "tokens": seen, "tokens_per_s": tokens_per_s}, stacks, out, console, wandb_log)

        try:
            tokens = fit(stacks, loader, log_every=base.log_every, on_log=on_log, init=not resumed, tokens=tokens,
                         evaluator=(lambda st: evaluate(st.trainer.model, held[st.io])[0]) if held else None,
                         eval_every=base.eval_every, checkpoint=checkpoint, checkpoint_every=base.checkpoint_every,
                         checkpoint_path=sweep_dir / CHECKPOINT, max_steps=max_steps, after=console.progress)
            console.close()
            rows = _finish(stacks, base, hooks, device, loader, out, name, tokens - start_tokens, plan, evaluate_runs)
            if wandb_log:
                wandb_log.summary([r for r in rows if r["status"] != "refused"])
        finally:
            console.close()
            if wandb_log:
                wandb_log.close()
        return rows


@dataclass
class SweepStack(Stack):
    """A stack of the sweep: its runs' configs, the hook it reads and a transcoder's output hook."""

    runs: list = field(default_factory=list)
    hook: str = ""
    hook_out: str | None = None

    @property
    def io(self) -> str | tuple[str, str]:
        """What it reads and reconstructs: its hook, or a transcoder's (input, output) hooks."""
        return self.hook if self.hook_out is None else (self.hook, self.hook_out)


def io_scales(loader: ActivationLoader, io: str | tuple[str, str]) -> float | tuple[float, float]:
    """The loader's normalisation factor of each hook of `io` (`SweepStack.io`)."""
    return loader.scale[io] if isinstance(io, str) else tuple(loader.scale[h] for h in io)


def _reader(hook: str, hook_out: str | None = None) -> Callable:
    """How a stack reads its hook from the loader's batches (a dict of hooks, or one hook's tensor), with
    a transcoder's target (its output hook) or None."""
    if hook_out is not None:
        return lambda batch: (batch[hook], batch[hook_out])
    return lambda batch: (batch[hook] if isinstance(batch, dict) else batch, None)


def _merge(line: dict, m: dict) -> dict:
    """Concatenate per-run lists of several stacks (in stack order) into one line."""
    out = dict(line)
    offset = len(line.get("mse", []))
    for k, v in m.items():
        if k == "failed":
            out[k] = out.get(k, []) + [offset + i for i in v]
        elif isinstance(v, list):
            out[k] = out.get(k, [None] * offset) + v
        else:
            out.setdefault(k, v)
    return out


def _log_runs(line: dict, stacks: list[dict], out: Path, console: ConsoleLog, wandb_log: WandbLog | None) -> None:
    """A line of the stacks that logged at this step; stacks that did not are padded with their last values."""
    full: dict = {}
    for s in stacks:
        m = s.last
        if not m:
            n = len(s.runs)
            m = {"mse": [float("nan")] * n, "explained_variance": [float("nan")] * n, "l0": [float("nan")] * n,
                 "dead_fraction": [float("nan")] * n, "dense_fraction": [float("nan")] * n, "failed": []}
        full = _merge(full, m)
    n_runs = sum(len(s.runs) for s in stacks)
    for k, v in full.items():  # a term only earlier stacks log (a coefficient, a threshold): None after
        if k != "failed" and isinstance(v, list) and len(v) < n_runs:
            v.extend([None] * (n_runs - len(v)))
    full.update({k: line[k] for k in ("step", "tokens", "tokens_per_s")})
    console(full)
    if wandb_log:
        wandb_log(full)
    names = [r.name for s in stacks for r in s.runs]
    for r, name in enumerate(names):
        with open(out / name / "metrics.jsonl", "a") as f:
            f.write(json.dumps({k: (v[r] if isinstance(v, list) and k != "failed" and len(v) == len(names) else v)
                                for k, v in full.items() if k != "failed"} | {"failed": r in full.get("failed", [])})
                    + "\n")


def _finish(stacks: list[dict], base: TrainConfig, hooks: list[str], device, loader, out: Path, name: str,
            tokens: int, plan: SweepPlan, evaluate_runs: Callable | None = None) -> list[dict]:
    """Eval every run on the eval split, export it, write summary.csv and pareto.png."""
    has_eval = bool(loader.source.shards("eval"))
    held = ({io: SplitRows(base, io, device, io_scales(loader, io), None) for io in {s.io for s in stacks}}
            if has_eval else None)
    rows = []
    for s in stacks:
        tr = s.trainer
        calibrate(tr.model, base, s.hook, device, loader.scale[s.hook])
        metrics, density = evaluate(tr.model, held[s.io]) if held else ({}, None)
        failed = set(tr.failed.nonzero().flatten().tolist())
        for j, r in enumerate(s.runs):
            per_run = {k: (v[j] if isinstance(v, list) else v) for k, v in metrics.items()}
            per_run["tokens_per_s"] = min(r.tokens, tokens) / s.seconds if s.seconds else None
            per_run["status"] = "failed (NaN/Inf)" if j in failed else "ok"
            per_run.update(final_coefficients(tr.model, j))
            metadata = {**export_metadata(r, loader.source, r.hook, r.name), "sweep": name}
            if r.hook_out is not None:
                metadata["hook_name_out"] = r.hook_out
            finish_export(tr.model, j, out / r.name, metadata, per_run, density, loader.scale[r.hook],
                          loader.scale[r.hook_out] if r.hook_out else None)
            rows.append(_row(r, per_run))
    _export_sets(plan, out)
    if evaluate_runs is not None:
        evaluate_runs(rows, out, str(device))
    return _summarize(rows, plan, out)


def _export_sets(plan: SweepPlan, out: Path) -> None:
    """Each per-layer set whose every layer was trained here, also in circuit-tracer's format
    (OUT/<set>/config.yaml, layer_<l>.safetensors); a set it cannot read (TopK) is said in one line."""
    from trainer.export_circuit_tracer import write_transcoder_set

    for set_name, layers in plan.sets.items():
        if not all((out / run / "cfg.json").is_file() for run in layers.values()):
            continue  # another rank's, or not exported
        try:
            write_transcoder_set(out / set_name, {n: out / run for n, run in layers.items()})
        except PipelineError as e:
            log_console().print(f"set {set_name}: no circuit-tracer files ({e}); its layers are in SAELens's format "
                                f"in {out / set_name}/layer_*", markup=False, highlight=False)


def _summarize(rows: list[dict], plan: SweepPlan, out: Path) -> list[dict]:
    """Every rank's rows in the order one process gives (stack by stack), then the refused runs;
    rank 0 writes summary.csv and pareto.png. Returns all rows on every rank."""
    order = {plan.runs[i].name: n for n, i in enumerate(i for idx in plan.stacks for i in idx)}
    rows = sorted((r for part in distributed.all_gather(rows) for r in part), key=lambda r: order[r["run"]])
    for run_name, why in plan.refused.items():
        rows.append({"run": run_name, "status": f"refused: {why}"})
    if distributed.is_main():
        write_summary(rows, out)
    return rows


def _row(r: TrainConfig, m: dict) -> dict:
    knob = sparsity_knob(r)
    # A run steered to a target L0 shows the coefficient its controller ended at.
    ended = next((m[c] for c in COEFFICIENTS if c in m), None)
    sparsity = ended if controlled_target(r) is not None and ended is not None else knob[1] if knob else None
    return {"run": r.name, "arch": r.arch, "hook": r.hook, "d_sae": r.d_sae, "target_l0": r.target_l0,
            "k_or_coefficient": sparsity, "lr": resolved_lr(r), "l0": m.get("eval_l0"),
            "explained_variance": m.get("eval_explained_variance"),
            "dead_fraction": m.get("eval_dead_fraction"), "tokens_per_s": m.get("tokens_per_s"),
            "status": m["status"]}


COLUMNS = ["run", "arch", "hook", "d_sae", "target_l0", "k_or_coefficient", "lr", "l0", "explained_variance",
           "dead_fraction", "tokens_per_s", "status"]
# Added by `pipeline sweep --eval` (the SAE spliced into the cache's model).
EVAL_COLUMNS = ["ce_recovered_zero", "ce_recovered_mean", "kl"]


# The printed table's headers, short: the table fits a 110-column terminal or log line.
HEADERS = {"d_sae": "d_sae", "target_l0": "target L0", "k_or_coefficient": "k/coef", "l0": "L0",
           "explained_variance": "EV", "dead_fraction": "dead", "tokens_per_s": "tok/s",
           "ce_recovered_zero": "CE rec (zero)", "ce_recovered_mean": "CE rec (mean)", "kl": "KL"}


def summary_table(rows: list[dict], columns: list[str], title: str):
    """The printed summary (a rich Table): a column every run has the same value in is said once in
    the caption, an empty one is left out, a refused run's reason stays in the CSV."""
    from rich import box
    from rich.table import Table

    ran = [r for r in rows if not str(r.get("status", "")).startswith("refused")] or rows
    same = {c: ran[0].get(c) for c in columns if c not in ("run", "status") and len(ran) > 1
            and len({json.dumps(r.get(c)) for r in ran}) == 1}
    shown = [c for c in columns if c not in same and any(r.get(c) is not None for r in rows)]
    def cell(c: str, v) -> str:
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:,.0f}" if c == "tokens_per_s" else f"{v:.4g}"
        return str(v).split(":")[0]

    caption = ", ".join(f"{HEADERS.get(c, c)} {cell(c, v)}" for c, v in same.items() if v is not None)
    table = Table(title=title, caption=f"every run: {caption}" if caption else None, box=box.SIMPLE_HEAD,
                  caption_justify="left", title_justify="left", pad_edge=False)
    for c in shown:
        table.add_column(HEADERS.get(c, c), justify="right" if c not in ("run", "arch", "hook", "status") else "left")
    for r in rows:
        table.add_row(*[cell(c, r.get(c)) for c in shown])
    return table


def write_summary(rows: list[dict], out: Path) -> None:
    """OUT/summary.csv, a printed table, and OUT/pareto.png (explained variance against L0 by architecture)."""
    columns = COLUMNS + [c for c in EVAL_COLUMNS if any(c in r for r in rows)]
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c) for c in columns})
    log_console().print(summary_table(rows, columns, f"sweep summary ({out / 'summary.csv'})"))
    write_pareto(rows, out)


def load_sweep_spec(path: str | Path) -> dict:
    """The sweep TOML (see the module docstring)."""
    spec = load_toml(path)
    unknown = sorted(set(spec) - {"base", "sweep", "runs", "name"})
    if unknown:
        raise PipelineError(f"unknown table(s) {', '.join(unknown)} in {path}; a sweep has [base], [sweep] or "
                            "[[runs]], and an optional name")
    return spec
