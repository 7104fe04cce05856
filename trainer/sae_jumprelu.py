"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping ahead"), for a stack of R runs.

    pre     = W_enc^T (x - b_dec) + b_enc
    latents = JumpReLU_theta(pre) = pre * H(pre - theta),   theta = exp(log_threshold) > 0
    recon   = W_dec^T latents + b_dec          (+ W_skip^T (x - b_in): a skip-transcoder)
    loss    = mse + l0_scale * l0_coefficient * sum_i H(pre_i - theta_i)

H (the Heaviside step) has zero derivative almost everywhere, so theta would never learn from the
loss. Straight-through estimators give it pseudo-derivatives with a rectangle kernel
K(u) = 1[|u| < 1/2] of width `bandwidth` eps:

    d JumpReLU / d theta = -(theta / eps) K((pre - theta) / eps)
    d H / d theta        = -(1 / eps)     K((pre - theta) / eps)

while pre gets the ordinary gradient through the kept latents (and none through the step), as in
the paper: the L0 penalty moves the thresholds only. Decoder rows are kept unit-norm (the loop's
constraint), which fixes the scale shared by encoder, threshold and decoder: a latent's value is
the coefficient of a unit direction of the data, so thresholds live on the data's scale.

Two choices make a short run reach its sparse solution (DeepMind trains for billions of tokens;
here a run is often 1-2M tokens, a few hundred steps):

- **Data units.** `init_threshold` and `bandwidth` are multiples of the data's scale
  sigma = sqrt(mean ||y - b_dec||^2 / d_out), the rms per dimension of the first batch around b_dec
  (y: what is reconstructed), set with b_dec by `init_b_dec`. Defaults then mean the same on any
  cache, as DeepMind's absolute values do on data normalised to E||x||^2 = d.
- **A faster threshold.** Adam moves a parameter by about lr per step whatever its gradient's
  size, so a threshold learnt as log(theta) changes by a factor e^(lr x steps) at most: 1.3x in
  250 steps at lr 1e-3, while an L0 near d_in / 4 needs 2-3x the initial threshold. The parameter
  is log(theta) / threshold_rate instead, so Adam moves log(theta) by about lr x threshold_rate per
  step (2% at lr 1e-3 and the default rate 20). The gradient reaching that parameter is
  threshold_rate times d loss / d log(theta); nothing else changes.

Runs in one stack share d_in, d_sae and the L0 warm-up; the L0 coefficient, initial threshold,
bandwidth, threshold rate and the seed may differ per run. At inference (and in SAELens's `jumprelu`
format) the same JumpReLU with the learnt thresholds applies, so an export has the L0 the run had
in training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from pipeline.errors import PipelineError
from trainer.kernels import elementwise_gpu
from trainer.kernels.triton_check import use_triton
from trainer.kernels.jumprelu import jumprelu_sae
from trainer.registry import register_architecture
from trainer.stack import StackedSAE, StepOutput, per_run, shared


@dataclass
class JumpReLUConfig:
    """One JumpReLU run."""

    d_in: int
    """Width of the activations read (and reconstructed)."""
    d_sae: int
    """Number of latents."""
    l0_coefficient: float = 0.3
    """Weight of the L0 penalty (latents firing per token)."""
    l0_warmup_steps: int = 0
    """Steps over which the L0 weight ramps linearly from 0 to l0_coefficient (0 = none)."""
    init_threshold: float = 0.2
    """Every latent's threshold at init, in units of the data's rms per dimension around b_dec."""
    bandwidth: float = 0.2
    """Width eps of the straight-through estimators' rectangle kernel, in the same units."""
    threshold_rate: float = 20.0
    """How fast thresholds learn: Adam moves log(threshold) by about lr x threshold_rate per step."""
    seed: int = 0
    """Seed of this run's initial weights."""
    dec_init_norm: float = 1.0
    """Norm of each decoder row at init (the decoder is kept unit-norm during training)."""
    d_out: int | None = None
    """Transcoder: width of the other hook it reconstructs (None: an SAE, reconstructing its input)."""
    skip: bool = False
    """Transcoder: add a linear skip path W_skip (d_in x d_out) from input to output (a skip-transcoder)."""

    def l0_scale(self, step: int) -> float:
        """The warm-up factor min(1, step / l0_warmup_steps) to pass to forward."""
        return 1.0 if self.l0_warmup_steps <= 0 else min(1.0, step / self.l0_warmup_steps)


def rectangle(u: torch.Tensor) -> torch.Tensor:
    """The kernel K(u) = 1 on (-1/2, 1/2), 0 elsewhere."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class JumpReLUFunction(torch.autograd.Function):
    """pre * H(pre - theta); theta's pseudo-derivative from the rectangle kernel.

    `threshold` and `bandwidth` broadcast against `pre` (per run: (R, 1, d_sae) and (R, 1, 1))."""

    @staticmethod
    def forward(ctx: Any, pre: torch.Tensor, threshold: torch.Tensor, bandwidth: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(pre, threshold, bandwidth)
        return pre * (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        pre, threshold, bandwidth = ctx.saved_tensors
        pre_grad = (pre > threshold).to(grad.dtype) * grad
        ste = -(threshold / bandwidth) * rectangle((pre - threshold) / bandwidth) * grad
        return pre_grad, ste.sum_to_size(threshold.shape), None


class StepFunction(torch.autograd.Function):
    """H(pre - theta) (1 where a latent fires); theta's pseudo-derivative from the rectangle
    kernel, none for pre (the L0 penalty moves the thresholds only)."""

    @staticmethod
    def forward(ctx: Any, pre: torch.Tensor, threshold: torch.Tensor, bandwidth: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(pre, threshold, bandwidth)
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor, None]:
        pre, threshold, bandwidth = ctx.saved_tensors
        ste = -(1.0 / bandwidth) * rectangle((pre - threshold) / bandwidth) * grad
        return None, ste.sum_to_size(threshold.shape), None


def jumprelu(pre: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Inference JumpReLU (no gradient tricks): pre where pre > threshold, else 0; `threshold`
    (R, d_sae) per run and latent against `pre (R, batch, d_sae)`, as SAELens's JumpReLUSAE."""
    return pre * (pre > threshold.unsqueeze(1)).to(pre.dtype)


def load_threshold(weights: dict[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """A saved `threshold (d_sae,)`, checked against `target`'s shape (one run of a stack)."""
    if "threshold" not in weights:
        raise PipelineError(f"JumpReLU weights lack threshold; found {', '.join(sorted(weights))}")
    if tuple(weights["threshold"].shape) != tuple(target.shape):
        raise PipelineError(f"saved threshold has shape {tuple(weights['threshold'].shape)}; this SAE needs "
                            f"{tuple(target.shape)}")
    return weights["threshold"]


@register_architecture("jumprelu")
class JumpReLUSAE(StackedSAE):
    """A stack of R JumpReLU SAEs of the same shape, trained on the same batches."""

    config_class = JumpReLUConfig
    supports_transcoder = True
    # Unit-norm decoder rows (the loop projects gradients and renormalises, trainer.optim).
    unit_norm_decoder = True
    # trainer.kernels.jumprelu: measured faster on CPU (BENCHMARKS.md); chunked for a CPU cache, float32.
    fused_on = frozenset({"cpu"})
    fused_autocast = False

    def __init__(self, cfgs: JumpReLUConfig | Sequence[JumpReLUConfig]):
        super().__init__(cfgs)
        for c in self.cfgs:
            if not (c.init_threshold > 0 and c.bandwidth > 0 and c.threshold_rate > 0):
                raise PipelineError(f"init_threshold ({c.init_threshold}), bandwidth ({c.bandwidth}) and "
                                    f"threshold_rate ({c.threshold_rate}) must be positive")
        # The warm-up is one schedule for the stack: forward applies one l0_scale per step.
        self.l0_warmup_steps = shared(self.cfgs, "l0_warmup_steps")
        self.register_buffer("l0_coefficient", per_run(self.cfgs, "l0_coefficient", torch.float32))
        self.register_buffer("bandwidth", per_run(self.cfgs, "bandwidth", torch.float32))
        self.register_buffer("threshold_rate", per_run(self.cfgs, "threshold_rate", torch.float32))
        # sigma per run (see the module docstring): 1 until init_b_dec sees data, so a model used
        # without the loop takes init_threshold and bandwidth as absolute values.
        self.register_buffer("data_scale", torch.ones(self.n_runs))
        # (R, d_sae): log(threshold) / threshold_rate, the parameter Adam sees.
        self.threshold_param = nn.Parameter(torch.zeros(self.n_runs, self.d_sae))
        self._set_threshold(per_run(self.cfgs, "init_threshold", torch.float32).view(-1, 1).expand(-1, self.d_sae))
        self._l0_scale = 1.0

    @property
    def log_threshold(self) -> torch.Tensor:
        """(R, d_sae) log thresholds, threshold_rate x threshold_param."""
        return self.threshold_param * self.threshold_rate.unsqueeze(1)

    @property
    def threshold(self) -> torch.Tensor:
        """(R, d_sae) thresholds, exp(log_threshold)."""
        return self.log_threshold.exp()

    @torch.no_grad()
    def _set_threshold(self, threshold: torch.Tensor, run: int | None = None) -> None:
        """Set the thresholds (R, d_sae), or run `run`'s (d_sae,), through the parametrisation."""
        param = self.threshold_param if run is None else self.threshold_param[run]
        rate = self.threshold_rate.unsqueeze(1) if run is None else self.threshold_rate[run]
        param.copy_(threshold.to(param.dtype).clamp_min(1e-30).log() / rate)

    @torch.no_grad()
    def init_b_dec(self, sample: torch.Tensor, method: str = "mean", target: torch.Tensor | None = None) -> None:
        """b_dec as every architecture, then sigma from the same sample around it, and the initial
        thresholds init_threshold x sigma (not when `method` is "keep": a loaded SAE keeps its own)."""
        super().init_b_dec(sample, method, target=target)
        y = sample if target is None else target
        y = y.to(device=self.b_dec.device, dtype=torch.float32)
        centred = (y if y.dim() == 3 else y.unsqueeze(0)) - self.b_dec.float().unsqueeze(1)  # (R, n, d_out)
        self.data_scale.copy_(centred.pow(2).mean(dim=(1, 2)).sqrt().clamp_min(1e-12))
        if method != "keep":
            init = per_run(self.cfgs, "init_threshold", torch.float32).to(self.data_scale.device) * self.data_scale
            self._set_threshold(init.view(-1, 1).expand(-1, self.d_sae))

    def on_step(self, step: int, total_steps: int | None) -> None:
        """L0 warm-up: the factor forward applies at this step."""
        self._l0_scale = self.cfgs[0].l0_scale(step)

    def export_run(self, run: int) -> tuple[dict[str, torch.Tensor], dict]:
        weights, _ = super().export_run(run)
        arch = self.transcoder_cfg("jumprelu_transcoder") if self.is_transcoder else {"architecture": "jumprelu"}
        return {**weights, "threshold": self.threshold[run]}, arch

    @torch.no_grad()
    def load_run(self, run: int, weights: dict[str, torch.Tensor], cfg: dict) -> None:
        super().load_run(run, weights, cfg)
        self._set_threshold(load_threshold(weights, self.threshold_param[run]), run)

    # -- forward pieces ------------------------------------------------------------------------

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents (R, batch, d_sae): pre-activations above their latent's threshold."""
        return jumprelu(self.pre_acts(x), self.threshold)

    # -- the training step's forward -----------------------------------------------------------

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None,
                l0_scale: float | None = None) -> StepOutput:
        """Everything a training step needs, per run.

        Returns `loss`, `mse`, `aux_loss`, `l0` (each (R,)), `latents` (R, batch, d_sae), `recon`
        (R, batch, d_in) and `fired` (R, d_sae): per latent, the tokens it is active on.
        aux_loss = l0_scale * l0_coefficient * L0 (the straight-through L0), so loss = mse + aux_loss.
        `l0_scale` is the warm-up factor (default: the one `on_step` set). Backpropagate
        `loss.sum()`: runs share no parameters."""
        self._check_input(x)
        bandwidth = self.bandwidth * self.data_scale  # (R,): in the data's units
        if self.use_fused(x):  # trainer.kernels.jumprelu: the same step, fused (latent-major, chunked)
            latents, recon, l0, fired = jumprelu_sae(x, self.W_enc, self.b_enc, self.b_dec, self.W_dec,
                                                     self.threshold, bandwidth)
        elif use_triton(x.device):  # the same elementwise step in one pass each way
            pre = self.pre_acts(x)
            latents, l0, fired = elementwise_gpu.JumpReLUStep.apply(pre, self.threshold, bandwidth)
            recon = self.decode(latents, x)
        else:
            pre = self.pre_acts(x)
            threshold, eps = self.threshold.unsqueeze(1), bandwidth.view(-1, 1, 1)  # (R, 1, d_sae), (R, 1, 1)
            latents = JumpReLUFunction.apply(pre, threshold, eps)
            recon = self.decode(latents, x)
            l0 = StepFunction.apply(pre, threshold, eps).sum(dim=-1, dtype=self.W_dec.dtype).mean(dim=-1)  # (R,)
            fired = (latents.detach() > 0).sum(dim=1, dtype=self.W_dec.dtype)
        mse = self.mse(x if target is None else target, recon)
        aux_loss = (self._l0_scale if l0_scale is None else l0_scale) * self.l0_coefficient * l0
        return {"loss": mse + aux_loss, "mse": mse, "aux_loss": aux_loss, "l0": l0.detach(),
                "latents": latents, "recon": recon, "fired": fired}
