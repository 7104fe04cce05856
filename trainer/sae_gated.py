"""Gated SAE (Rajamanoharan et al. 2024, "Improving dictionary learning with gated sparse
autoencoders"), for a stack of R runs.

One encoder matrix serves two paths, which decouples *whether* a latent fires from *how much*:

    pi_gate = W_enc^T (x - b_dec) + b_gate                         which latents fire
    pi_mag  = (W_enc * exp(r_mag))^T (x - b_dec) + b_mag           their magnitudes
    latents = H(pi_gate) * ReLU(pi_mag)
    recon   = W_dec^T latents + b_dec
    loss    = mse
              + l1_scale * l1_coefficient * sum_i ReLU(pi_gate)_i * ||W_dec_i'||     sparsity
              + || x - (W_dec'^T ReLU(pi_gate) + b_dec') ||^2                         auxiliary

The Heaviside H passes no gradient, so the gate path learns from the two extra terms only: the L1
(weighted by decoder norms, as SAELens's gated training and Anthropic's April 2024 update, which
makes it invariant to moving scale into the decoder, so the decoder is left free) and the
auxiliary reconstruction through a frozen copy (W_dec', b_dec': no gradient) of the decoder, which
keeps the gate's pre-activations meaningful as magnitudes. There is no shared b_enc.

The decoder is frozen in both extra terms, its norms in the L1 included (W_dec' everywhere). The
paper's L1 had no decoder norms (its decoder was unit-norm); with them, the decoder must be frozen
in both terms or in neither (SAELens unfreezes it in the auxiliary one), as the paper's first
author wrote when the norm-weighted penalty came out. Frozen in the auxiliary term only, the L1
pulls every decoder row's norm down and only the main MSE pulls back, which the magnitude path
satisfies alone by growing W_enc * exp(r_mag). Measured on the default cache (d_sae 1024, 1M
tokens, L1 3): decoder norms fell to 0.007 and the explained variance fell during training, to
0.69 at L0 342; frozen in both, norms stay near 0.9 and it reaches 0.909 at L0 61 (unfrozen in
both: 0.900 at L0 71).

Runs in one stack share d_in, d_sae and the L1 warm-up; the L1 coefficient and the seed may differ
per run. The export is SAELens's `gated` format (W_enc, b_gate, r_mag, b_mag, W_dec, b_dec).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from trainer.kernels import elementwise_gpu
from trainer.kernels.gated import gated_sae
from trainer.kernels.triton_check import use_triton
from trainer.registry import register_architecture
from trainer.stack import StackedSAE, StepOutput, per_run, shared

# The weights of a run, by SAELens's GatedSAE names.
GATED_WEIGHTS = ("W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec")


@dataclass
class GatedConfig:
    """One gated run."""

    d_in: int
    """Width of the activations read (and reconstructed)."""
    d_sae: int
    """Number of latents."""
    l1_coefficient: float = 1.0
    """Weight of the decoder-norm-weighted L1 penalty on the gate's ReLU."""
    l1_warmup_steps: int = 0
    """Steps over which the L1 weight ramps linearly from 0 to l1_coefficient (0 = none)."""
    seed: int = 0
    """Seed of this run's initial weights."""
    dec_init_norm: float = 0.1
    """Norm of each decoder row at init (SAELens's default decoder_init_norm)."""

    def l1_scale(self, step: int) -> float:
        """The warm-up factor min(1, step / l1_warmup_steps) to pass to forward."""
        return 1.0 if self.l1_warmup_steps <= 0 else min(1.0, step / self.l1_warmup_steps)


@register_architecture("gated")
class GatedSAE(StackedSAE):
    """A stack of R gated SAEs of the same shape, trained on the same batches."""

    config_class = GatedConfig
    # The L1 term charges for decoder norm, so the decoder is left free (as the standard SAE).
    unit_norm_decoder = False
    # The auxiliary reconstruction adds a decoder product and its gradient to the five of an SAE step.
    dense_matmuls = 7
    # trainer.kernels.gated: measured faster on CPU (BENCHMARKS.md); chunked for a CPU cache, float32.
    fused_on = frozenset({"cpu"})
    fused_autocast = False

    def __init__(self, cfgs: GatedConfig | Sequence[GatedConfig]):
        super().__init__(cfgs)
        R, d_sae = self.n_runs, self.d_sae
        self.b_enc = None  # the two paths have their own biases
        self.b_gate = nn.Parameter(torch.zeros(R, d_sae))
        self.r_mag = nn.Parameter(torch.zeros(R, d_sae))
        self.b_mag = nn.Parameter(torch.zeros(R, d_sae))
        self.l1_warmup_steps = shared(self.cfgs, "l1_warmup_steps")
        self.register_buffer("l1_coefficient", per_run(self.cfgs, "l1_coefficient", torch.float32))
        self._l1_scale = 1.0

    def on_step(self, step: int, total_steps: int | None) -> None:
        """L1 warm-up: the factor forward applies at this step."""
        self._l1_scale = self.cfgs[0].l1_scale(step)

    def export_run(self, run: int) -> tuple[dict[str, torch.Tensor], dict]:
        return {name: getattr(self, name)[run] for name in GATED_WEIGHTS}, {"architecture": "gated"}

    @torch.no_grad()
    def load_run(self, run: int, weights: dict[str, torch.Tensor], cfg: dict) -> None:
        self.copy_weights(run, weights, GATED_WEIGHTS)

    # -- forward pieces ------------------------------------------------------------------------

    def gate_and_magnitude(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The gate's and the magnitudes' pre-activations (pi_gate, pi_mag), each (R, batch, d_sae)."""
        projected = self.project(x, torch.zeros_like(self.b_gate))
        pi_gate = projected + self.b_gate.unsqueeze(1)
        pi_mag = projected * self.r_mag.exp().unsqueeze(1) + self.b_mag.unsqueeze(1)
        return pi_gate, pi_mag

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """The magnitudes' pre-activations pi_mag (R, batch, d_sae) (SAELens's hook_sae_acts_pre)."""
        return self.gate_and_magnitude(x)[1]

    @staticmethod
    def gate(pi_gate: torch.Tensor, pi_mag: torch.Tensor) -> torch.Tensor:
        """Latents: the magnitudes' ReLU where the gate is open."""
        return (pi_gate > 0).to(pi_mag.dtype) * pi_mag.relu()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents (R, batch, d_sae)."""
        return self.gate(*self.gate_and_magnitude(x))

    # -- the training step's forward -----------------------------------------------------------

    def forward(self, x: torch.Tensor, l1_scale: float | None = None) -> StepOutput:
        """Everything a training step needs, per run.

        Returns `loss`, `mse`, `aux_loss`, `l1`, `gate_recon_mse`, `l0` (each (R,)), `latents`
        (R, batch, d_sae), `recon` (R, batch, d_in) and `fired` (R, d_sae): per latent, the tokens
        it is active on. `l1` is the frozen-decoder-norm-weighted L1 of the gate's ReLU (summed over
        latents, averaged over the batch), `gate_recon_mse` the auxiliary reconstruction's error
        through the frozen decoder; aux_loss = l1_scale * l1_coefficient * l1 + gate_recon_mse, so
        loss = mse + aux_loss. Backpropagate `loss.sum()`."""
        self._check_input(x)
        if self.use_fused(x):  # trainer.kernels.gated: the same step, fused (latent-major, chunked)
            latents, recon, gate_recon, l1, l0, fired = gated_sae(
                x, self.W_enc, self.b_gate, self.r_mag, self.b_mag, self.b_dec, self.W_dec, frozen_l1_norms=True)
        elif use_triton(x.device):  # the same step's elementwise passes, one each way, from one product
            latents, gate_acts, sums, fired = elementwise_gpu.GatedStep.apply(
                self.project(x, torch.zeros_like(self.b_gate)), self.b_gate, self.r_mag.exp(), self.b_mag)
            recon = self.decode(latents)
            W_dec_frozen = self.W_dec.detach()
            l1 = (sums.to(self.W_dec.dtype) * W_dec_frozen.norm(dim=-1)).sum(dim=-1) / x.shape[-2]
            gate_recon = torch.einsum("rbs,rsi->rbi", gate_acts, W_dec_frozen) + self.b_dec.detach().unsqueeze(1)
            fired = fired.to(self.W_dec.dtype)
            l0 = fired.sum(dim=-1) / x.shape[-2]
        else:
            pi_gate, pi_mag = self.gate_and_magnitude(x)
            latents = self.gate(pi_gate, pi_mag)
            recon = self.decode(latents)
            # The gate path learns from the L1 and the auxiliary reconstruction, both through a frozen
            # decoder (module docstring): the reconstruction alone trains the decoder.
            gate_acts = pi_gate.relu()
            W_dec_frozen = self.W_dec.detach()
            l1 = (gate_acts.sum(dim=1, dtype=self.W_dec.dtype) * W_dec_frozen.norm(dim=-1)).sum(dim=-1) / x.shape[-2]
            gate_recon = torch.einsum("rbs,rsi->rbi", gate_acts, W_dec_frozen) + self.b_dec.detach().unsqueeze(1)
            fired = (latents.detach() > 0).sum(dim=1, dtype=self.W_dec.dtype)
            l0 = fired.sum(dim=-1) / x.shape[-2]
        mse = self.mse(x, recon)
        gate_recon_mse = self.mse(x, gate_recon)
        aux_loss = (self._l1_scale if l1_scale is None else l1_scale) * self.l1_coefficient * l1 + gate_recon_mse
        return {"loss": mse + aux_loss, "mse": mse, "aux_loss": aux_loss, "l1": l1, "gate_recon_mse": gate_recon_mse,
                "l0": l0, "latents": latents, "recon": recon, "fired": fired}
