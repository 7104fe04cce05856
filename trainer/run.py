"""`pipeline train`: one SAE (a stack of one run) from a cache, evaluated on its eval split, exported.

`OUT/<name>/` gets everything of the run: the SAELens-format export (`cfg.json`,
`sae_weights.safetensors`, `sparsity.safetensors`), `metrics.jsonl`, `summary.json`, the resume
`checkpoint/`, snapshots kept along the way (`checkpoints/<tokens>/`, SAELens format) and W&B's
offline files.
"""

from __future__ import annotations

import json
import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from pipeline import __version__, distributed
from pipeline.config import check_sizes
from pipeline.errors import PipelineError
from pipeline.loader import ActivationLoader, LoaderState, open_source
from pipeline.lock import DirLock, refuse_file_in_way, refuse_inside_cache
from pipeline.manifest import manifest_hash
from pipeline.verify import refuse_inconsistent
from trainer.checkpoint import CHECKPOINT, has_checkpoint
from trainer.registry import get_architecture
from trainer.sae_topk import dead_tokens_threshold_for
from trainer.stack import StackedSAE
from trainer.target_l0 import COEFFICIENTS as COEFFICIENT_FIELDS, final_coefficients
from trainer.export import export_saelens, init_from
from pipeline.console import log_console
from trainer.logs import ConsoleLog, WandbLog
from trainer.memory import available_bytes, resident_budget, size, stack_bytes
from trainer.plots import write_training_curves
from trainer.distributed import RankBatches, data_parallel, loader_share
from trainer.train import LoopConfig, default_lr, train_stack


@dataclass
class TrainConfig:
    """Everything `pipeline train` takes; every field is a command-line option and a TOML key."""

    cache: str = "caches/default"
    """Cache directory to train on."""
    out: str = "runs/default"
    """Directory the run's folder goes in (OUT/<name>/)."""
    name: str | None = None
    """Run name (its folder and W&B name); default from arch, d_sae and k or l1."""
    hook: str | None = None
    """Hook to read; default: the cache's only hook."""
    hook_out: str | None = None
    """Transcoder: the hook to reconstruct from `hook` (the cache holds both); None: an SAE."""
    skip: bool = False
    """Transcoder: add a linear skip path W_skip (d_in x d_out) from input to output (a skip-transcoder)."""
    layers: list[int] | str | None = None
    """Sweeps: a per-layer set, one transcoder per layer, hook and hook_out naming each layer's with
    {layer}: "all" (every layer the cache has) or a list."""
    arch: str = "topk"
    """Registered architecture name."""
    d_sae: int = 1024
    """Number of latents."""
    expansion_factor: int | None = None
    """d_sae = N * d_in for an expansion factor N (SAELens's option); replaces d_sae (one settings layer gives one)."""
    k: int = 32
    """TopK: latents kept per token."""
    initial_k: int | None = None
    """TopK: anneal k down from this value (None: no annealing)."""
    k_anneal_steps: int = 0
    """TopK: steps over which k goes from initial_k to k."""
    l1: float | None = None
    """standard, gated: L1 coefficient (None: the architecture's default, 5 and 1)."""
    l1_warmup_steps: int = 0
    """standard, gated: L1 warm-up steps."""
    l0: float | None = None
    """jumprelu: L0 coefficient (None: the architecture's default)."""
    l0_warmup_steps: int = 0
    """jumprelu: L0 warm-up steps."""
    target_l0: float | None = None
    """The L0 to end at: sets k for topk, batchtopk and matryoshka; for standard, gated and jumprelu a
    controller steers the L1/L0 coefficient to it during training (starting from --l1/--l0 or the
    default; trainer.target_l0). None: the sparsity knobs as given."""
    arch_options: dict | None = None
    """Any other field of the architecture's config, e.g. {bandwidth = 0.1} (CLI: key=value,...)."""
    lr: float | None = None
    """Adam learning rate (None: 3e-3 at d_sae 2048, scaled by 1/sqrt(d_sae); trainer.train.default_lr)."""
    lr_warmup_steps: int | None = None
    """Linear lr warm-up steps (None: 5% of the run's steps)."""
    lr_decay: str = "linear"
    """After the warm-up: linear (constant, then to 0 over the last 20% of steps), cosine (to 10%) or constant."""
    max_grad_norm: float = 1.0
    """Per-run gradient clipping."""
    b_dec_init: str = "geometric_median"
    """b_dec from the first batch: geometric_median, mean or zeros."""
    init_scale_search: bool = True
    """Grid-search the initial weight scale on the first batch."""
    normalize: bool = False
    """Scale activations to mean norm sqrt(d_in) while training (folded back into the export)."""
    batch_size: int = 4096
    """Rows per step."""
    tokens: int = 4_000_000
    """Rows to train on (epochs repeat as needed)."""
    seed: int = 0
    """Seed of the weights and of the loader's shuffle."""
    device: str = "auto"
    """auto, cpu, cuda, ..."""
    resident: str = "auto"
    """Hold the cache's split on the device (GPU memory, or RAM on a CPU) and read the disk once:
    yes, no, or auto (when it fits next to the training's memory plan)."""
    precision: str = "auto"
    """fp32, tf32 or bf16 (autocast matmuls; float32 weights, Adam, losses, export); auto: bf16 on
    CUDA, fp32 on CPU."""
    kernels: str = "auto"
    """plain (autograd through the architecture's formulas), fused (its hand-written kernel) or auto
    (per device, the faster one)."""
    log_every: int = 50
    """Steps between metric lines."""
    eval_every: int = 0
    """Steps between eval-split metrics during training (a multiple of log_every; 0: only at the end)."""
    eval_tokens: int = 65_536
    """Eval-split rows used by the evaluations during training (the final one uses the whole split)."""
    checkpoint_every: int = 200
    """Steps between resume checkpoints (one is also written at the end; 0: only that one)."""
    n_snapshots: int = 0
    """Extra SAEs kept along the run (OUT/<name>/checkpoints/<tokens>/, SAELens format)."""
    snapshot_spacing: str = "log"
    """Spacing of the snapshots over the run's steps: log or linear."""
    resume: bool = False
    """Continue the run whose checkpoint is in OUT/<name> (a larger --tokens extends it)."""
    init_from: str | None = None
    """Start from a saved SAE (ours or SAELens's cfg.json + sae_weights.safetensors)."""
    wandb: bool = True
    """Log to W&B (offline when no API key is configured)."""
    wandb_project: str = "sae-cache-pipeline"
    """W&B project."""
    ddp: bool = False
    """Data-parallel under torchrun: each rank trains on its part of every --batch-size rows
    (trainer.distributed); rank 0 logs, checkpoints and exports."""
    skip_bad_shards: bool = False
    """Leave out shards that fail their checksum (saying which) instead of stopping the run."""

    # One settings layer (a TOML table, the command line) gives at most one of each pair; a higher
    # layer's one replaces a lower layer's other (pipeline.config.layer).
    EXCLUSIVE = (("d_sae", "expansion_factor"),)

    def __post_init__(self) -> None:
        check_sizes(self, positive=("d_sae", "k", "initial_k", "batch_size", "tokens", "log_every",
                                     "eval_tokens", "target_l0", "lr", "max_grad_norm"),
                    non_negative=("k_anneal_steps", "l1_warmup_steps", "l0_warmup_steps", "lr_warmup_steps",
                                  "eval_every", "checkpoint_every", "n_snapshots", "l1", "l0"))
        if self.eval_every and isinstance(self.log_every, int) and self.eval_every % self.log_every:
            fit = max(self.log_every, round(self.eval_every / self.log_every) * self.log_every)
            raise PipelineError(f"--eval-every {self.eval_every} must be a multiple of --log-every {self.log_every} "
                                f"(evaluations run at logging steps); e.g. --eval-every {fit}")

    def run_name(self) -> str:
        """The run's folder and W&B name: architecture, d_sae and its sparsity knob."""
        if self.name:
            return self.name
        controlled = controlled_target(self) is not None
        knob = ("l0target", self.target_l0) if controlled else sparsity_knob(resolve_target(self))
        return "-".join(p for p in (self.arch, "skip" if self.skip else "", f"d{self.d_sae}",
                                    f"{knob[0]}{knob[1]:g}" if knob else "") if p)


# TrainConfig field -> the architecture config's field it sets, where the architecture has it.
ARCH_FIELDS = {"k": "k", "initial_k": "initial_k", "k_anneal_steps": "k_anneal_steps", "l1": "l1_coefficient",
               "l1_warmup_steps": "l1_warmup_steps", "l0": "l0_coefficient", "l0_warmup_steps": "l0_warmup_steps"}


def arch_fields(arch: str) -> dict:
    """The dataclass fields of an architecture's config."""
    return getattr(get_architecture(arch).config_class, "__dataclass_fields__", {})


def controlled_target(cfg: TrainConfig) -> float | None:
    """The L0 a controller steers run `cfg`'s sparsity coefficient to (trainer.target_l0), or None
    (no target, or an architecture whose k the target sets)."""
    if cfg.target_l0 is None or "k" in arch_fields(cfg.arch):
        return None
    return float(cfg.target_l0)


def resolve_target(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with k = target_l0 where the architecture's sparsity is its k."""
    if cfg.target_l0 is None or "k" not in arch_fields(cfg.arch):
        return cfg
    if float(cfg.target_l0) != int(cfg.target_l0):
        raise PipelineError(f"target_l0 sets k for {cfg.arch}: give a whole number, got {cfg.target_l0:g}")
    return replace(cfg, k=int(cfg.target_l0))


def sparsity_knob(cfg: TrainConfig) -> tuple[str, float] | None:
    """(label, value) of what sets the run's sparsity: k, the L1 or the L0 coefficient."""
    names = arch_fields(cfg.arch)
    for field_name, label in (("k", "k"), ("l1_coefficient", "l1_"), ("l0_coefficient", "l0_")):
        if field_name in names:
            ours = next(k for k, v in ARCH_FIELDS.items() if v == field_name)
            value = getattr(cfg, ours)
            return label, value if value is not None else names[field_name].default
    return None


def run_config(cfg: TrainConfig, d_in: int, d_out: int | None = None):
    """The architecture's own config for this run: the TrainConfig fields it has, then arch_options.
    `d_out`: a transcoder's output width."""
    cls = get_architecture(cfg.arch)
    names = arch_fields(cfg.arch)
    cfg = resolve_target(cfg)
    if cfg.target_l0 is not None and "k" not in names and not set(COEFFICIENT_FIELDS) & set(names):
        raise PipelineError(f"architecture {cfg.arch!r} has neither k nor an L1/L0 coefficient: target_l0 cannot "
                            "set its sparsity")
    fields = {"d_in": d_in, "d_sae": cfg.d_sae, "seed": cfg.seed}
    if d_out is not None:
        if "d_out" not in names:
            raise PipelineError(f"architecture {cfg.arch!r} cannot be trained as a transcoder (--hook-out); "
                                "use topk, batchtopk, standard or jumprelu")
        fields["d_out"] = d_out
    if cfg.skip:
        if d_out is None:
            raise PipelineError("--skip adds a path from the input hook to the output hook: it needs a transcoder "
                                "(--hook-out)")
        fields["skip"] = True
    for ours, theirs in ARCH_FIELDS.items():
        if theirs in names and getattr(cfg, ours) is not None:
            fields[theirs] = getattr(cfg, ours)
    unknown = sorted(set(cfg.arch_options or {}) - set(names))
    if unknown:
        raise PipelineError(f"architecture {cfg.arch!r} has no option {', '.join(unknown)}; its fields: "
                            f"{', '.join(n for n in names if n not in ('d_in', 'd_sae'))}")
    if "dead_tokens_threshold" in names:
        fields["dead_tokens_threshold"] = dead_tokens_threshold_for(cfg.tokens)
    fields.update(cfg.arch_options or {})
    return cls.config_class(**fields)


def resolve_width(cfg: TrainConfig, d_in: int | None) -> TrainConfig:
    """`cfg` with d_sae = expansion_factor * d_in where an expansion factor is set (`d_in` None:
    the hook is unknown, left for the caller to refuse)."""
    factor = cfg.expansion_factor
    if factor is None or d_in is None:
        return cfg
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise PipelineError(f"expansion_factor must be a positive integer (d_sae = expansion_factor * d_in), "
                            f"got {factor!r}")
    return replace(cfg, d_sae=factor * d_in)


def build_model(cfg: TrainConfig, d_in: int, d_out: int | None = None) -> StackedSAE:
    """A stack of one run."""
    return get_architecture(cfg.arch)([run_config(cfg, d_in, d_out)])


def snapshot_steps(total_steps: int, n: int, spacing: str) -> list[int]:
    """`n` distinct steps in [1, total_steps), spaced linearly or logarithmically (dense early on,
    where an SAE changes fastest)."""
    if n <= 0 or total_steps < 2:
        return []
    if spacing == "linear":
        steps = [round(total_steps * (i + 1) / (n + 1)) for i in range(n)]
    elif spacing == "log":
        steps = [round(math.exp(math.log(total_steps) * (i + 1) / (n + 1))) for i in range(n)]
    else:
        raise PipelineError(f"unknown snapshot_spacing {spacing!r}; use log or linear")
    return sorted({min(max(1, s), total_steps - 1) for s in steps})


@torch.no_grad()
def evaluate(model: StackedSAE, batches, dense_threshold: float = 0.1) -> tuple[dict, torch.Tensor]:
    """Metrics per run over `batches` (any iterable, read once: the eval split streamed as tensors, or
    (input, target) pairs for a transcoder), and each latent's firing frequency (R, d_sae).
    Explained variance is against the split's own mean, from float64 running sums of the targets."""
    sq_err = l0 = fired = y_sum = y_sq = None
    rows = 0
    for b in batches:
        x, y = b if isinstance(b, (tuple, list)) else (b, b)
        latents = model.encode(x)
        recon = model.decode(latents, x)
        err = (y.unsqueeze(0) - recon).pow(2).sum(dim=(1, 2), dtype=torch.float64)
        # 0/1 floats straight from the comparison: a bool tensor's sum converts it to int64 first
        # (several times slower on CPU); exact up to 2**24 rows a batch.
        active = torch.gt(latents, 0, out=torch.empty_like(latents)).sum(dim=1).double()  # (R, d_sae)
        y64 = y.double()
        if rows == 0:
            sq_err, fired, l0 = err, active, active.sum(dim=1)
            y_sum, y_sq = y64.sum(dim=0), y64.pow(2).sum()
        else:
            sq_err, fired, l0 = sq_err + err, fired + active, l0 + active.sum(dim=1)
            y_sum, y_sq = y_sum + y64.sum(dim=0), y_sq + y64.pow(2).sum()
        rows += len(x)
    if rows == 0:
        raise PipelineError("nothing to evaluate: the split is empty")
    total = y_sq - y_sum.pow(2).sum() / rows  # sum of squared deviations from the split's mean
    density = (fired / rows).float().cpu()
    metrics = {"eval_explained_variance": (1 - sq_err / total).tolist(), "eval_mse": (sq_err / rows).tolist(),
               "eval_l0": (l0 / rows).tolist(), "eval_dead_fraction": (density == 0).float().mean(dim=1).tolist(),
               "eval_dense_fraction": (density > dense_threshold).float().mean(dim=1).tolist(), "eval_rows": rows}
    return metrics, density


class SplitRows:
    """The first `rows` rows (all when None) of a split, shuffled as the loader does and scaled as
    training sees them, streamed through the loader anew on each iteration (the same rows each time;
    never a whole split at once on the device): tensors for one hook, (input, target) pairs for a
    transcoder's two. `resident`/`budget` as the loader's (a periodic evaluation's rows then stay on
    the device)."""

    def __init__(self, cfg: TrainConfig, hook: str | tuple[str, str], device, scale: float | tuple[float, float],
                 rows: int | None, split: str = "eval", resident: str = "no", budget: int | None = None):
        self.hooks = [hook] if isinstance(hook, str) else list(hook)
        self.scales = list(scale) if isinstance(scale, (tuple, list)) else [scale]
        n = open_source(cfg.cache).rows(split)
        self.rows = rows if rows is not None and rows < n else None
        # A split smaller than a training batch is evaluated in batches of its own size.
        self.loader = ActivationLoader(cfg.cache, hooks=self.hooks[0] if len(self.hooks) == 1 else self.hooks,
                                       batch_size=min(cfg.batch_size, n), split=split, device=device,
                                       tokens=self.rows, drop_last=False, seed=cfg.seed + 1, resident=resident,
                                       resident_budget=budget, skip_bad_shards=cfg.skip_bad_shards)

    def __iter__(self):
        self.loader.state = LoaderState()  # from the start: every evaluation sees the same rows
        for b in self.loader:
            parts = [b] if len(self.hooks) == 1 else [b[h] for h in self.hooks]
            parts = [t * c if c != 1.0 else t for t, c in zip(parts, self.scales)]
            yield parts[0] if len(parts) == 1 else tuple(parts)


class PairedBatches:
    """A two-hook loader's batches as (input, target) pairs for a transcoder; its state is the loader's."""

    def __init__(self, loader: ActivationLoader, hook_in: str, hook_out: str):
        self.loader, self.hook_in, self.hook_out = loader, hook_in, hook_out

    def __iter__(self):
        return ((b[self.hook_in], b[self.hook_out]) for b in self.loader)

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)


def weight_identity(cfg: TrainConfig) -> dict:
    """The fields a run's weights depend on, which a resumed checkpoint must match; tokens may grow
    on resume (extending the run), the device and the logging may change."""
    return {k: v for k, v in asdict(cfg).items()
            if k not in ("out", "tokens", "device", "resident", "precision", "kernels", "log_every", "checkpoint_every",
                         "resume", "eval_every", "n_snapshots", "snapshot_spacing", "wandb", "wandb_project",
                         "skip_bad_shards", "expansion_factor")}  # expansion_factor: resolved into d_sae


def calibrate(model: StackedSAE, cfg: TrainConfig, hook: str, device: str, scale: float) -> None:
    """Architectures whose inference differs from training (BatchTopK's batch-wide selection becomes
    a JumpReLU threshold) set their threshold on train rows, so the export keeps the training L0.
    The sample is bounded so that its pre-activations take at most 256 MiB per run."""
    if hasattr(model, "calibrate_threshold"):
        rows = max(256, min(32_768, 2**26 // model.d_sae))
        model.calibrate_threshold(list(SplitRows(cfg, hook, device, scale, rows, split="train")))


def cache_provenance(source) -> dict:
    """What the cache says of where its activations come from: model, dataset, context size, and
    the hash of its manifest (SAELens's metadata keys)."""
    manifest = getattr(source, "manifest", None) or {}
    prov = manifest.get("provenance", {})
    return {"model_name": (prov.get("model") or {}).get("name"), "context_size": manifest.get("context_size"),
            "dataset_path": (prov.get("dataset") or {}).get("name"),
            "cache_manifest_hash": manifest_hash(manifest) if manifest else None}


def warn_if_incomplete(source, cache: str) -> None:
    """One line when the cache's writer has not finished (interrupted, or still writing): training
    reads the shards committed so far, which may be far fewer rows than the user asked the cache for."""
    manifest = getattr(source, "manifest", None)
    if isinstance(manifest, dict) and manifest.get("complete") is False:
        rows = sum(s.get("rows", 0) for s in manifest.get("splits", {}).get("train", {}).get("shards", []))
        log_console().print(f"warning: cache {cache} is incomplete (its writer stopped or is still running): "
                            f"training reads the {rows:,} train rows committed so far; `pipeline cache ... "
                            "--resume` with the same options finishes it", markup=False, highlight=False)


def say_if_fresh(folder: Path) -> None:
    """One line when --resume finds no checkpoint in `folder`: the run starts from step 0."""
    if not has_checkpoint(folder):
        log_console().print(f"--resume: no checkpoint in {folder}; starting a fresh run", markup=False,
                            highlight=False)


def resolved_lr(cfg: TrainConfig) -> float:
    """The run's Adam lr: as given, or the default for its width."""
    return default_lr(cfg.d_sae) if cfg.lr is None else cfg.lr


def recorded_config(cfg: TrainConfig) -> dict:
    """`cfg` as a run's records keep it: with the lr it trained at, not None."""
    return asdict(replace(cfg, lr=resolved_lr(cfg)))


def export_metadata(cfg: TrainConfig, source, hook: str, name: str) -> dict:
    """Provenance stored in an export's cfg.json `metadata` (SAELens's keys, plus ours)."""
    return {
        "hook_name": hook, **cache_provenance(source), "prepend_bos": True,
        "training_config": recorded_config(cfg), "package_version": __version__,
        "training_architecture": cfg.arch,
        "run_name": name,
    }


def relevant_field(cfg: TrainConfig, key: str) -> bool:
    """Whether TrainConfig field `key` changes what `cfg` trains (k means nothing to a standard SAE,
    l1 to a TopK one, hook_out to an SAE)."""
    if key in ("hook_out", "skip"):
        return cfg.hook_out is not None
    if key == "layers":
        return cfg.layers is not None
    if key in ARCH_FIELDS:
        try:
            # A target L0 sets a TopK-family run's k.
            return ARCH_FIELDS[key] in arch_fields(cfg.arch) and not (key == "k" and cfg.target_l0 is not None)
        except PipelineError:
            return True
    return True


def wandb_config(cfg: TrainConfig, source, hook: str) -> dict:
    """A W&B run's config: the fields of `cfg` its architecture uses, the hook actually read and the
    widths, and the cache's provenance (model, manifest hash)."""
    hooks = getattr(source, "hooks", {})
    out = {k: v for k, v in recorded_config(cfg).items() if relevant_field(cfg, k)}
    out.update(hook=hook, d_in=hooks.get(hook), **cache_provenance(source))
    if cfg.hook_out is not None:
        out["d_out"] = hooks.get(cfg.hook_out)
    return out


def finish_export(model: StackedSAE, run: int, out: Path, metadata: dict, metrics: dict,
                  density: torch.Tensor | None, scale: float, out_scale: float | None = None) -> None:
    """Run `run`'s export (with its eval density as sparsity), summary.json and training_curves.png
    (from its metrics.jsonl) into `out`; the export and summary record the sparsity coefficient the run
    ended with (a target L0's controller moves it)."""
    metrics = {**metrics, **final_coefficients(model, run)}
    metadata = {**metadata, **final_coefficients(model, run), "l0": metrics.get("eval_l0", metrics.get("l0")),
                "num_dead_features": int((density[run] == 0).sum()) if density is not None else None}
    sparsity = torch.log10(density[run] + 1e-10) if density is not None else None
    export_saelens(model, run, out, metadata, sparsity, input_scale=scale, output_scale=out_scale)
    (out / "summary.json").write_text(json.dumps(metrics, indent=1))
    write_training_curves(out)


def plan_memory(cfg: TrainConfig, source, device: str) -> int:
    """The bytes this run needs on `device` (trainer.memory: its real step replayed at its sizes);
    refuses it in one line when the device has not that much free."""
    d_in = source.hooks.get(cfg.hook) or max(source.hooks.values())  # no --hook yet: the widest, an upper plan
    d_out = source.hooks.get(cfg.hook_out) if cfg.hook_out else None
    resolved = resolve_width(cfg, d_in)
    _, peak = stack_bytes(resolved.arch, [run_config(resolved, d_in, d_out)], cfg.batch_size, cfg.precision, device,
                          cfg.kernels)
    free = available_bytes(torch.device(device))
    if peak > free:
        raise PipelineError(f"this run needs about {size(peak)} on {device} (d_sae {resolved.d_sae}, batch "
                            f"{cfg.batch_size}) but {size(free)} is free; lower --d-sae or --batch-size")
    return peak


def run_train(cfg: TrainConfig) -> dict:
    world = distributed.init(cfg.device)
    device = distributed.device_for(cfg.device)
    ddp = data_parallel(cfg.ddp, world)  # None for one process
    main = ddp is None or ddp.rank == 0
    if cfg.layers is not None:
        raise PipelineError("a per-layer set (layers) is trained by `pipeline sweep`, every layer in one pass over the "
                            "cache: put these fields in a sweep TOML's [base] (configs/sweep_skip_transcoders.toml)")
    refuse_inconsistent(cfg.cache)
    refuse_inside_cache(cfg.out)
    refuse_file_in_way(cfg.out)
    hooks = cfg.hook if cfg.hook_out is None else [cfg.hook, cfg.hook_out]
    if cfg.hook_out is not None:
        have = open_source(cfg.cache).hooks
        if cfg.hook is None:
            raise PipelineError("a transcoder (--hook-out) needs --hook, the hook it reads")
        if cfg.hook_out not in have:
            raise PipelineError(f"hook_out {cfg.hook_out!r} is not in the cache {cfg.cache}; it has {', '.join(have)}")
    source = open_source(cfg.cache)
    warn_if_incomplete(source, cfg.cache)
    planned = plan_memory(cfg, source, device)
    budget = resident_budget(torch.device(device), planned)
    train = ActivationLoader(cfg.cache, hooks=hooks, seed=cfg.seed, device=device, normalize=cfg.normalize,
                             resident=cfg.resident, resident_budget=budget, skip_bad_shards=cfg.skip_bad_shards,
                             **loader_share(cfg.batch_size, cfg.tokens, ddp))
    budget -= train.resident_bytes if train.resident else 0
    if cfg.hook_out is None and len(train.hooks) != 1:
        raise PipelineError(f"cache {cfg.cache} has hooks {', '.join(train.hooks)}; choose one with --hook")
    hook = train.hooks[0]
    d_in = train.source.hooks[hook]
    cfg = resolve_target(resolve_width(cfg, d_in))
    scale = train.scale[hook]
    # A transcoder reads `hook` and reconstructs `hook_out`, each scaled by its own factor.
    io_hooks = hook if cfg.hook_out is None else (hook, cfg.hook_out)
    io_scales = scale if cfg.hook_out is None else (scale, train.scale[cfg.hook_out])
    out_scale = train.scale[cfg.hook_out] if cfg.hook_out else None
    model = build_model(cfg, d_in, train.source.hooks[cfg.hook_out] if cfg.hook_out else None)
    name = cfg.run_name()
    out = Path(cfg.out) / name
    with DirLock(out, "pipeline train") if main else nullcontext():
        if (out / CHECKPOINT).exists() and not cfg.resume:
            raise PipelineError(f"{out} holds a checkpoint of an earlier run; pass --resume to continue it "
                                "or choose another --out or --name")
        if cfg.resume and main:
            say_if_fresh(out)
        init_cfg = (init_from(model, cfg.init_from, input_scale=scale, output_scale=out_scale) if cfg.init_from
                    else None)
        model = model.to(device)
        out.mkdir(parents=True, exist_ok=True)
        steps = math.ceil(cfg.tokens / cfg.batch_size)
        # A loaded SAE keeps its weights: no b_dec or scale init from the data.
        loop = LoopConfig(lr=resolved_lr(cfg), lr_warmup_steps=cfg.lr_warmup_steps, lr_decay=cfg.lr_decay,
                          total_steps=steps, max_grad_norm=cfg.max_grad_norm, log_every=cfg.log_every,
                          b_dec_init="keep" if init_cfg else cfg.b_dec_init,
                          init_scale_search=cfg.init_scale_search and not init_cfg, precision=cfg.precision,
                          kernels=cfg.kernels, metrics_path=str(out / "metrics.jsonl") if main else None,
                          target_l0=controlled_target(cfg))
        identity = weight_identity(cfg)
        has_eval = bool(train.source.shards("eval"))
        evaluator = None
        if cfg.eval_every and has_eval and main:
            held = SplitRows(cfg, io_hooks, device, io_scales, cfg.eval_tokens, resident="auto", budget=budget)
            evaluator = lambda m: evaluate(m, held)[0]  # noqa: E731
        metadata = export_metadata(cfg, train.source, hook, name)
        if cfg.hook_out:
            metadata["hook_name_out"] = cfg.hook_out

        def snapshot(m: StackedSAE, step: int, tokens: int) -> None:
            export_saelens(m, 0, out / "checkpoints" / str(tokens), {**metadata, "step": step, "tokens": tokens},
                           input_scale=scale, output_scale=out_scale)

        console = ConsoleLog(cfg.tokens, description=name, total_steps=steps) if main else None
        wandb_log = (WandbLog(cfg.wandb_project, [name], [wandb_config(cfg, train.source, hook)], [out],
                              resume=cfg.resume and (out / CHECKPOINT).exists())
                     if cfg.wandb and main else None)

        def log(m: dict) -> None:
            console(m)
            if wandb_log:
                wandb_log(m)

        try:
            batches = train if cfg.hook_out is None else PairedBatches(train, hook, cfg.hook_out)
            last = train_stack(model, RankBatches(batches) if ddp else batches, loop, evaluator=evaluator,
                               eval_every=cfg.eval_every, log=log if main else None, run_dir=out,
                               checkpoint_every=cfg.checkpoint_every, config=identity,
                               snapshot_steps=snapshot_steps(steps, cfg.n_snapshots, cfg.snapshot_spacing),
                               snapshot=snapshot if main else None, ddp=ddp,
                               progress=console.progress if console else None)
            if not main:  # rank 0 evaluates and exports the (identical) weights
                return {**last, "run_dir": str(out)}
            console.close()
            calibrate(model, cfg, hook, device, scale)
            metrics = dict(last)
            density = None
            if has_eval:
                eval_metrics, density = evaluate(model, SplitRows(cfg, io_hooks, device, io_scales, None))
                metrics.update(eval_metrics)
            metrics["run_dir"] = str(out)
            finish_export(model, 0, out, metadata, {k: (v[0] if isinstance(v, list) and k != "failed" and v else v)
                                                    for k, v in metrics.items()}, density, scale, out_scale)
            if wandb_log:
                wandb_log.summary([{k: (v[0] if isinstance(v, list) and v else v) for k, v in metrics.items()
                                    if k != "failed"}])
        finally:
            if console:
                console.close()
            if wandb_log:
                wandb_log.close()
        return metrics
