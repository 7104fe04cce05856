"""The step's tail on a GPU in one pass per parameter: clipping, Adam and the decoder constraint.

The plain tail (trainer/optim.py) takes, for W_dec alone, a norm of its rows, the parallel-gradient
dots, an in-place projection of the gradient, the clipping norm, Adam, and a norm and a division to
put the rows back on the unit sphere: about 14 passes over a (d_sae x d_in) matrix. Here, per stack:

- `decoder_row_stats` reads W_dec and its gradient once and gives, per decoder row, the coefficient
  c = g.w / |w|^2 of the gradient's component along the row and the squared norm of what is left,
  g - c w: the clipping norm of the projected gradient, without writing it.
- `adam_` reads each parameter, its gradient and both moments once and writes them once: the
  gradient projected (decoder rows: minus c w), divided by its run's clipping scale, Adam's update
  at its run's lr (torch's fused Adam's arithmetic), and, for decoder rows, the row put back to unit
  norm while it is still in registers. A run flagged in `skip` is not touched.

Both are Triton kernels behind torch custom ops, so the step's cost model sees them as one op each
with the bytes they move (trainer/step_trace.py registers them); on the meta device they have fakes.
On a CPU they run in Triton's interpreter (TRITON_INTERPRET=1, set by the tests), which is how they
are checked against the plain tail in float64 (tests/test_adam_tail.py); CPU training keeps the
plain tail.
"""

from __future__ import annotations

import torch

NORM_EPS = 1e-12
"""A decoder row's norm is clamped to at least this (a zero row stays zero), here and in trainer.optim."""


try:  # optional: a CUDA build of torch brings it; the tests install it
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def available() -> bool:
    """Whether Triton can be imported."""
    return triton is not None


if triton is not None:  # TRITON_INTERPRET is read when the kernels are made (the tests set it first)
    @triton.jit
    def row_stats(W, G, C, SQ, d, eps2, BLOCK: tl.constexpr, ACC: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < d
        w = tl.load(W + row * d + offs, mask=mask, other=0.0).to(ACC)
        g = tl.load(G + row * d + offs, mask=mask, other=0.0).to(ACC)
        c = tl.sum(g * w, axis=0) / tl.maximum(tl.sum(w * w, axis=0), eps2)
        left = g - c * w
        tl.store(C + row, c)
        tl.store(SQ + row, tl.sum(left * left, axis=0))

    @triton.jit
    def adam_math(p, g, m, v, lr, beta1, beta2, eps, bc1, bc2_sqrt):
        # torch._fused_adam_'s arithmetic: m lerps toward g, v by g^2, bias corrections on the host.
        m = m + (1.0 - beta1) * (g - m)
        v = beta2 * v + (1.0 - beta2) * g * g
        p = p - (lr / bc1) * m / (tl.sqrt(v) / bc2_sqrt + eps)
        return p, m, v

    @triton.jit
    def adam_rows(P, G, M, V, C, LR, SCALE, SKIP, rows_per_run, d, beta1, beta2, eps, bc1, bc2_sqrt, norm_eps,
                  BLOCK: tl.constexpr, ACC: tl.constexpr):
        # One decoder row per program: the whole row is in registers, so it is renormalized in place.
        row = tl.program_id(0).to(tl.int64)
        run = row // rows_per_run
        offs = tl.arange(0, BLOCK)
        mask = offs < tl.where(tl.load(SKIP + run) == 0, d, 0)  # a skipped run: nothing read or written
        base = row * d
        p = tl.load(P + base + offs, mask=mask, other=0.0).to(ACC)
        g = tl.load(G + base + offs, mask=mask, other=0.0).to(ACC)
        m = tl.load(M + base + offs, mask=mask, other=0.0).to(ACC)
        v = tl.load(V + base + offs, mask=mask, other=0.0).to(ACC)
        g = (g - tl.load(C + row).to(ACC) * p) / tl.load(SCALE + run).to(ACC)
        p, m, v = adam_math(p, g, m, v, tl.load(LR + run).to(ACC), beta1, beta2, eps, bc1, bc2_sqrt)
        p = p / tl.maximum(tl.sqrt(tl.sum(p * p, axis=0)), norm_eps)
        tl.store(P + base + offs, p, mask=mask)
        tl.store(M + base + offs, m, mask=mask)
        tl.store(V + base + offs, v, mask=mask)

    @triton.jit
    def adam_flat(P, G, M, V, LR, SCALE, SKIP, n, beta1, beta2, eps, bc1, bc2_sqrt,
                  BLOCK: tl.constexpr, ACC: tl.constexpr):
        # Grid (runs, blocks): each run's slice is n contiguous elements.
        run = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < tl.where(tl.load(SKIP + run) == 0, n, 0)
        base = run * n
        p = tl.load(P + base + offs, mask=mask, other=0.0).to(ACC)
        g = tl.load(G + base + offs, mask=mask, other=0.0).to(ACC) / tl.load(SCALE + run).to(ACC)
        m = tl.load(M + base + offs, mask=mask, other=0.0).to(ACC)
        v = tl.load(V + base + offs, mask=mask, other=0.0).to(ACC)
        p, m, v = adam_math(p, g, m, v, tl.load(LR + run).to(ACC), beta1, beta2, eps, bc1, bc2_sqrt)
        tl.store(P + base + offs, p, mask=mask)
        tl.store(M + base + offs, m, mask=mask)
        tl.store(V + base + offs, v, mask=mask)


def _row_launch(d: int) -> dict:
    block = triton.next_power_of_2(d)
    return {"BLOCK": block, "num_warps": min(16, max(4, block // 256))}


def _acc(t: torch.Tensor):  # noqa: ANN202 - a triton dtype
    return tl.float64 if t.dtype == torch.float64 else tl.float32


@torch.library.custom_op("sae::decoder_row_stats", mutates_args=())
def decoder_row_stats(W: torch.Tensor, G: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of W (R, S, d) (contiguous, as its gradient G): (c, sq), each (R, S): c = g.w / max(|w|^2,
    eps^2) and sq = |g - c w|^2."""
    R, S, d = W.shape
    c = torch.empty(R, S, dtype=W.dtype, device=W.device)
    sq = torch.empty_like(c)
    row_stats[(R * S,)](W, G, c, sq, d, eps * eps, ACC=_acc(W), **_row_launch(d))
    return c, sq


@decoder_row_stats.register_fake
def _(W: torch.Tensor, G: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return W.new_empty(W.shape[:2]), W.new_empty(W.shape[:2])


@torch.library.custom_op("sae::adam_", mutates_args=("param", "exp_avg", "exp_avg_sq"))
def adam_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
          lr: torch.Tensor, scale: torch.Tensor, skip: torch.Tensor, coef: torch.Tensor | None,
          beta1: float, beta2: float, eps: float, bc1: float, bc2_sqrt: float) -> None:
    """One Adam step of a stacked parameter (R, ...), all four tensors contiguous and alike: the gradient
    divided by `scale` (R,) and, with `coef` (R, S) (decoder rows, param (R, S, d)), projected off each
    row first and the row put back to unit norm after; lr (R,); runs with skip (R,) != 0 untouched.
    `bc1` = 1 - beta1^t and `bc2_sqrt` = sqrt(1 - beta2^t) for the step t."""
    if not all(t.is_contiguous() and t.shape == param.shape for t in (grad, exp_avg, exp_avg_sq)) \
            or not param.is_contiguous():
        raise ValueError("adam_ reads its tensors as flat memory: pass them contiguous and of one shape")
    R = param.shape[0]
    if coef is not None:
        _, S, d = param.shape
        adam_rows[(R * S,)](param, grad, exp_avg, exp_avg_sq, coef, lr, scale, skip, S, d,
                            beta1, beta2, eps, bc1, bc2_sqrt, NORM_EPS, ACC=_acc(param), **_row_launch(d))
    else:
        n = param[0].numel()
        block = 1024
        adam_flat[(R, triton.cdiv(n, block))](param, grad, exp_avg, exp_avg_sq, lr, scale, skip, n,
                                              beta1, beta2, eps, bc1, bc2_sqrt, BLOCK=block, ACC=_acc(param))


@adam_.register_fake
def _(param, grad, exp_avg, exp_avg_sq, lr, scale, skip, coef, beta1, beta2, eps, bc1, bc2_sqrt) -> None:
    return None
