"""`pipeline train`: one SAE (a stack of one run) from a cache, evaluated on its eval split, exported."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pipeline import __version__
from pipeline.errors import PipelineError
from pipeline.loader import ActivationLoader
from pipeline.manifest import manifest_hash
from trainer.checkpoint import CHECKPOINT
from trainer.registry import get_architecture
from trainer.stack import StackedSAE
from trainer.train import LoopConfig, export_saelens, train_stack


@dataclass
class TrainConfig:
    """Everything `pipeline train` takes; every field is a command-line option and a TOML key."""

    cache: str = "caches/default"
    """Cache directory to train on."""
    out: str = "runs/default"
    """Directory for the run's export and metrics."""
    hook: str | None = None
    """Hook to read; default: the cache's only hook."""
    arch: str = "topk"
    """Registered architecture name."""
    d_sae: int = 1024
    """Number of latents."""
    k: int = 32
    """TopK: latents kept per token."""
    l1: float = 5.0
    """Standard: L1 coefficient."""
    l1_warmup_steps: int = 0
    """Standard: L1 warm-up steps."""
    lr: float = 3e-4
    """Adam learning rate."""
    lr_warmup_steps: int = 100
    """Linear lr warm-up steps."""
    lr_decay: str = "cosine"
    """constant, cosine or linear."""
    batch_size: int = 4096
    """Rows per step."""
    tokens: int = 2_000_000
    """Rows to train on (epochs repeat as needed)."""
    seed: int = 0
    """Seed of the weights and of the loader's shuffle."""
    device: str = "auto"
    """auto, cpu, cuda, ..."""
    log_every: int = 50
    """Steps between metric lines."""
    checkpoint_every: int = 200
    """Steps between checkpoints (one is also written at the end)."""
    resume: bool = False
    """Continue the run whose checkpoint is in --out (a larger --tokens extends it)."""


def build_model(cfg: TrainConfig, d_in: int) -> StackedSAE:
    cls = get_architecture(cfg.arch)
    fields = {"d_in": d_in, "d_sae": cfg.d_sae, "seed": cfg.seed}
    names = set(cls.config_class.__dataclass_fields__)
    for key, value in (("k", cfg.k), ("l1_coefficient", cfg.l1), ("l1_warmup_steps", cfg.l1_warmup_steps)):
        if key in names:
            fields[key] = value
    return cls([cls.config_class(**fields)])


@torch.no_grad()
def evaluate(model: StackedSAE, loader: ActivationLoader) -> tuple[dict, torch.Tensor]:
    """Eval-split metrics per run, and each latent's firing frequency (R, d_sae)."""
    fired = torch.zeros(model.n_runs, model.d_sae)
    sq_err = total = l0 = 0.0
    rows = 0
    sums = None
    batches = list(loader)
    for x in batches:  # the mean first: explained variance against the split's own mean
        sums = x.sum(0) if sums is None else sums + x.sum(0)
        rows += len(x)
    mean = sums / rows
    for x in batches:
        latents = model.encode(x)
        recon = model.decode(latents)
        sq_err = sq_err + (x.unsqueeze(0) - recon).pow(2).sum(dim=(1, 2))
        total += (x - mean).pow(2).sum()
        fired += (latents > 0).sum(dim=1).cpu()
        l0 = l0 + (latents > 0).sum(dim=(1, 2)).float()
    density = fired / rows
    metrics = {"eval_explained_variance": (1 - sq_err / total).tolist(), "eval_l0": (l0 / rows).tolist(),
               "eval_dead_fraction": (density == 0).float().mean(dim=1).tolist(), "eval_rows": rows}
    return metrics, density


def run_train(cfg: TrainConfig) -> dict:
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    train = ActivationLoader(cfg.cache, hooks=cfg.hook, batch_size=cfg.batch_size, seed=cfg.seed, device=device,
                             tokens=cfg.tokens)
    if len(train.hooks) != 1:
        raise PipelineError(f"cache {cfg.cache} has hooks {', '.join(train.hooks)}; choose one with --hook")
    hook = train.hooks[0]
    d_in = train.source.hooks[hook]
    model = build_model(cfg, d_in).to(device)
    out = Path(cfg.out)
    if (out / CHECKPOINT).exists() and not cfg.resume:
        raise PipelineError(f"{out} holds a checkpoint of an earlier run; pass --resume to continue it "
                            "or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    steps = math.ceil(cfg.tokens / cfg.batch_size)
    loop = LoopConfig(lr=cfg.lr, lr_warmup_steps=cfg.lr_warmup_steps, lr_decay=cfg.lr_decay, total_steps=steps,
                      log_every=cfg.log_every, metrics_path=str(out / "metrics.jsonl"))
    # What the weights depend on; tokens may grow on resume (extending the run), devices may change.
    identity = {k: v for k, v in asdict(cfg).items()
                if k not in ("out", "tokens", "device", "log_every", "checkpoint_every", "resume")}
    last = train_stack(model, train, loop, log=_console, run_dir=out, checkpoint_every=cfg.checkpoint_every,
                       config=identity)
    metrics = dict(last)
    if train.source.shards("eval"):
        eval_loader = ActivationLoader(cfg.cache, hooks=hook, batch_size=min(cfg.batch_size, train.source.rows("eval")),
                                       split="eval", device=device)
        eval_metrics, density = evaluate(model, eval_loader)
        metrics.update(eval_metrics)
    else:
        density = None
    manifest = getattr(train.source, "manifest", None) or {}
    prov = manifest.get("provenance", {})
    metadata = {
        "hook_name": hook, "model_name": (prov.get("model") or {}).get("name"),
        "context_size": manifest.get("context_size"), "dataset_path": (prov.get("dataset") or {}).get("name"),
        "prepend_bos": True, "cache_manifest_hash": manifest_hash(manifest) if manifest else None,
        "training_config": asdict(cfg), "package_version": __version__,
        "l0": metrics.get("eval_l0", metrics.get("l0"))[0],
        "num_dead_features": int((density[0] == 0).sum()) if density is not None else None,
        "training_architecture": cfg.arch,
    }
    sparsity = torch.log10(density[0] + 1e-10) if density is not None else None
    export_saelens(model, 0, out, cfg.arch, metadata, sparsity)
    (out / "summary.json").write_text(json.dumps(metrics, indent=1))
    return metrics


def _console(m: dict) -> None:
    print(f"step {m['step']:>6}  tokens {m['tokens']:>10,}  {m['tokens_per_s']:>9,.0f} tok/s  "
          f"mse {m['mse'][0]:.4g}  expl.var {m['explained_variance'][0]:.3f}  L0 {m['l0'][0]:.1f}  "
          f"dead {m['dead_fraction'][0]:.3f}", flush=True)
