"""The standard (ReLU + decoder-norm-weighted L1) SAE's training step, fused, for R runs.

Autograd of `(x - b_dec) @ W_enc` also computes the gradient of the centred input (a sixth batch x
d_sae x d_in matmul) only to sum it over the batch for b_dec; `relu_sae` gets b_dec's share from
b_enc's gradient instead (the row sums of the pre-activations' gradient, taken in the ReLU
backward's chunked pass), folds b_enc and b_dec into the matmuls (an extra row or column), adds the
L1's gradient (one value per latent) in that chunked pass, keeps one dense (batch, d_sae) temporary
per pass, latent-major in rows padded by a cache line, and computes W_enc's gradient transposed (the
faster BLAS layout on a CPU). `encoder_grads`, `mask_and_sum_` and `centred_with_ones` serve the
JumpReLU kernel too. Figures: BENCHMARKS.md ("Trainer step against its dense matmuls").
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd import Function

from trainer.kernels.chunks import CHUNKS, Chunks, padded_empty, threshold_backward_


def centred_with_ones(x: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    """`[x - b_dec, 1]` as (R, B, d + 1) for x (B, d) or (R, B, d) and b_dec (R, d): with the ones
    column, a bias rides in the encoder matmul and its gradient in the weight gradient's matmul."""
    R, d = b_dec.shape
    B = x.shape[-2]
    x_c = (x - b_dec.unsqueeze(1)).expand(R, B, d)
    return torch.cat([x_c, x_c.new_ones(R, B, 1)], dim=-1)


def _relu_and_count_(latents_t: torch.Tensor, chunks: Chunks) -> tuple[torch.Tensor, torch.Tensor]:
    """ReLU `latents_t (R, S, B)` (latent-major) in place and, in the same pass, per latent: the
    tokens it is active on and its sum over the batch, `(fired (R, S), col_sum (R, S))`.

    Separate `relu_`, `(latents > 0).sum` and `.sum` passes each stream the whole tensor through
    memory (and a bool sum converts to int64 first); chunk by chunk, the counts are computed while
    the chunk is in cache, and with latents stored latent-major they reduce along contiguous rows
    (faster than column sums of a token-major (B, S) tensor: BENCHMARKS.md, "Kernel design choices")."""
    R, S, B = latents_t.shape
    fired = latents_t.new_empty(R, S)
    col_sum = latents_t.new_empty(R, S)
    rows = chunks.rows(B * latents_t.element_size(), latents_t.device)
    signs = latents_t.new_empty(min(rows, S), B)
    for r in range(R):
        for start in range(0, S, rows):
            chunk = latents_t[r, start:start + rows].relu_()
            # 0/1 floats: the sums stay exact up to 2**24 tokens and need no int64 copy.
            torch.sum(torch.sign(chunk, out=signs[:len(chunk)]), dim=1, out=fired[r, start:start + rows])
            torch.sum(chunk, dim=1, out=col_sum[r, start:start + rows])
    return fired, col_sum


def mask_and_sum_(grad_t: torch.Tensor, latents_t: torch.Tensor, grad_latents: torch.Tensor | None = None,
                  row_add: torch.Tensor | None = None, chunks: Chunks = CHUNKS) -> torch.Tensor:
    """The ReLU's backward in place on the latent-major gradient `grad_t (R, S, B)` (kept where
    `latents_t > 0`), after adding `grad_latents (R, B, S)` and `row_add (R, S)` (one value per
    latent) if given; returns its row sums (R, S), b_enc's gradient. Chunk by chunk, so the sum
    reads each chunk while it is still in cache."""
    R, S, B = grad_t.shape
    row_sum = grad_t.new_empty(R, S)
    rows = chunks.rows(B * grad_t.element_size(), grad_t.device)
    for r in range(R):
        for start in range(0, S, rows):
            sl = slice(start, min(S, start + rows))
            g = grad_t[r, sl]
            if grad_latents is not None:
                g += grad_latents[r, :, sl].t()
            if row_add is not None:
                g += row_add[r, sl].unsqueeze(1)
            threshold_backward_(g, latents_t[r, sl], 0, grad_input=g)
            torch.sum(g, dim=1, out=row_sum[r, sl])
    return row_sum


def encoder_grads(grad_pre_t: torch.Tensor, grad_b_enc: torch.Tensor, x_aug: torch.Tensor, W_enc: torch.Tensor,
                  need_x: bool, x_dim: int) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """From the latent-major gradient of the pre-activations `(R, S, B)`, its row sums (b_enc's
    gradient, `mask_and_sum_`) and the ones-augmented centred input `(R, B, d + 1)`: (grad x or None,
    grad W_enc, the encoder's share of grad b_dec). x's gradient is a full matmul, so only when
    needed; else b_dec's comes from b_enc's.

    W_enc's gradient is computed transposed, `grad_pre_t @ x_c` (S x B @ B x d), faster on a CPU than
    `x_c^T @ grad_pre_t^T` and than with the d + 1 columns of the ones-augmented input (BENCHMARKS.md,
    "Kernel design choices")."""
    d = W_enc.shape[1]
    grad_W_enc = torch.bmm(grad_pre_t, x_aug[..., :d]).transpose(1, 2)  # autograd copies it to W_enc's layout
    if not need_x:
        return None, grad_W_enc, -torch.bmm(W_enc, grad_b_enc.unsqueeze(-1)).squeeze(-1)
    grad_xc = torch.bmm(grad_pre_t.transpose(1, 2), W_enc.transpose(1, 2))
    return grad_xc if x_dim == 3 else grad_xc.sum(dim=0), grad_W_enc, -grad_xc.sum(dim=1)


class _ReluSAE(Function):
    # Latents are computed and kept latent-major, (R, d_sae, B): the per-latent counts then reduce
    # contiguous rows, and every matmul is as fast as in the token-major layout (BLAS transposes).
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor,
                W_dec: torch.Tensor, chunks: Chunks) -> tuple[torch.Tensor, ...]:
        R, d, S = W_enc.shape
        B = x.shape[-2]
        # b_enc rides in the encoder matmul as an extra input column (no separate pass over (R, B, S)).
        x_aug = centred_with_ones(x, b_dec)
        W_enc_aug = torch.cat([W_enc, b_enc.unsqueeze(1)], dim=1)
        latents_t = torch.bmm(W_enc_aug.transpose(1, 2), x_aug.transpose(1, 2), out=padded_empty(x_aug, R, S, B))
        fired, col_sum = _relu_and_count_(latents_t, chunks)
        latents = latents_t.transpose(1, 2)
        recon = torch.baddbmm(b_dec.unsqueeze(1), latents, W_dec)
        norms = W_dec.norm(dim=-1)
        # mean_b sum_s latents[b, s] * norms[s] needs only each latent's batch sum.
        l1 = (col_sum * norms).sum(dim=-1) / B
        l0 = fired.sum(dim=-1) / B  # the mean over tokens of their active latents
        ctx.save_for_backward(x_aug, W_enc, W_dec, norms, col_sum, latents_t)
        ctx.x_dim, ctx.chunks = x.dim(), chunks
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(l0, fired)
        return latents, recon, l1, l0, fired

    @staticmethod
    def backward(ctx: Any, grad_latents: torch.Tensor | None, grad_recon: torch.Tensor | None,
                 grad_l1: torch.Tensor | None, _grad_l0: None, _grad_fired: None) -> tuple:
        x_aug, W_enc, W_dec, norms, col_sum, latents_t = ctx.saved_tensors
        R, d, S = W_enc.shape
        B = latents_t.shape[2]
        need_x, need_W_enc, need_b_enc, need_b_dec, need_W_dec, _ = ctx.needs_input_grad
        grad_x = grad_W_enc = grad_b_enc = grad_b_dec = grad_W_dec = None
        if need_W_dec:
            grad_W_dec = torch.bmm(latents_t, grad_recon) if grad_recon is not None else torch.zeros_like(W_dec)
            if grad_l1 is not None:
                # d l1 / d W_dec[s] = col_sum[s] / B * W_dec[s] / ||W_dec[s]||
                unit_scale = torch.where(norms > 0, col_sum / norms, torch.zeros_like(norms))
                grad_W_dec.addcmul_(W_dec, (unit_scale * (grad_l1 / B).unsqueeze(1)).unsqueeze(-1))
        if need_x or need_W_enc or need_b_enc or need_b_dec:
            # d loss / d latents: the reconstruction's part from one matmul, L1's (norms / B, one
            # value per latent) added in the masking pass while each chunk is in cache.
            grad_pre_t = padded_empty(x_aug, R, S, B)
            if grad_recon is not None:
                torch.bmm(W_dec, grad_recon.transpose(1, 2), out=grad_pre_t)
            else:
                grad_pre_t.zero_()
            l1_rows = norms * (grad_l1 / B).unsqueeze(1) if grad_l1 is not None else None
            grad_b_enc = mask_and_sum_(grad_pre_t, latents_t, grad_latents, l1_rows, ctx.chunks)
            grad_x, grad_W_enc, grad_b_dec = encoder_grads(grad_pre_t, grad_b_enc, x_aug, W_enc, need_x, ctx.x_dim)
        if grad_recon is not None:
            grad_b_dec = grad_recon.sum(dim=1) if grad_b_dec is None else grad_b_dec + grad_recon.sum(dim=1)
        return (grad_x, grad_W_enc if need_W_enc else None, grad_b_enc if need_b_enc else None,
                grad_b_dec if need_b_dec else None, grad_W_dec, None)


def relu_sae(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor,
             W_dec: torch.Tensor, chunks: Chunks = CHUNKS) -> tuple[torch.Tensor, ...]:
    """A ReLU SAE's forward for R runs: `(latents (R, B, d_sae), recon (R, B, d_in), l1 (R,), l0 (R,),
    fired (R, d_sae))`.

    latents = relu((x - b_dec) @ W_enc + b_enc), recon = latents @ W_dec + b_dec,
    l1 = mean over the batch of sum_i latents_i * ||W_dec_i|| (the decoder-norm-weighted L1),
    l0 = mean over the batch of the active latents, fired = per latent, the tokens it is active on
    (l0 and fired carry no gradient). `latents` is a transposed view of a latent-major tensor.
    Differentiable in everything (latents too); the backward
    computes x's gradient (a full matmul) only when x requires one. Shapes as
    `StackedSAE.pre_acts` and `decode`."""
    return _ReluSAE.apply(x, W_enc, b_enc, b_dec, W_dec, chunks)
