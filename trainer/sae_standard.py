"""Standard ReLU SAE with an L1 penalty weighted by decoder norms, for a stack of R runs.

    latents = ReLU(W_enc^T (x - b_dec) + b_enc)
    recon   = W_dec^T latents + b_dec          (+ W_skip^T (x - b_in): a skip-transcoder)
    loss    = mse + l1_scale * l1_coefficient * sum_i latents_i * ||W_dec_i||

Weighting each latent's L1 by its decoder row norm (Anthropic's April 2024 update; SAELens's
"standard" training) makes the penalty invariant to moving scale between encoder and decoder, so the
decoder needs no unit-norm constraint. Runs in one stack share d_in and d_sae; the L1 coefficient
and the seed may differ per run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from trainer.kernels import elementwise_gpu
from trainer.kernels.triton_check import use_triton
from trainer.kernels.relu import relu_sae
from trainer.registry import register_architecture
from trainer.stack import StackedSAE, StepOutput, per_run, shared


@dataclass
class StandardConfig:
    """One standard (ReLU + L1) run."""

    d_in: int
    """Width of the activations read (and reconstructed)."""
    d_sae: int
    """Number of latents."""
    l1_coefficient: float = 5.0
    """Weight of the decoder-norm-weighted L1 penalty."""
    l1_warmup_steps: int = 0
    """Steps over which the L1 weight ramps linearly from 0 to l1_coefficient (0 = none)."""
    seed: int = 0
    """Seed of this run's initial weights."""
    dec_init_norm: float = 0.1
    """Norm of each decoder row at init (SAELens's default decoder_init_norm)."""
    d_out: int | None = None
    """Transcoder: width of the other hook it reconstructs (None: an SAE, reconstructing its input)."""
    skip: bool = False
    """Transcoder: add a linear skip path W_skip (d_in x d_out) from input to output (a skip-transcoder)."""

    def l1_scale(self, step: int) -> float:
        """The warm-up factor min(1, step / l1_warmup_steps) to pass to forward."""
        return 1.0 if self.l1_warmup_steps <= 0 else min(1.0, step / self.l1_warmup_steps)


@register_architecture("standard")
class StandardSAE(StackedSAE):
    """A stack of R standard SAEs of the same shape, trained on the same batches."""

    config_class = StandardConfig
    supports_transcoder = True
    # The L1 term already charges for decoder norm, so the decoder is left free.
    unit_norm_decoder = False
    # trainer.kernels.relu.relu_sae: measured faster on CPU (BENCHMARKS.md); its chunked passes are sized
    # for a CPU cache, and it computes in float32.
    fused_on = frozenset({"cpu"})
    fused_autocast = False

    def __init__(self, cfgs: StandardConfig | Sequence[StandardConfig]):
        super().__init__(cfgs)
        # The warm-up is one schedule for the stack: the loop passes one l1_scale per step.
        self.l1_warmup_steps = shared(self.cfgs, "l1_warmup_steps")
        self.register_buffer("l1_coefficient", per_run(self.cfgs, "l1_coefficient", torch.float32))

        self._l1_scale = 1.0

    def on_step(self, step: int, total_steps: int | None) -> None:
        """L1 warm-up: the factor forward applies at this step."""
        self._l1_scale = self.cfgs[0].l1_scale(step)

    # -- forward pieces ------------------------------------------------------------------------

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents (R, batch, d_sae)."""
        return self.pre_acts(x).relu()

    # -- the training step's forward -----------------------------------------------------------

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None,
                l1_scale: float | None = None) -> StepOutput:
        """Everything a training step needs, per run.

        Returns `loss`, `mse`, `aux_loss`, `l1`, `l0` (each (R,)), `latents` (R, batch, d_sae),
        `recon` (R, batch, d_in) and `fired` (R, d_sae): per latent, the tokens it is active on.
        `l1` is the decoder-norm-weighted L1 (summed over latents, averaged over the batch);
        aux_loss = l1_scale * l1_coefficient * l1 is what it adds, so
        loss = mse + aux_loss. `l1_scale` is the warm-up factor (default: the one `on_step` set).
        mse is the squared error summed over d_in and averaged over the batch (SAELens's training
        MSE). `target`: what a transcoder reconstructs (None: x). Backpropagate `loss.sum()`: runs
        share no parameters."""
        self._check_input(x)
        if self.use_fused(x):  # trainer.kernels.relu.relu_sae: the same step, fused (latent-major, chunked)
            latents, recon, l1, l0, fired = relu_sae(x, self.W_enc, self.b_enc, self.b_dec, self.W_dec)
        elif use_triton(x.device):  # the same step's elementwise passes, one each way
            latents, sums, fired = elementwise_gpu.ReLUStep.apply(self.pre_acts(x))
            recon = self.decode(latents, x)
            l1 = (sums.to(self.W_dec.dtype) * elementwise_gpu.RowNorms.apply(self.W_dec)).sum(dim=-1) / x.shape[-2]
            fired = fired.to(self.W_dec.dtype)
            l0 = fired.sum(dim=-1) / x.shape[-2]
        else:
            latents = self.pre_acts(x).relu()
            recon = self.decode(latents, x)
            # mean_b sum_s latents[b, s] * ||W_dec[s]|| needs only each latent's batch sum.
            l1 = (latents.sum(dim=1, dtype=self.W_dec.dtype) * self.W_dec.norm(dim=-1)).sum(dim=-1) / x.shape[-2]
            fired = (latents > 0).sum(dim=1, dtype=self.W_dec.dtype).detach()
            l0 = fired.sum(dim=-1) / x.shape[-2]
        mse = self.mse(x if target is None else target, recon)
        aux_loss = (self._l1_scale if l1_scale is None else l1_scale) * self.l1_coefficient * l1
        return {"loss": mse + aux_loss, "mse": mse, "aux_loss": aux_loss, "l1": l1, "l0": l0,
                "latents": latents, "recon": recon, "fired": fired}
