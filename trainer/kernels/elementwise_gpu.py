"""The dense architectures' elementwise passes on a GPU: one Triton kernel forward, one backward.

JumpReLU (`JumpReLUStep`) and ReLU with its L1 penalty's batch sums (`ReLUStep`, the standard SAE).

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
firing counts: both come out of the forward's tiles). The plain paths in trainer/sae_jumprelu.py and
trainer/sae_standard.py are the reference (tests/test_adam_tail.py compares them in
float64, in Triton's interpreter on a CPU).
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
    def _forward(PRE, THR, LAT, FIRED, R, B, S, n_bblocks, BB: tl.constexpr, BS: tl.constexpr):
        pid = tl.program_id(0)
        run, bblock = pid // n_bblocks, pid % n_bblocks
        rows = bblock * BB + tl.arange(0, BB)
        cols = tl.program_id(1) * BS + tl.arange(0, BS)
        rmask, cmask = rows < B, cols < S
        mask = rmask[:, None] & cmask[None, :]
        offs = (run.to(tl.int64) * B + rows[:, None]) * S + cols[None, :]
        pre = tl.load(PRE + offs, mask=mask, other=0.0)
        thr = tl.load(THR + run * S + cols, mask=cmask, other=0.0)
        fire = (pre.to(thr.dtype) > thr[None, :]) & mask
        tl.store(LAT + offs, tl.where(fire, pre, 0.0), mask=mask)
        tl.store(FIRED + (bblock.to(tl.int64) * R + run) * S + cols,
                 tl.sum(fire.to(thr.dtype), axis=0), mask=cmask)

    @triton.jit
    def _backward(PRE, THR, EPS, GLAT, GL0, GPRE, GTHR, R, B, S, n_bblocks, BB: tl.constexpr, BS: tl.constexpr):
        pid = tl.program_id(0)
        run, bblock = pid // n_bblocks, pid % n_bblocks
        rows = bblock * BB + tl.arange(0, BB)
        cols = tl.program_id(1) * BS + tl.arange(0, BS)
        rmask, cmask = rows < B, cols < S
        mask = rmask[:, None] & cmask[None, :]
        offs = (run.to(tl.int64) * B + rows[:, None]) * S + cols[None, :]
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
        pid = tl.program_id(0)
        run, bblock = pid // n_bblocks, pid % n_bblocks
        rows = bblock * BB + tl.arange(0, BB)
        cols = tl.program_id(1) * BS + tl.arange(0, BS)
        rmask, cmask = rows < B, cols < S
        mask = rmask[:, None] & cmask[None, :]
        offs = (run.to(tl.int64) * B + rows[:, None]) * S + cols[None, :]
        pre = tl.load(PRE + offs, mask=mask, other=0.0)
        lat = tl.where(pre > 0, pre, 0.0)
        tl.store(LAT + offs, lat, mask=mask)
        part = (bblock.to(tl.int64) * R + run) * S + cols
        tl.store(SUMS + part, tl.sum(lat.to(SUMS.dtype.element_ty), axis=0), mask=cmask)
        tl.store(FIRED + part, tl.sum((lat > 0).to(SUMS.dtype.element_ty), axis=0), mask=cmask)

    @triton.jit
    def _relu_backward(PRE, GLAT, GSUMS, GPRE, B, S, n_bblocks, BB: tl.constexpr, BS: tl.constexpr):
        pid = tl.program_id(0)
        run, bblock = pid // n_bblocks, pid % n_bblocks
        rows = bblock * BB + tl.arange(0, BB)
        cols = tl.program_id(1) * BS + tl.arange(0, BS)
        rmask, cmask = rows < B, cols < S
        mask = rmask[:, None] & cmask[None, :]
        offs = (run.to(tl.int64) * B + rows[:, None]) * S + cols[None, :]
        pre = tl.load(PRE + offs, mask=mask, other=0.0)
        g = tl.load(GLAT + offs, mask=mask, other=0.0)
        gs = tl.load(GSUMS + run * S + cols, mask=cmask, other=0.0)
        # The batch sum's gradient reaches every token of its latent; ReLU passes it where pre > 0.
        tl.store(GPRE + offs, tl.where(pre > 0, g.to(gs.dtype) + gs[None, :], 0.0), mask=mask)


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
