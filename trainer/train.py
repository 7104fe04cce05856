"""The training loop: one stack of R runs stepped on every batch of any `(batch, d_in)` iterator.

A first slice of stage 2b: Adam with warm-up and decay, b_dec from the data, decoder constraints,
dead-latent tracking, metrics to the console and a JSONL file, and an export SAELens loads.
Checkpoints/resume, W&B and sweeps build on this loop.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from trainer.checkpoint import load_checkpoint, save_checkpoint
from trainer.optim import StackedAdam, normalize_decoder, remove_parallel_grad
from trainer.stack import StackedSAE


@dataclass
class LoopConfig:
    """How a stack is trained (the architecture's own config holds its shape and sparsity)."""

    lr: float | list[float] = 3e-4
    """Adam learning rate, one per run or one for all."""
    lr_warmup_steps: int = 0
    """Linear warm-up from 0."""
    lr_decay: str = "constant"
    """'constant', 'cosine' (to 10% of lr), or 'linear' (to 0 over the last 20% of steps)."""
    max_grad_norm: float | list[float] = 1.0
    """Per-run gradient clipping (inf: none)."""
    b_dec_init: str = "geometric_median"
    """'mean', 'geometric_median' or 'zeros': b_dec from the first batch (SAELens's zeros train
    poorly on activations with a large mean)."""
    log_every: int = 50
    """Steps between metric lines."""
    total_steps: int | None = None
    """For the schedule; None = as many steps as the iterator gives (then decay is off)."""
    metrics_path: str | None = None
    """JSONL file the metric lines go to."""
    extra: dict = field(default_factory=dict)
    """Free-form provenance stored with the run."""


def lr_factor(step: int, cfg: LoopConfig) -> float:
    if cfg.lr_warmup_steps and step < cfg.lr_warmup_steps:
        return (step + 1) / cfg.lr_warmup_steps
    total = cfg.total_steps
    if not total or cfg.lr_decay == "constant":
        return 1.0
    progress = min(1.0, step / total)
    if cfg.lr_decay == "cosine":
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.lr_decay == "linear":
        return min(1.0, (1 - progress) / 0.2)
    raise ValueError(f"unknown lr_decay {cfg.lr_decay!r}; use constant, cosine or linear")


@torch.no_grad()
def explained_variance(x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """(R,) 1 - residual variance / total variance over the batch."""
    target = x if x.dim() == 3 else x.unsqueeze(0)
    total = (target - target.mean(dim=1, keepdim=True)).pow(2).sum(dim=(-1, -2))
    return 1 - (target - recon).pow(2).sum(dim=(-1, -2)) / total


def train_stack(model: StackedSAE, batches: Iterable[torch.Tensor], cfg: LoopConfig,
                evaluator: Callable[[StackedSAE], dict] | None = None, eval_every: int = 0,
                log: Callable[[dict], None] | None = print, run_dir: str | Path | None = None,
                checkpoint_every: int = 0, max_steps: int | None = None, config: dict | None = None) -> dict:
    """Train every run of `model` on each batch; returns the last metrics (lists per run).

    With `run_dir`, a checkpoint is written every `checkpoint_every` steps and at the end, and an
    existing one is resumed: `batches` must then be an `ActivationLoader` (its position is part of
    the checkpoint) and training continues exactly where it stopped. `max_steps` stops early.
    """
    opt = StackedAdam(dict(model.named_parameters()), lr=cfg.lr, max_grad_norm=cfg.max_grad_norm)
    base_lr = opt.lr.clone()
    config = config or {}
    resumed = load_checkpoint(run_dir, model, opt, config) if run_dir else None
    step, tokens = 0, 0
    if resumed:
        batches.load_state_dict(resumed["loader"])
        step, tokens = resumed["step"], resumed["tokens"]
    it: Iterator[torch.Tensor] = iter(batches)
    first = next(it, None)
    if first is None:
        return {}
    if not resumed:
        model.init_b_dec(first.float(), cfg.b_dec_init)
    fired = torch.zeros(model.n_runs, model.d_sae, device=model.W_enc.device)
    metrics_file = open(cfg.metrics_path, "a") if cfg.metrics_path else None
    t0, last, start_tokens = time.perf_counter(), {}, tokens

    def checkpoint() -> None:
        save_checkpoint(run_dir, model, opt, {"step": step, "tokens": tokens, "loader": batches.state_dict(),
                                              "config": config})

    try:
        for batch in _chain(first, it):
            opt.lr.copy_(base_lr * lr_factor(step, cfg))
            kwargs = {"l1_scale": model.l1_scale(step)} if hasattr(model, "l1_scale") else {}
            out = model(batch, **kwargs)
            opt.zero_grad()
            out["loss"].sum().backward()
            if getattr(model, "unit_norm_decoder", False):
                remove_parallel_grad(model.W_dec)
            opt.step()
            if getattr(model, "unit_norm_decoder", False):
                normalize_decoder(model.W_dec)
            if hasattr(model, "update_dead"):
                model.update_dead(out["latents"], batch.shape[0])
            fired += (out["latents"] > 0).sum(dim=1)
            step += 1
            tokens += batch.shape[0]
            if step % cfg.log_every == 0 or (cfg.total_steps and step == cfg.total_steps):
                last = {
                    "step": step, "tokens": tokens, "tokens_per_s": (tokens - start_tokens) / (time.perf_counter() - t0),
                    "lr": opt.lr.tolist(), "loss": out["loss"].tolist(), "mse": out["mse"].tolist(),
                    "explained_variance": explained_variance(batch, out["recon"]).tolist(),
                    "l0": out["l0"].tolist(), "dead_fraction": (fired == 0).float().mean(dim=1).tolist(),
                }
                fired.zero_()
                if evaluator is not None and eval_every and step % eval_every == 0:
                    last.update(evaluator(model))
                if log:
                    log(last)
                if metrics_file:
                    metrics_file.write(json.dumps(last) + "\n")
                    metrics_file.flush()
            if run_dir and checkpoint_every and step % checkpoint_every == 0:
                checkpoint()
            if max_steps is not None and step >= max_steps:
                break
        if run_dir:
            checkpoint()
    finally:
        if metrics_file:
            metrics_file.close()
    return last


def _chain(first: torch.Tensor, rest: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
    yield first
    yield from rest


def export_saelens(model: StackedSAE, run: int, out: Path, architecture: str, metadata: dict,
                   sparsity: torch.Tensor | None = None) -> Path:
    """Write run `run` of a stack as SAELens's `cfg.json` + `sae_weights.safetensors` (+ sparsity)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    weights = {name: getattr(model, name)[run].detach().to("cpu", torch.float32).contiguous()
               for name in ("W_enc", "W_dec", "b_enc", "b_dec")}
    cfg = {
        "architecture": architecture, "d_in": model.d_in, "d_sae": model.d_sae, "dtype": "float32",
        "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
        "reshape_activations": "none", "metadata": metadata,
    }
    if architecture == "topk":
        cfg["k"] = int(model.k[run])
        cfg["rescale_acts_by_decoder_norm"] = False
    save_file(weights, str(out / "sae_weights.safetensors"))
    (out / "cfg.json").write_text(json.dumps(cfg, indent=2))
    if sparsity is not None:
        save_file({"sparsity": sparsity.detach().to("cpu", torch.float32).contiguous()},
                  str(out / "sparsity.safetensors"))
    return out
