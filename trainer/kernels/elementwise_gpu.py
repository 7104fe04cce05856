"""The dense architectures' elementwise passes on a GPU: one Triton kernel forward, one backward.

JumpReLU (`JumpReLUStep`), ReLU with its L1 penalty's batch sums (`ReLUStep`, the standard SAE) and
the gated SAE's gate and magnitudes (`GatedStep`).

Through autograd (trainer/sae_jumprelu.py: `JumpReLUFunction`, `StepFunction`, the L0 sum and the
firing counts) the step makes about twenty passes over the (R, batch, d_sae) pre-activations:
compares, casts, masks, the rectangle kernel's terms, and their sums over the batch, each a
full-size read and write (about 17 GB a step at d_in 2304, d_sae 65536, batch 4096). Here:

- forward: reads the pre-activations once and writes the latents once; each tile also counts, per
  latent, the tokens it fires on (the firing counts, and L0 = their sum / batch);
- backward: reads the pre-activations and the latents' gradient once and writes the
  pre-activations' gradient once; the thresholds' straight-through gradient (both estimators:
  the JumpReLU's and the L0 step's, the latter with L0's own gradient) is summed per tile.

Per-tile column sums go to a (row blocks, R, d_sae) buffer summed after, not to atomics, so the
result does not depend on scheduling (a resumed run repeats an uninterrupted one bit for bit). The
ReLU pair does the same for the standard SAE (its L1 needs each latent's batch sum, its L0 the
firing counts: both come out of the forward's tiles). The gated pair takes the encoder's product z
once for both paths (pi_gate = z + b_gate, pi_mag = z * exp(r_mag) + b_mag, as
`GatedSAE.gate_and_magnitude`), writes the latents and the gate's ReLU, and its backward writes z's
gradient once with the three per-latent parameters' gradients as per-tile sums. The plain paths in
trainer/sae_jumprelu.py, trainer/sae_standard.py and trainer/sae_gated.py are the reference
(tests/test_adam_tail.py compares them in float64, in Triton's interpreter on a CPU).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd import Function

from trainer.kernels.adam_tail import triton

BLOCK_B, BLOCK_S = 32, 128

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _tile(B, S, n_bblocks, BB: tl.constexpr, BS: tl.constexpr):
        # Program (run x row block, column block) of an (R, B, S) tensor: its run, row block, columns,
        # the columns' and the tile's masks, and the tile's element offsets.
        pid = tl.program_id(0)
        run, bblock = pid // n_bblocks, pid % n_bblocks
        rows = bblock * BB + tl.arange(0, BB)
        cols = tl.program_id(1) * BS + tl.arange(0, BS)
        cmask = cols < S
        mask = (rows < B)[:, None] & cmask[None, :]
        offs = (run.to(tl.int64) * B + rows[:, None]) * S + cols[None, :]
        return run, bblock, cols, cmask, mask, offs

    @triton.jit
    def _forward(PRE, THR, LAT, FIRED, R, B, S, n_bblocks, BB: tl.constexpr, BS: tl.constexpr):
        run, bblock, cols, cmask, mask, offs = _tile(B, S, n_bblocks, BB, BS)
        pre = tl.load(PRE + offs, mask=mask, other=0.0)
        thr = tl.load(THR + run * S + cols, mask=cmask, other=0.0)
        fire = (pre.to(thr.dtype) > thr[None, :]) & mask
        tl.store(LAT + offs, tl.where(fire, pre, 0.0), mask=mask)
        tl.store(FIRED + (bblock.to(tl.int64) * R + run) * S + cols,
                 tl.sum(fire.to(thr.dtype), axis=0), mask=cmask)

    @triton.jit
    def _backward(PRE, THR, EPS, GLAT, GL0, GPRE, GTHR, R, B, S, n_bblocks, BB: tl.constexpr, BS: tl.constexpr):
        run, bblock, cols, cmask, mask, offs = _tile(B, S, n_bblocks, BB, BS)
        pre = tl.load(PRE + offs, mask=mask, other=0.0)
        g = tl.load(GLAT + offs, mask=mask, other=0.0)
        thr = tl.load(THR + run * S + cols, mask=cmask, other=0.0)
        eps = tl.load(EPS + run)
        p = pre.to(thr.dtype)
        t = thr[None, :]
        tl.store(GPRE + offs, tl.where(p > t, g, 0.0), mask=mask)
        u = (p - t) / eps
        k = ((u > -0.5) & (u < 0.5) & mask).to(thr.dtype)
        # JumpReLU's estimator with the latents' gradient, the step's with L0's (L0 = mean over tokens).
        ste = -(t / eps) * k * g.to(thr.dtype) + (-(1.0 / eps) * k) * (tl.load(GL0 + run) / B)
        tl.store(GTHR + (bblock.to(tl.int64) * R + run) * S + cols,
                 tl.sum(ste, axis=0), mask=cmask)


    @triton.jit
    def _relu_forward(PRE, LAT, SUMS, FIRED, R, B, S, n_bblocks, BB: tl.constexpr, BS: tl.constexpr):
        run, bblock, cols, cmask, mask, offs = _tile(B, S, n_bblocks, BB, BS)
        pre = tl.load(PRE + offs, mask=mask, other=0.0)
        lat = tl.where(pre > 0, pre, 0.0)
        tl.store(LAT + offs, lat, mask=mask)
        part = (bblock.to(tl.int64) * R + run) * S + cols
        tl.store(SUMS + part, tl.sum(lat.to(SUMS.dtype.element_ty), axis=0), mask=cmask)
        tl.store(FIRED + part, tl.sum((lat > 0).to(SUMS.dtype.element_ty), axis=0), mask=cmask)

    @triton.jit
    def _relu_backward(PRE, GLAT, GSUMS, GPRE, B, S, n_bblocks, BB: tl.constexpr, BS: tl.constexpr):
        run, bblock, cols, cmask, mask, offs = _tile(B, S, n_bblocks, BB, BS)
        pre = tl.load(PRE + offs, mask=mask, other=0.0)
        g = tl.load(GLAT + offs, mask=mask, other=0.0)
        gs = tl.load(GSUMS + run * S + cols, mask=cmask, other=0.0)
        # The batch sum's gradient reaches every token of its latent; ReLU passes it where pre > 0.
        tl.store(GPRE + offs, tl.where(pre > 0, g.to(gs.dtype) + gs[None, :], 0.0), mask=mask)


    @triton.jit
    def _gated_forward(Z, BG, SC, BM, LAT, GATE, SUMS, FIRED, R, B, S, n_bblocks,
                       BB: tl.constexpr, BS: tl.constexpr):
        run, bblock, cols, cmask, mask, offs = _tile(B, S, n_bblocks, BB, BS)
        bg = tl.load(BG + run * S + cols, mask=cmask, other=0.0)
        sc = tl.load(SC + run * S + cols, mask=cmask, other=0.0)
        bm = tl.load(BM + run * S + cols, mask=cmask, other=0.0)
        z = tl.load(Z + offs, mask=mask, other=0.0).to(bg.dtype)
        pi_gate = z + bg[None, :]
        pi_mag = z * sc[None, :] + bm[None, :]
        open_ = (pi_gate > 0) & mask
        fire = open_ & (pi_mag > 0)
        gate = tl.where(open_, pi_gate, 0.0)
        tl.store(LAT + offs, tl.where(fire, pi_mag, 0.0).to(LAT.dtype.element_ty), mask=mask)
        tl.store(GATE + offs, gate.to(GATE.dtype.element_ty), mask=mask)
        part = (bblock.to(tl.int64) * R + run) * S + cols
        tl.store(SUMS + part, tl.sum(gate, axis=0), mask=cmask)
        tl.store(FIRED + part, tl.sum(fire.to(bg.dtype), axis=0), mask=cmask)

    @triton.jit
    def _gated_backward(Z, BG, SC, BM, GLAT, GGATE, GSUMS, GZ, PART, R, B, S, n_bblocks,
                        BB: tl.constexpr, BS: tl.constexpr):
        run, bblock, cols, cmask, mask, offs = _tile(B, S, n_bblocks, BB, BS)
        bg = tl.load(BG + run * S + cols, mask=cmask, other=0.0)
        sc = tl.load(SC + run * S + cols, mask=cmask, other=0.0)
        bm = tl.load(BM + run * S + cols, mask=cmask, other=0.0)
        gs = tl.load(GSUMS + run * S + cols, mask=cmask, other=0.0).to(bg.dtype)
        z = tl.load(Z + offs, mask=mask, other=0.0).to(bg.dtype)
        g_lat = tl.load(GLAT + offs, mask=mask, other=0.0).to(bg.dtype)
        g_gate = tl.load(GGATE + offs, mask=mask, other=0.0).to(bg.dtype)
        pi_gate = z + bg[None, :]
        pi_mag = z * sc[None, :] + bm[None, :]
        open_ = (pi_gate > 0) & mask
        # H(pi_gate) passes no gradient: the gate learns from relu(pi_gate)'s terms (the auxiliary
        # reconstruction's and the L1 batch sum's, which reaches every token of its latent).
        g_pg = tl.where(open_, g_gate + gs[None, :], 0.0)
        g_pm = tl.where(open_ & (pi_mag > 0), g_lat, 0.0)
        tl.store(GZ + offs, (g_pg + g_pm * sc[None, :]).to(GZ.dtype.element_ty), mask=mask)
        # Three (row blocks, R, S) planes: b_gate's, the magnitude scale's and b_mag's per-tile sums.
        part = (bblock.to(tl.int64) * R + run) * S + cols
        plane = n_bblocks.to(tl.int64) * R * S
        tl.store(PART + part, tl.sum(g_pg, axis=0), mask=cmask)
        tl.store(PART + plane + part, tl.sum(g_pm * z, axis=0), mask=cmask)
        tl.store(PART + 2 * plane + part, tl.sum(g_pm, axis=0), mask=cmask)


def _grid(R: int, B: int, S: int) -> tuple[int, int, int]:
    n_bblocks = triton.cdiv(B, BLOCK_B)
    return n_bblocks, R * n_bblocks, triton.cdiv(S, BLOCK_S)


@torch.library.custom_op("sae::jumprelu_forward", mutates_args=())
def jumprelu_forward(pre: torch.Tensor, threshold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents like `pre` (R, B, S), fired (R, S) in threshold's dtype): pre where pre > threshold (R, S),
    and per latent the tokens it fired on."""
    R, B, S = pre.shape
    n_bblocks, rows, cols = _grid(R, B, S)
    latents = torch.empty_like(pre)
    partial = torch.empty(n_bblocks, R, S, dtype=threshold.dtype, device=pre.device)
    if pre.numel():
        _forward[(rows, cols)](pre, threshold, latents, partial, R, B, S, n_bblocks, BB=BLOCK_B, BS=BLOCK_S)
    return latents, partial.sum(dim=0)


@jumprelu_forward.register_fake
def _(pre: torch.Tensor, threshold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(pre), threshold.new_empty(threshold.shape)


@torch.library.custom_op("sae::jumprelu_backward", mutates_args=())
def jumprelu_backward(pre: torch.Tensor, threshold: torch.Tensor, bandwidth: torch.Tensor, grad_latents: torch.Tensor,
                      grad_l0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad of pre, like `grad_latents`; grad of threshold (R, S)) for `jumprelu_forward`'s latents and
    L0 = fired.sum(-1) / B, with `bandwidth` (R,) the rectangle kernel's width."""
    R, B, S = pre.shape
    n_bblocks, rows, cols = _grid(R, B, S)
    grad_pre = torch.empty_like(grad_latents)
    partial = torch.empty(n_bblocks, R, S, dtype=threshold.dtype, device=pre.device)
    if pre.numel():
        _backward[(rows, cols)](pre, threshold, bandwidth, grad_latents, grad_l0, grad_pre, partial, R, B, S,
                                n_bblocks,
                                BB=BLOCK_B, BS=BLOCK_S)
    return grad_pre, partial.sum(dim=0)


@jumprelu_backward.register_fake
def _(pre, threshold, bandwidth, grad_latents, grad_l0) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(grad_latents), threshold.new_empty(threshold.shape)


class JumpReLUStep(Function):
    """(latents, l0 (R,), fired (R, S)) of pre (R, B, S) against threshold (R, S) with bandwidth (R,):
    what `JumpReLUFunction`, `StepFunction`'s L0 and the firing counts give, and their gradients."""

    @staticmethod
    def forward(ctx: Any, pre: torch.Tensor, threshold: torch.Tensor, bandwidth: torch.Tensor) -> tuple:
        pre = pre.contiguous()
        latents, fired = jumprelu_forward(pre, threshold.contiguous())
        ctx.save_for_backward(pre, threshold, bandwidth)
        ctx.mark_non_differentiable(fired)
        return latents, fired.sum(dim=-1) / pre.shape[1], fired

    @staticmethod
    def backward(ctx: Any, grad_latents: torch.Tensor | None, grad_l0: torch.Tensor | None, _: Any) -> tuple:
        pre, threshold, bandwidth = ctx.saved_tensors
        grad_latents = torch.zeros_like(pre) if grad_latents is None else grad_latents.contiguous()
        grad_l0 = torch.zeros_like(bandwidth) if grad_l0 is None else grad_l0.to(bandwidth.dtype).contiguous()
        grad_pre, grad_threshold = jumprelu_backward(pre, threshold.contiguous(), bandwidth.contiguous(),
                                                     grad_latents, grad_l0)
        return grad_pre, grad_threshold, None


@torch.library.custom_op("sae::relu_forward", mutates_args=())
def relu_forward(pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(latents = relu(pre) like `pre` (R, B, S); per latent their batch sum and firing count, (R, S)
    float32 (float64 for float64 input))."""
    R, B, S = pre.shape
    n_bblocks, rows, cols = _grid(R, B, S)
    latents = torch.empty_like(pre)
    sums = torch.empty(n_bblocks, R, S, dtype=_sum_dtype(pre), device=pre.device)
    fired = torch.empty_like(sums)
    if pre.numel():
        _relu_forward[(rows, cols)](pre, latents, sums, fired, R, B, S, n_bblocks, BB=BLOCK_B, BS=BLOCK_S)
    return latents, sums.sum(dim=0), fired.sum(dim=0)


def _sum_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@relu_forward.register_fake
def _(pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    R, _, S = pre.shape
    return torch.empty_like(pre), pre.new_empty(R, S, dtype=_sum_dtype(pre)), pre.new_empty(R, S, dtype=_sum_dtype(pre))


@torch.library.custom_op("sae::relu_backward", mutates_args=())
def relu_backward(pre: torch.Tensor, grad_latents: torch.Tensor, grad_sums: torch.Tensor) -> torch.Tensor:
    """The gradient of pre (like `grad_latents`) for `relu_forward`'s latents and batch sums."""
    R, B, S = pre.shape
    n_bblocks, rows, cols = _grid(R, B, S)
    grad_pre = torch.empty_like(grad_latents)
    if pre.numel():
        _relu_backward[(rows, cols)](pre, grad_latents, grad_sums, grad_pre, B, S, n_bblocks, BB=BLOCK_B, BS=BLOCK_S)
    return grad_pre


@relu_backward.register_fake
def _(pre: torch.Tensor, grad_latents: torch.Tensor, grad_sums: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(grad_latents)


class ReLUStep(Function):
    """(latents, sums (R, S), fired (R, S)) of pre (R, B, S): relu(pre), each latent's batch sum (the
    decoder-norm-weighted L1 needs only these) and its firing count, with their gradients."""

    @staticmethod
    def forward(ctx: Any, pre: torch.Tensor) -> tuple:
        pre = pre.contiguous()
        latents, sums, fired = relu_forward(pre)
        ctx.save_for_backward(pre)
        ctx.mark_non_differentiable(fired)
        return latents, sums, fired

    @staticmethod
    def backward(ctx: Any, grad_latents: torch.Tensor | None, grad_sums: torch.Tensor | None, _: Any) -> tuple:
        (pre,) = ctx.saved_tensors
        grad_latents = torch.zeros_like(pre) if grad_latents is None else grad_latents.contiguous()
        R, _, S = pre.shape
        grad_sums = pre.new_zeros(R, S, dtype=_sum_dtype(pre)) if grad_sums is None else \
            grad_sums.to(_sum_dtype(pre)).contiguous()
        return (relu_backward(pre, grad_latents, grad_sums),)


class RowNorms(Function):
    """(R, S) norms of W's rows (R, S, d), with a backward of one pass (W times each row's gradient over
    its norm) where autograd's takes three (a division, a mask for zero norms, a product)."""

    @staticmethod
    def forward(ctx: Any, W: torch.Tensor) -> torch.Tensor:
        norms = torch.linalg.vector_norm(W, dim=-1)
        ctx.save_for_backward(W, norms)
        return norms

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        W, norms = ctx.saved_tensors
        # A zero row (norm 0) gets 0, as autograd's masked form gives.
        return W * (grad / norms.clamp_min(torch.finfo(norms.dtype).tiny)).unsqueeze(-1)


@torch.library.custom_op("sae::gated_forward", mutates_args=())
def gated_forward(z: torch.Tensor, b_gate: torch.Tensor, mag_scale: torch.Tensor,
                  b_mag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(latents, gate_acts, sums, fired) of the gated SAE from the encoder's product without bias z
    (R, B, S) and per-latent b_gate, mag_scale = exp(r_mag), b_mag (R, S): latents =
    H(z + b_gate) * relu(z * mag_scale + b_mag) and gate_acts = relu(z + b_gate), both like `z`; per
    latent the gate's batch sum and the firing count, (R, S) in b_gate's dtype."""
    R, B, S = z.shape
    n_bblocks, rows, cols = _grid(R, B, S)
    latents, gate_acts = torch.empty_like(z), torch.empty_like(z)
    sums = torch.empty(n_bblocks, R, S, dtype=b_gate.dtype, device=z.device)
    fired = torch.empty_like(sums)
    if z.numel():
        _gated_forward[(rows, cols)](z, b_gate, mag_scale, b_mag, latents, gate_acts, sums, fired, R, B, S,
                                     n_bblocks, BB=BLOCK_B, BS=BLOCK_S)
    return latents, gate_acts, sums.sum(dim=0), fired.sum(dim=0)


@gated_forward.register_fake
def _(z, b_gate, mag_scale, b_mag) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.empty_like(z), torch.empty_like(z), b_gate.new_empty(b_gate.shape), b_gate.new_empty(b_gate.shape)


@torch.library.custom_op("sae::gated_backward", mutates_args=())
def gated_backward(z: torch.Tensor, b_gate: torch.Tensor, mag_scale: torch.Tensor, b_mag: torch.Tensor,
                   grad_latents: torch.Tensor, grad_gate_acts: torch.Tensor,
                   grad_sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad of z, like `z`; grads of b_gate, mag_scale, b_mag, (R, S)) for `gated_forward`'s latents,
    gate_acts and sums."""
    R, B, S = z.shape
    n_bblocks, rows, cols = _grid(R, B, S)
    grad_z = torch.empty_like(z)
    partial = torch.empty(3, n_bblocks, R, S, dtype=b_gate.dtype, device=z.device)
    if z.numel():
        _gated_backward[(rows, cols)](z, b_gate, mag_scale, b_mag, grad_latents, grad_gate_acts, grad_sums, grad_z,
                                      partial, R, B, S, n_bblocks, BB=BLOCK_B, BS=BLOCK_S)
    # One sum per plane: a custom op's outputs may not be views of one tensor.
    return grad_z, partial[0].sum(dim=0), partial[1].sum(dim=0), partial[2].sum(dim=0)


@gated_backward.register_fake
def _(z, b_gate, mag_scale, b_mag, grad_latents, grad_gate_acts, grad_sums) -> tuple:
    return (torch.empty_like(z), b_gate.new_empty(b_gate.shape), b_gate.new_empty(b_gate.shape),
            b_gate.new_empty(b_gate.shape))


class GatedStep(Function):
    """(latents, gate_acts, sums (R, S), fired (R, S)) of the gated SAE from z (R, B, S), the encoder's
    product without bias, and b_gate, mag_scale = exp(r_mag), b_mag (R, S): what GatedSAE's `gate`,
    relu(pi_gate), its batch sum (the frozen-norm L1 needs only these) and the firing counts give,
    with their gradients (none through the gate's step, as `gate`'s)."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, b_gate: torch.Tensor, mag_scale: torch.Tensor,
                b_mag: torch.Tensor) -> tuple:
        z, b_gate, mag_scale, b_mag = (t.contiguous() for t in (z, b_gate, mag_scale, b_mag))
        latents, gate_acts, sums, fired = gated_forward(z, b_gate, mag_scale, b_mag)
        ctx.save_for_backward(z, b_gate, mag_scale, b_mag)
        ctx.mark_non_differentiable(fired)
        return latents, gate_acts, sums, fired

    @staticmethod
    def backward(ctx: Any, grad_latents: torch.Tensor | None, grad_gate_acts: torch.Tensor | None,
                 grad_sums: torch.Tensor | None, _: Any) -> tuple:
        z, b_gate, mag_scale, b_mag = ctx.saved_tensors
        grad_latents = torch.zeros_like(z) if grad_latents is None else grad_latents.contiguous()
        grad_gate_acts = torch.zeros_like(z) if grad_gate_acts is None else grad_gate_acts.contiguous()
        grad_sums = torch.zeros_like(b_gate) if grad_sums is None else grad_sums.to(b_gate.dtype).contiguous()
        return gated_backward(z, b_gate, mag_scale, b_mag, grad_latents, grad_gate_acts, grad_sums)
