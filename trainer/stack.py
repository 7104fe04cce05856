"""Turning a list of per-run configs into one stack: shared shape fields, per-run `(R,)` tensors."""

from __future__ import annotations

from typing import Any, Sequence, TypedDict

import torch
from torch import nn

from pipeline.errors import PipelineError
from trainer.init import init_b_dec_, init_tied_weights_
from trainer.precision import autocast_enabled


def as_config_list(cfgs: Any, config_class: type) -> list:
    """A single config or a non-empty sequence of configs of `config_class`, as a list."""
    if isinstance(cfgs, config_class):
        return [cfgs]
    cfgs = list(cfgs)
    if not cfgs:
        raise PipelineError("a stack needs at least one run config")
    for c in cfgs:
        if not isinstance(c, config_class):
            raise PipelineError(f"expected {config_class.__name__} configs, got {type(c).__name__}")
    return cfgs


def shared(cfgs: Sequence, name: str) -> Any:
    """A field every run of the stack must agree on (a shape): its value, else a PipelineError."""
    values = [getattr(c, name) for c in cfgs]
    if any(v != values[0] for v in values):
        raise PipelineError(f"runs stacked together must share {name}; got {values}. "
                            f"Put runs with different {name} in different stacks")
    return values[0]


def per_run(cfgs: Sequence, name: str, dtype: torch.dtype) -> torch.Tensor:
    """A per-run field as an `(R,)` tensor."""
    return torch.tensor([getattr(c, name) for c in cfgs], dtype=dtype)


class StepOutput(TypedDict, total=False):
    """What an architecture's training forward returns, per run of its stack. The loop backpropagates
    `loss.sum()`, reads `fired` for the dead and dense fractions (every architecture counts them in its
    own pass over the latents), and logs every other (R,) entry (`aux_loss`, `l1`, `threshold`, ...)."""

    loss: torch.Tensor
    """(R,) each run's loss; a run's loss depends on its own parameters only."""
    mse: torch.Tensor
    """(R,) squared error summed over the width, averaged over the batch."""
    aux_loss: torch.Tensor
    """(R,) what the loss adds to the reconstruction's (penalties, AuxK)."""
    l0: torch.Tensor
    """(R,) latents active per token, averaged over the batch."""
    recon: torch.Tensor
    """(R, batch, d_out) the reconstruction."""
    fired: torch.Tensor
    """(R, d_sae) per latent, the tokens of the batch it is active on."""
    latents: torch.Tensor
    """(R, batch, d_sae), where an architecture has them dense anyway (the TopK family gives its sparse
    codes instead: `latent_idx`, `latent_vals`)."""


class _CentreGrad(torch.autograd.Function):
    """`bias` itself; its gradient also goes to the centre as -W_enc @ grad (and none to W_enc)."""

    @staticmethod
    def forward(ctx: Any, bias: torch.Tensor, centre: torch.Tensor, W_enc: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(W_enc)
        return bias.view_as(bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        (W_enc,) = ctx.saved_tensors
        if not ctx.needs_input_grad[1]:
            return grad, None, None
        return grad, -torch.bmm(W_enc, grad.to(W_enc.dtype).unsqueeze(-1)).squeeze(-1), None


KERNELS = ("auto", "fused", "plain")
"""The training forward's path: `plain` (autograd through the formulas, the reference), `fused` (the
architecture's hand-written kernel), `auto` (per device, the one measured faster: `fused_on`)."""


class StackedSAE(nn.Module):
    """What every architecture here shares: R runs of a tied-init linear encoder and decoder.

    Parameters `W_enc (R, d_in, d_sae)`, `b_enc (R, d_sae)`, `W_dec (R, d_sae, d_in)`,
    `b_dec (R, d_in)`; subclasses add their activation function, loss and per-run buffers.
    """

    config_class: type = object
    supports_transcoder: bool = False
    """Whether a config's `d_out` may make it a transcoder (its forward takes a `target`); such an
    architecture's config may also set `skip` (a skip-transcoder: `skip_path`)."""
    dense_matmuls: int = 5
    """(batch x d_in x d_sae) matmuls a dense step of this architecture needs (forward and
    backward): encoder, decoder, and the decoder's and encoder's gradients. The benchmark's bound."""
    fused_matmuls: int | None = None
    """(batch x d_in x d_sae) matmuls its fused step needs, where that differs from `dense_matmuls`
    (the TopK family's sparse step: the encoder's forward only). The cost model's floor."""
    latent_major_encoder: bool = False
    """Store W_enc as (R, d_sae, d_in) memory, seen as (R, d_in, d_sae): where the fused step gathers
    and produces encoder rows per latent (the TopK family's sparse kernels), its gradient then comes
    in the parameter's own layout (no copy a step)."""
    fused_on: frozenset = frozenset()
    """Device types on which `kernels="auto"` takes the fused path (empty: no fused kernel)."""
    fused_autocast: bool = True
    """Whether the fused kernel computes in autocast's dtype (bf16); if not, bf16 takes the plain path."""
    fused_transcoder: bool = False
    """Whether the fused kernel handles a transcoder (d_out != d_in or a separate target)."""
    kernels: str = "auto"
    """`KERNELS`: which training forward to run; set by the loop from its config."""

    def __init__(self, cfgs: Any):
        super().__init__()
        self.cfgs = as_config_list(cfgs, self.config_class)
        R = len(self.cfgs)
        self.d_in = d_in = shared(self.cfgs, "d_in")
        self.d_sae = d_sae = shared(self.cfgs, "d_sae")
        d_out = shared(self.cfgs, "d_out") if hasattr(self.cfgs[0], "d_out") else None
        if d_out is not None and not self.supports_transcoder:
            raise PipelineError(f"architecture {getattr(self, 'architecture_name', type(self).__name__)!r} cannot be "
                                "trained as a transcoder; use topk, batchtopk, standard or jumprelu")
        # A transcoder reads d_in and reconstructs another hook of width d_out; an SAE has d_out = d_in.
        self.is_transcoder = d_out is not None
        self.d_out = d_out = d_out if d_out is not None else d_in
        # (R, d_in, d_sae) either way; latent-major storage keeps each latent's encoder row contiguous.
        W_enc = (torch.empty(R, d_sae, d_in).transpose(1, 2) if self.latent_major_encoder
                 else torch.empty(R, d_in, d_sae))
        self.W_enc = nn.Parameter(W_enc)
        self.b_enc = nn.Parameter(torch.empty(R, d_sae))
        self.W_dec = nn.Parameter(torch.empty(R, d_sae, d_out))
        self.b_dec = nn.Parameter(torch.zeros(R, d_out))
        # What is subtracted from the input: b_dec for an SAE. A transcoder's b_dec lives in the output
        # space (SAELens's Transcoder has no input bias); it centres its input on a fixed b_in set from
        # the data at the start (training is slow without), folded into b_enc on export.
        self.register_buffer("b_in", torch.zeros(R, d_in) if self.is_transcoder else None)
        # A skip-transcoder (Paulo et al. 2025) adds a linear path from input to output, (x - b_in) @ W_skip;
        # zero at init (as theirs, sparsify's and SAELens's), so training starts as a plain transcoder.
        self.has_skip = bool(shared(self.cfgs, "skip")) if hasattr(self.cfgs[0], "skip") else False
        if self.has_skip and not self.is_transcoder:
            raise PipelineError("skip = true needs a transcoder (d_out, --hook-out): the skip path maps the input "
                                "hook to another one; drop skip for an SAE")
        self.W_skip = nn.Parameter(torch.zeros(R, d_in, d_out)) if self.has_skip else None
        init_tied_weights_(self.W_enc.data, self.W_dec.data, self.b_enc.data, [c.seed for c in self.cfgs],
                           per_run(self.cfgs, "dec_init_norm", torch.float32), tied=not self.is_transcoder)

    @property
    def n_runs(self) -> int:
        return self.W_enc.shape[0]

    @property
    def input_bias(self) -> torch.Tensor:
        """(R, d_in) subtracted from the input before encoding: b_dec, or zeros for a transcoder."""
        return self.b_in if self.is_transcoder else self.b_dec

    def transcoder_cfg(self, architecture: str) -> dict:
        """cfg.json fields of a transcoder export (SAELens's Transcoder: no b_dec on the input); a
        skip-transcoder's kind names it (`transcoder` -> `skip_transcoder`, `jumprelu_transcoder` ->
        `jumprelu_skip_transcoder`, as SAELens's)."""
        if self.has_skip:
            architecture = architecture.replace("transcoder", "skip_transcoder")
        return {"architecture": architecture, "d_out": self.d_out, "apply_b_dec_to_input": False}

    def use_fused(self, x: torch.Tensor) -> bool:
        """Whether this forward takes the fused kernel (`kernels`, the device, autocast, transcoder)."""
        if self.kernels not in KERNELS:
            raise PipelineError(f"unknown kernels {self.kernels!r}; use one of {', '.join(KERNELS)}")
        if self.kernels == "plain" or not self.fused_on:
            return False
        why_not = self._why_not_fused(autocast_enabled(x.device.type))
        if self.kernels == "fused":
            if why_not:
                raise PipelineError(f"the fused {self.architecture_name} kernel {why_not}; "
                                    "or use --kernels plain / auto")
            return True
        return self.auto_fused(x.device.type, autocast_enabled(x.device.type))

    def auto_fused(self, device_type: str, autocast: bool) -> bool:
        """Whether `kernels="auto"` takes the fused kernel on `device_type` (with autocast on or off)."""
        return bool(self.fused_on) and self._why_not_fused(autocast) is None and device_type in self.fused_on

    def _why_not_fused(self, autocast: bool) -> str | None:
        if self.is_transcoder and not self.fused_transcoder:
            return "does not handle transcoders"
        if not self.fused_autocast and autocast:
            return "computes in float32 (use --precision fp32 or tf32 with it)"
        return None

    # -- hooks the training loop calls (an architecture overrides what it needs) ----------------

    def on_step(self, step: int, total_steps: int | None) -> None:
        """Before each step's forward: set schedules (L1 warm-up, k annealing). Must not sync the device."""

    def after_step(self, out: dict[str, torch.Tensor], n_tokens: int) -> None:
        """After each optimizer step, with that step's forward output: dead-latent counts, thresholds."""

    def export_run(self, run: int) -> tuple[dict[str, torch.Tensor], dict]:
        """Run `run` as SAELens's inference SAE: (weights by SAELens's names, cfg.json fields).

        The base gives a ReLU SAE ("standard"); an architecture with another inference form
        (TopK, JumpReLU, ...) overrides it. Weights are this run's slice; the caller copies them."""
        weights = self.export_weights(run)
        return weights, self.transcoder_cfg("transcoder") if self.is_transcoder else {"architecture": "standard"}

    def export_weights(self, run: int, names: Sequence[str] = ("W_enc", "W_dec", "b_enc", "b_dec")) -> dict:
        """Run `run`'s slices of the named parameters as an export reads raw inputs: a transcoder's input
        centring b_in folded into b_enc, and a skip-transcoder's `W_skip` (d_out, d_in), as SAELens and
        circuit-tracer apply it (x @ W_skip.T), with its share of the centring folded into b_dec."""
        weights = {name: getattr(self, name)[run] for name in names}
        if self.is_transcoder:  # (x - b_in) @ W_enc + b_enc = x @ W_enc + (b_enc - b_in @ W_enc)
            weights["b_enc"] = weights["b_enc"] - self.b_in[run] @ weights["W_enc"]
        if self.has_skip:  # (x - b_in) @ W_skip + b_dec = x @ W_skip + (b_dec - b_in @ W_skip)
            weights["b_dec"] = weights["b_dec"] - self.b_in[run] @ self.W_skip[run]
            weights["W_skip"] = self.W_skip[run].T
        return weights

    @torch.no_grad()
    def copy_weights(self, run: int, weights: dict[str, torch.Tensor], names: Sequence[str]) -> None:
        """Copy saved `weights[name]` into run `run`'s slice of each named parameter, checking shapes."""
        for name in names:
            if name not in weights:
                raise PipelineError(f"SAE weights lack {name}; found {', '.join(sorted(weights))}")
            target = getattr(self, name)[run]
            if tuple(weights[name].shape) != tuple(target.shape):
                raise PipelineError(f"saved {name} has shape {tuple(weights[name].shape)}; this SAE needs "
                                    f"{tuple(target.shape)}")
            target.copy_(weights[name])

    @torch.no_grad()
    def load_run(self, run: int, weights: dict[str, torch.Tensor], cfg: dict) -> None:
        """Set run `run` from an export (`export_run`'s format, ours or SAELens's): continue training it."""
        self.copy_weights(run, weights, ("W_enc", "W_dec", "b_enc", "b_dec"))
        if self.is_transcoder:
            self.b_in[run].zero_()  # an export has its input centring folded into b_enc (and b_dec)
        if self.has_skip:
            if "W_skip" not in weights:
                raise PipelineError(f"this skip-transcoder needs W_skip, which the saved weights lack (a "
                                    f"{cfg.get('architecture', 'transcoder')!r} export); drop skip to load it")
            self.copy_weights(run, {"W_skip": weights["W_skip"].T}, ("W_skip",))

    def init_b_dec(self, sample: torch.Tensor, method: str = "mean", target: torch.Tensor | None = None) -> None:
        """b_dec from a sample batch: "mean" or "geometric_median" (see trainer.init.init_b_dec_).
        A transcoder's b_dec comes from its `target` sample, and its input centring b_in from `sample`."""
        if self.is_transcoder:
            if target is None:
                raise PipelineError("a transcoder's b_dec is initialised from its target batch; pass target")
            init_b_dec_(self.b_dec.data, target, method)
            if method != "keep":
                init_b_dec_(self.b_in, sample, method)
            return
        init_b_dec_(self.b_dec.data, sample, method)

    def _check_input(self, x: torch.Tensor) -> None:
        R = self.n_runs
        if x.shape[-1] != self.d_in or x.dim() not in (2, 3) or (x.dim() == 3 and x.shape[0] != R):
            raise PipelineError(f"input has shape {tuple(x.shape)}; expected (batch, {self.d_in}) "
                                f"or ({R}, batch, {self.d_in})")

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activations (R, batch, d_sae); x is (batch, d_in) or (R, batch, d_in)."""
        return self.project(x, self.b_enc)

    def project(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """`(x - input_bias) @ W_enc + bias` (R, batch, d_sae), for any (R, d_sae) `bias`."""
        self._check_input(x)
        centre = self.input_bias
        # (batch, d_in) - (R, 1, d_in) broadcasts to (R, batch, d_in): every run sees the same batch.
        x_centred = x - centre.detach().unsqueeze(1)
        if centre.requires_grad and torch.is_grad_enabled():
            # b_dec's gradient through the centring, without autograd's gradient of the centred input
            # (a sixth batch x d_in x d_sae matmul, summed over the batch right after): it is
            # -W_enc @ sum_b grad_pre, and sum_b grad_pre is the bias's gradient.
            bias = _CentreGrad.apply(bias, centre, self.W_enc)
        if x_centred.shape[0] == 1:
            # One run: a vector bias rides in the GEMM's epilogue (cuBLASLt), where baddbmm would first
            # copy it into the whole (batch, d_sae) output and read that back. squeeze, not [0]: its
            # backward is a view, where select's writes W_enc's gradient into a zeroed copy.
            return torch.addmm(bias.squeeze(0), x_centred.squeeze(0), self.W_enc.squeeze(0)).unsqueeze(0)
        return torch.baddbmm(bias.unsqueeze(1), x_centred, self.W_enc)

    def decode(self, latents: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruction (R, batch, d_out) from latents (R, batch, d_sae); a skip-transcoder also needs
        the input `x` the latents were encoded from (`add_skip`)."""
        return self.add_skip(torch.einsum("rbs,rsi->rbi", latents, self.W_dec) + self.b_dec.unsqueeze(1), x)

    def add_skip(self, recon: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
        """`recon` plus a skip-transcoder's linear path from its input, (x - b_in) @ W_skip (Paulo et al.
        2025, "Transcoders beat sparse autoencoders for interpretability"); `recon` itself otherwise."""
        if not self.has_skip:
            return recon
        if x is None:
            raise PipelineError("a skip-transcoder's reconstruction needs its input: call decode(latents, x)")
        x_centred = x - self.b_in.unsqueeze(1)  # (R, batch, d_in), as `project`'s
        return recon + torch.bmm(x_centred, self.W_skip)

    @staticmethod
    def mse(x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        """(R,) squared error summed over the width, averaged over the batch (SAELens's training MSE).
        `x` is the target: the input for an SAE, the other hook for a transcoder."""
        target = x if x.dim() == 3 else x.unsqueeze(0)
        return (target - recon).pow(2).sum(dim=-1).mean(dim=-1)
