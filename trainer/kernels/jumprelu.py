"""A fused forward/backward pair for the JumpReLU SAE's training step, batched over the run dimension R.

    pre     = (x - b_dec) @ W_enc + b_enc
    latents = pre * H(pre - theta)
    recon   = latents @ W_dec + b_dec
    l0      = mean over tokens of sum_s H(pre_s - theta_s)

with the straight-through pseudo-derivatives of `trainer.sae_jumprelu` (rectangle kernel
K(u) = 1 on (-1/2, 1/2), bandwidth eps in data units, band = K((pre - theta) / eps)):

    d latents / d pre   = H(pre - theta)
    d latents / d theta = -(theta / eps) band
    d l0 / d theta_s    = -(1 / eps) (sum_b band[b, s]) / B

Autograd through `JumpReLUFunction` and `StepFunction` keeps `pre` twice over and makes about a
dozen full passes over (R, B, d_sae) tensors that do not fit in cache (the comparisons, the kernel,
the products, the sums, each backward's temporaries). Here, as in `trainer.kernels.relu.relu_sae`:

- b_enc rides in the encoder matmul as an extra input column, and the latents are computed and kept
  latent-major, (R, d_sae, B): every per-latent reduction is then a contiguous row sum.
- One chunked pass (chunks of ~2 MiB, which stay in cache) turns pre into the latents in place and,
  while each chunk is in cache, computes the band mask, its count per latent (theta's L0 gradient
  needs nothing else) and the firing count per latent (`fired`, and l0 from it).
- The backward needs, per latent, sum_b grad_latents[b, s] * band[b, s] with the gradient taken
  BEFORE the step masks it. Once the latents are formed, pre is gone for the band entries below
  theta, so the band is kept as a bool (R, d_sae, B) mask: a quarter of the latents' memory, written
  once and read once, which is cheaper than recomputing pre (a full encoder matmul). The same
  chunked pass takes that band sum and masks the gradient in place (`threshold_backward`: theta > 0,
  so a latent is active exactly where it is positive).
- x's gradient (a full matmul) only when x requires one; b_dec's gradient from b_enc's otherwise.

Every elementwise op works on floats: on this CPU build, a comparison into a bool tensor, a bool
sum (it converts to int64), a bool-to-float conversion, `where` and `masked_fill` on a bool mask
each take 8-10x the time of a float op on the same chunk. So H and K are 0/1 floats from float
comparisons (counts are their row sums, exact up to 2**24 tokens), the band is stored with one
float-to-bool copy, and the backward reads it back through a uint8 view (a fast conversion).

The measurements behind these choices are in BENCHMARKS.md ("Kernel design choices").
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd import Function

from trainer.kernels.chunks import CHUNKS, Chunks, padded_empty, threshold_backward_
from trainer.kernels.relu import centred_with_ones, encoder_grads


def _jump_and_count_(pre_t: torch.Tensor, theta: torch.Tensor, eps: torch.Tensor, chunks: Chunks
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Turn `pre_t (R, S, B)` (latent-major) into the JumpReLU latents in place; return
    `(band (R, S, B) bool, band_count (R, S), fired (R, S))`.

    band[r, s, b] = K((pre - theta[r, s]) / eps[r]) with the reference's arithmetic (so the same
    entries fall in the band), band_count its sum over the batch, fired the tokens each latent is
    active on. One pass, chunk by chunk, every temporary in cache."""
    R, S, B = pre_t.shape
    band = torch.empty(R, S, B, dtype=torch.bool, device=pre_t.device)
    band_count = pre_t.new_empty(R, S)
    fired = pre_t.new_empty(R, S)
    rows = chunks.rows(B * pre_t.element_size(), pre_t.device)
    buf = pre_t.new_empty(min(rows, S), B)
    step = pre_t.new_empty(min(rows, S), B)
    for r in range(R):
        e = eps[r]
        for start in range(0, S, rows):
            stop = min(S, start + rows)
            n = stop - start
            chunk, t = pre_t[r, start:stop], theta[r, start:stop].unsqueeze(1)
            # H(pre - theta) as 0/1 floats (a comparison into a float buffer: into bool it is 8x
            # slower): fired is its row sum, the latents pre times it.
            h = torch.gt(chunk, t, out=step[:n])
            torch.sum(h, dim=1, out=fired[r, start:stop])
            # |u| < 1/2 for u = (pre - theta) / eps: the reference's K, entry for entry.
            k = torch.sub(chunk, t, out=buf[:n]).div_(e).abs_().lt_(0.5)
            torch.sum(k, dim=1, out=band_count[r, start:stop])
            band[r, start:stop].copy_(k)
            chunk.mul_(h)
    return band, band_count, fired


class _JumpReLUSAE(Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor,
                W_dec: torch.Tensor, theta: torch.Tensor, eps: torch.Tensor,
                chunks: Chunks) -> tuple[torch.Tensor, ...]:
        R, d, S = W_enc.shape
        B = x.shape[-2]
        # b_enc rides in the encoder matmul as an extra input column (no separate pass over (R, B, S)).
        x_aug = centred_with_ones(x, b_dec)
        W_enc_aug = torch.cat([W_enc, b_enc.unsqueeze(1)], dim=1)
        # (R, S, B): pre, in rows padded by a cache line (trainer.kernels.chunks.padded_empty).
        latents_t = torch.bmm(W_enc_aug.transpose(1, 2), x_aug.transpose(1, 2), out=padded_empty(x_aug, R, S, B))
        eps = eps.to(latents_t.dtype)
        band, band_count, fired = _jump_and_count_(latents_t, theta.detach(), eps, chunks)
        latents = latents_t.transpose(1, 2)
        recon = torch.baddbmm(b_dec.unsqueeze(1), latents, W_dec)
        l0 = fired.sum(dim=-1) / B  # the mean over tokens of their active latents
        ctx.save_for_backward(x_aug, W_enc, W_dec, theta, eps, band_count, latents_t, band)
        ctx.x_dim, ctx.chunks = x.dim(), chunks
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(fired)
        return latents, recon, l0, fired

    @staticmethod
    def backward(ctx: Any, grad_latents: torch.Tensor | None, grad_recon: torch.Tensor | None,
                 grad_l0: torch.Tensor | None, _grad_fired: None) -> tuple:
        x_aug, W_enc, W_dec, theta, eps, band_count, latents_t, band = ctx.saved_tensors
        R, d, S = W_enc.shape
        B = latents_t.shape[2]
        need_x, need_W_enc, need_b_enc, need_b_dec, need_W_dec, need_theta, _, _ = ctx.needs_input_grad
        grad_x = grad_W_enc = grad_b_enc = grad_b_dec = grad_W_dec = grad_theta = None
        if need_W_dec:
            grad_W_dec = torch.bmm(latents_t, grad_recon) if grad_recon is not None else torch.zeros_like(W_dec)
        need_pre = need_x or need_W_enc or need_b_enc or need_b_dec
        has_grad = grad_latents is not None or grad_recon is not None
        if (need_pre or need_theta) and has_grad:
            # d loss / d latents, latent-major: the reconstruction's part, then the latents' own.
            if grad_recon is not None:
                grad_t = torch.bmm(W_dec, grad_recon.transpose(1, 2), out=padded_empty(grad_recon, R, S, B))
                if grad_latents is not None:
                    grad_t += grad_latents.transpose(1, 2)
            else:
                grad_t = grad_latents.transpose(1, 2).contiguous()
            band_dot = grad_t.new_empty(R, S)
            grad_b_enc = grad_t.new_empty(R, S)
            rows = ctx.chunks.rows(B * grad_t.element_size(), grad_t.device)
            buf = grad_t.new_empty(min(rows, S), B)
            band_u8 = band.view(torch.uint8)
            for r in range(R):
                for start in range(0, S, rows):
                    stop = min(S, start + rows)
                    g = grad_t[r, start:stop]
                    # theta's share before the step masks the gradient, then pre's, in place. The
                    # band is read as uint8: converting bool to float is 8x slower, and masked ops
                    # (where, bool products) as slow.
                    band_f = buf[:stop - start].copy_(band_u8[r, start:stop])
                    torch.linalg.vecdot(g, band_f, dim=1, out=band_dot[r, start:stop])
                    threshold_backward_(g, latents_t[r, start:stop], 0, grad_input=g)
                    torch.sum(g, dim=1, out=grad_b_enc[r, start:stop])  # while the chunk is in cache
            if need_theta:
                grad_theta = band_dot.mul_(theta / eps.unsqueeze(1)).neg_()
        if need_theta and grad_l0 is not None:
            l0_part = band_count * (grad_l0 / (B * eps)).unsqueeze(1)
            grad_theta = grad_theta.sub_(l0_part) if grad_theta is not None else l0_part.neg_()
        if need_pre and has_grad:
            grad_x, grad_W_enc, grad_b_dec = encoder_grads(grad_t, grad_b_enc, x_aug, W_enc, need_x, ctx.x_dim)
        if grad_recon is not None:
            grad_b_dec = grad_recon.sum(dim=1) if grad_b_dec is None else grad_b_dec + grad_recon.sum(dim=1)
        return (grad_x, grad_W_enc if need_W_enc else None, grad_b_enc if need_b_enc else None,
                grad_b_dec if need_b_dec else None, grad_W_dec, grad_theta, None, None)


def jumprelu_sae(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor,
                 W_dec: torch.Tensor, threshold: torch.Tensor, bandwidth: torch.Tensor, chunks: Chunks = CHUNKS
                 ) -> tuple[torch.Tensor, ...]:
    """A JumpReLU SAE's forward for R runs: `(latents (R, B, d_sae), recon (R, B, d_in), l0 (R,),
    fired (R, d_sae))`.

    latents = pre * H(pre - threshold) with pre = (x - b_dec) @ W_enc + b_enc, recon = latents @ W_dec
    + b_dec, l0 = mean over the batch of the active latents (differentiable in the threshold only,
    through the straight-through estimator), fired = per latent, the tokens it is active on (no
    gradient). `latents` is a transposed view of a latent-major tensor. `threshold (R, d_sae)` must
    be positive and gets the rectangle-kernel pseudo-derivatives of `trainer.sae_jumprelu`;
    `bandwidth (R,)` (the kernel's width, in the pre-activations' units) gets none. Differentiable in
    x, W_enc, b_enc, b_dec, W_dec and the threshold; x's gradient (a full matmul) is computed only
    when x requires one. Shapes as `StackedSAE.pre_acts` and `decode`."""
    return _JumpReLUSAE.apply(x, W_enc, b_enc, b_dec, W_dec, threshold, bandwidth, chunks)
