"""A fused forward/backward for the gated SAE's training step, batched over the run dimension R.

The gated step (trainer/sae_gated.py) runs one encoder matmul into two paths and two decoder
products (the reconstruction, and the gate's auxiliary reconstruction through a frozen copy of the
decoder). Autograd through the plain formulas keeps a handful of (R, B, d_sae) tensors (the
projection, pi_gate, pi_mag, the Heaviside mask, the latents, the gate's ReLU, their products and
their gradients), streams each through memory once or twice per pass, runs the two decoder
products and their two gradients as four separate matmuls, and computes the gradient of the
centred input (an extra batch x d_in x d_sae matmul) only to sum it for b_dec. `gated_sae` does
what `trainer.kernels.relu.relu_sae` does for the ReLU SAE, and a little more:

- Latent-major storage, (R, d_sae, B): per-latent reductions (firing counts, the gate's batch
  sums, the bias gradients) sum contiguous rows, and the matmuls are as fast as token-major
  (BLAS takes the transposes).
- The latents and the gate's ReLU lie side by side in ONE (R, d_sae, 2B) tensor: one matmul with
  the decoder gives both reconstructions (the frozen copy is the same tensor, frozen for autograd
  only), and one with the decoder gives the gradients of both, the L1's weight (decoder norms / B,
  reaching the gate's ReLU only) riding as an extra column. The step needs the 7 (batch x d_in x
  d_sae) matmuls a gated step inherently has: the encoder, the double-width decoder (2), the
  double-width gradient of [latents | gate] (2), grad W_dec, grad W_enc; b_gate rides in the
  encoder's as an extra input column, b_dec in the decoder's accumulator.
- Forward: the encoder writes pi_gate straight into the gate's half; one chunked pass (~2 MiB
  chunks, in cache) computes pi_mag into the latents' half, the gate, both ReLUs (one op over the
  two halves) and the per-latent counts and sums, in place.
- Backward: every backward matmul except the gradient of [latents | gate] itself splits by latent
  (grad W_enc's columns, grad W_dec's rows), so that gradient is formed one chunk of latents at a
  time (32 MiB: the matmul slows down below that), masked (`threshold_backward`, one op over both
  halves), reduced to the bias gradients (one row sum) and turned into the projection's gradient
  in place, then consumed by the chunk's grad W_enc and grad W_dec: the (R, d_sae, 2B) gradient is
  never materialized. Those three elementwise ops go through the chunk in pieces of the forward's
  (cache-sized) chunk, so each piece is read from memory once for all three (BENCHMARKS.md,
  "Kernel design choices").
- r_mag's gradient sum_b grad_pi_mag * proj * exp(r_mag) = sum_b grad_pi_mag * (latents - b_mag)
  (pi_mag equals the latents wherever its gradient is non-zero), and sum_b grad_pi_mag * latents is
  the row-wise dot of W_dec with latents_t @ grad_recon, grad W_dec's own product: no pass at all.
- b_dec's gradient through the centred input is -W_enc @ sum_b grad_proj, and that batch sum is
  grad_b_gate + exp(r_mag) * grad_b_mag, already reduced: x's gradient (a full matmul) is computed
  only when x requires one.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.autograd import Function

from trainer.kernels.chunks import CHUNKS, Chunks, padded_empty, row_chunks, threshold_backward_

class _GatedSAE(Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, W_enc: torch.Tensor, b_gate: torch.Tensor, r_mag: torch.Tensor,
                b_mag: torch.Tensor, b_dec: torch.Tensor, W_dec: torch.Tensor,
                frozen_l1_norms: bool, chunks: Chunks) -> tuple[torch.Tensor, ...]:
        R, d, S = W_enc.shape
        B = x.shape[-2]
        x_c = (x - b_dec.unsqueeze(1)).expand(R, B, d)
        # b_gate rides in the encoder matmul as an extra input column (no pass over (R, S, B) to add it).
        x_aug = torch.cat([x_c, x_c.new_ones(R, B, 1)], dim=-1)
        W_enc_aug = torch.cat([W_enc, b_gate.unsqueeze(1)], dim=1)
        # [latents | gate_acts], latent-major: one decoder matmul serves both reconstructions.
        both = padded_empty(x_c, R, S, 2 * B)
        lat_t, gate_t = both[..., :B], both[..., B:]
        # pi_gate = [x_c, 1] @ [W_enc; b_gate] goes straight into the gate's half (BLAS writes a
        # strided block). One matmul: per chunk, small matmuls re-pack x_c each time (measured slower).
        torch.bmm(W_enc_aug.transpose(1, 2), x_aug.transpose(1, 2), out=gate_t)
        scale = r_mag.exp()
        # pi_mag = proj * exp(r_mag) + b_mag = pi_gate * exp(r_mag) + (b_mag - b_gate * exp(r_mag)).
        mag_bias = torch.addcmul(b_mag, b_gate, scale, value=-1)
        fired = x_c.new_empty(R, S)
        gate_sum = x_c.new_empty(R, S)
        # Rows of 2B values: the latents and the gate's ReLU side by side.
        rows = chunks.rows(2 * B * both.element_size(), both.device)
        for chunk, sc, bm, f, gs in row_chunks(rows, both, scale, mag_bias, fired, gate_sum):
            m, g = chunk[:, :B], chunk[:, B:]
            # (mul and add_: an addcmul with a broadcast first operand is 5x slower.)
            torch.mul(g, sc, out=m).add_(bm)
            # H(pi_gate) * relu(pi_mag): threshold_backward keeps m where pi_gate > 0.
            threshold_backward_(m, g, 0, grad_input=m)
            chunk.relu_()  # both halves: the latents, and the gate's ReLU
            # 0/1 floats: exact up to 2**24 tokens, with no int64 copy (as relu_sae).
            torch.sum(torch.sign(m), dim=1, keepdim=True, out=f)
            torch.sum(g, dim=1, keepdim=True, out=gs)
        # Both reconstructions, b_dec entering the matmul's accumulator: rows :B are latents @ W_dec,
        # rows B: the gate's ReLU @ the (frozen, for autograd) decoder.
        recons = torch.baddbmm(b_dec.unsqueeze(1), both.transpose(1, 2), W_dec)
        norms = W_dec.norm(dim=-1)
        # mean_b sum_s gate_acts[b, s] * norms[s] needs only each latent's batch sum.
        l1 = (gate_sum * norms).sum(dim=-1) / B
        l0 = fired.sum(dim=-1) / B
        ctx.save_for_backward(x_c, W_enc, scale, b_mag, W_dec, norms, gate_sum, both)
        ctx.x_dim, ctx.frozen_l1_norms, ctx.chunks = x.dim(), frozen_l1_norms, chunks
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(l0, fired)
        return lat_t.transpose(1, 2), recons[:, :B], recons[:, B:], l1, l0, fired

    @staticmethod
    def backward(ctx: Any, grad_latents: torch.Tensor | None, grad_recon: torch.Tensor | None,
                 grad_gate_recon: torch.Tensor | None, grad_l1: torch.Tensor | None, _grad_l0: None,
                 _grad_fired: None) -> tuple:
        x_c, W_enc, scale, b_mag, W_dec, norms, gate_sum, both = ctx.saved_tensors
        R, d, S = W_enc.shape
        B = both.shape[2] // 2
        lat_t = both[..., :B]
        need_x, need_W_enc, need_b_gate, need_r_mag, need_b_mag, need_b_dec, need_W_dec, _, _ = ctx.needs_input_grad
        # The L1's pull on the decoder norms, unless they count as a frozen copy's.
        l1_to_W_dec = grad_l1 if not ctx.frozen_l1_norms else None
        grads: dict[str, torch.Tensor | None] = dict.fromkeys(
            ("x", "W_enc", "b_gate", "r_mag", "b_mag", "b_dec", "W_dec"))

        need_enc = any((need_x, need_W_enc, need_b_gate, need_r_mag, need_b_mag, need_b_dec))
        # W_dec's gradient from the reconstruction (the auxiliary one reads a frozen copy): chunk by
        # chunk below, where each chunk's latents are read anyway, else here in one matmul.
        grad_W_dec = None
        if need_W_dec and grad_recon is not None:
            grad_W_dec = W_dec.new_empty(W_dec.shape) if need_enc else torch.bmm(lat_t, grad_recon)
        elif need_W_dec and l1_to_W_dec is not None:
            grad_W_dec = torch.zeros_like(W_dec)

        if need_enc:
            # d loss / d [latents | gate_acts] = W_dec_aug @ grad_out_t: rows :d of grad_out_t are the
            # reconstructions' gradients (columns :B recon, B: gate_recon), row d the L1's weight
            # 1 / B on the gate's half, against the norms column of W_dec_aug.
            # Token-major, (R, 2B, d + 1): filled by row copies (transposed copies are slower), and
            # the matmul reads it transposed as fast.
            grad_out = both.new_zeros(R, 2 * B, d + 1)
            if grad_recon is not None:
                grad_out[:, :B, :d] = grad_recon
            if grad_gate_recon is not None:
                grad_out[:, B:, :d] = grad_gate_recon
            if grad_l1 is not None:
                grad_out[:, B:, d] = (grad_l1 / B).unsqueeze(1)
            grad_out_t = grad_out.transpose(1, 2)
            W_dec_aug = torch.cat([W_dec, norms.unsqueeze(-1)], dim=-1)
            # Per latent, [grad b_mag, grad b_gate]: one row sum over both halves of a chunk.
            grad_bias = both.new_empty(R, S, 2)
            lat_dot = both.new_empty(R, S)
            # Transposed, (R, S, d): grad proj @ x_c is faster than x_c^T @ grad proj^T (encoder_grads).
            grad_W_enc_t = W_enc.new_empty(R, S, d) if need_W_enc else None
            grad_xc = x_c.new_zeros(R, B, d) if need_x else None
            # r_mag's gradient needs sum_b grad_pi_mag * latents = sum_b grad_latents * latents (the
            # mask only drops zeros of the latents), and with grad_latents = W_dec @ grad_recon^T that
            # is the row-wise dot of W_dec with latents_t @ grad_recon: grad W_dec's own matmul. Else
            # (latents given a gradient of their own, or no grad W_dec to compute) a product per chunk.
            dot_from_W_dec = grad_W_dec is not None and grad_recon is not None and grad_latents is None
            # That gradient is formed one chunk of latents at a time (module docstring): every other
            # backward matmul splits by latent, so the whole (S, 2B) gradient is never materialized.
            row_bytes = 2 * B * both.element_size()
            # The gradient chunk is sized for its matmul (`Chunks.matmul_bytes`), its elementwise
            # work for the cache (`Chunks.cpu_bytes`).
            rows = min(S, ctx.chunks.rows(row_bytes, both.device, ctx.chunks.matmul_bytes))
            grad_chunk = padded_empty(both, rows, 2 * B)
            sub = ctx.chunks.rows(row_bytes, both.device)
            scratch = None if dot_from_W_dec else both.new_empty(rows, B)
            for r in range(R):
                for start in range(0, S, rows):
                    sl = slice(start, min(S, start + rows))
                    n = sl.stop - start
                    gb = torch.mm(W_dec_aug[r, sl], grad_out_t[r], out=grad_chunk[:n])
                    gm, gg, lat = gb[:, :B], gb[:, B:], lat_t[r, sl]
                    if grad_latents is not None:
                        gm += grad_latents[r, :, sl].t()
                    if grad_W_dec is not None and grad_recon is not None:
                        torch.mm(lat, grad_recon[r], out=grad_W_dec[r, sl])
                    if dot_from_W_dec:
                        torch.linalg.vecdot(W_dec[r, sl], grad_W_dec[r, sl], out=lat_dot[r, sl])
                    else:
                        torch.sum(torch.mul(gm, lat, out=scratch[:n]), dim=1, out=lat_dot[r, sl])
                    # The elementwise work in cache-sized pieces of the chunk: each piece is read from
                    # memory once for its three ops (the chunk itself is sized for the matmuls).
                    for a in range(0, n, sub):
                        pc, rs = gb[a:a + sub], slice(start + a, min(start + n, start + a + sub))
                        # grad pi_mag where latents > 0 (the gate open and pi_mag > 0: H passes none),
                        # and grad pi_gate where the gate's ReLU is > 0; both halves in one op.
                        threshold_backward_(pc, both[r, rs], 0, grad_input=pc)
                        torch.sum(pc.view(len(pc), 2, B), dim=2, out=grad_bias[r, rs])
                        # grad proj = grad pi_gate + exp(r_mag) * grad pi_mag, in the gate's half.
                        pc[:, B:].addcmul_(pc[:, :B], scale[r, rs].unsqueeze(1))
                    if grad_W_enc_t is not None:
                        torch.mm(gg, x_c[r], out=grad_W_enc_t[r, sl])
                    if grad_xc is not None:
                        grad_xc[r].addmm_(gg.t(), W_enc[r, :, sl].t())
            grad_b_mag, grad_b_gate = grad_bias.unbind(-1)
            grads["W_enc"] = grad_W_enc_t.transpose(1, 2) if grad_W_enc_t is not None else None
            grads["b_gate"], grads["b_mag"] = grad_b_gate, grad_b_mag
            # d pi_mag / d r_mag = proj * exp(r_mag) = pi_mag - b_mag, and pi_mag = latents wherever
            # its gradient is non-zero.
            grads["r_mag"] = lat_dot - b_mag * grad_b_mag
            if need_x:
                grads["x"] = grad_xc if ctx.x_dim == 3 else grad_xc.sum(dim=0)
            if need_b_dec:
                # -sum_b d loss / d x_c = -W_enc @ sum_b grad_proj, that sum from the bias gradients.
                proj_sum = torch.addcmul(grad_b_gate, scale, grad_b_mag)
                grads["b_dec"] = -torch.bmm(W_enc, proj_sum.unsqueeze(-1)).squeeze(-1)

        if grad_W_dec is not None and l1_to_W_dec is not None:
            # d l1 / d W_dec[s] = gate_sum[s] / B * W_dec[s] / ||W_dec[s]||
            unit_scale = torch.where(norms > 0, gate_sum / norms, torch.zeros_like(norms))
            grad_W_dec.addcmul_(W_dec, (unit_scale * (l1_to_W_dec / B).unsqueeze(1)).unsqueeze(-1))
        grads["W_dec"] = grad_W_dec
        if need_b_dec and grad_recon is not None:
            # recon's b_dec (gate_recon's is a frozen copy).
            grads["b_dec"] = grad_recon.sum(dim=1) if grads["b_dec"] is None else grads["b_dec"] + grad_recon.sum(dim=1)
        needs = (need_x, need_W_enc, need_b_gate, need_r_mag, need_b_mag, need_b_dec, need_W_dec)
        return (*(g if need else None for g, need in zip(grads.values(), needs)), None, None)


def gated_sae(x: torch.Tensor, W_enc: torch.Tensor, b_gate: torch.Tensor, r_mag: torch.Tensor,
              b_mag: torch.Tensor, b_dec: torch.Tensor, W_dec: torch.Tensor,
              frozen_l1_norms: bool = False, chunks: Chunks = CHUNKS) -> tuple[torch.Tensor, ...]:
    """A gated SAE's forward for R runs: `(latents (R, B, d_sae), recon (R, B, d_in),
    gate_recon (R, B, d_in), l1 (R,), l0 (R,), fired (R, d_sae))`.

    proj = (x - b_dec) @ W_enc, pi_gate = proj + b_gate, pi_mag = proj * exp(r_mag) + b_mag,
    latents = H(pi_gate) * relu(pi_mag), recon = latents @ W_dec + b_dec,
    gate_recon = relu(pi_gate) @ W_dec' + b_dec' with W_dec', b_dec' frozen copies (no gradient
    through them), l1 = mean over the batch of sum_i relu(pi_gate)_i * ||W_dec_i||, l0 = mean over
    the batch of the active latents, fired = per latent, the tokens it is active on (l0 and fired
    carry no gradient). With `frozen_l1_norms`, the L1's decoder norms are a frozen copy's too:
    W_dec's gradient then comes from `recon` alone (trainer/sae_gated.py says why). `latents` is a
    transposed view of a latent-major tensor. Differentiable in everything (latents too, through the
    magnitudes only: H passes no gradient); x's gradient (a full matmul) is computed only when x
    requires one. Shapes: x (B, d_in) or (R, B, d_in), W_enc (R, d_in, d_sae), b_gate, r_mag, b_mag
    (R, d_sae), b_dec (R, d_in), W_dec (R, d_sae, d_in)."""
    return _GatedSAE.apply(x, W_enc, b_gate, r_mag, b_mag, b_dec, W_dec, frozen_l1_norms, chunks)
