"""Hand-written forward/backward pairs for the SAE training step, batched over the run dimension R.

Autograd through the plain formulas wastes work an SAE step does not need:

- A TopK decoder reads only k of d_sae latents per token, but a dense `latents @ W_dec` (and its
  two backward matmuls) touch all of them. `sparse_decode` sums the k selected decoder rows instead
  (`embedding_bag` with per-sample weights), and `sparse_pre_acts` gives the encoder the gradient
  of the k selected pre-activations only: every gradient of the TopK step then costs
  O(batch * k * d_in) instead of O(batch * d_sae * d_in).
- For a ReLU SAE, autograd of `(x - b_dec) @ W_enc` also computes the gradient of the centred
  input (a sixth batch x d_sae x d_in matmul) only to sum it over the batch for b_dec; `relu_sae`
  gets b_dec's share from b_enc's gradient instead (the row sums of the pre-activations' gradient,
  taken in the ReLU backward's chunked pass), folds b_enc and b_dec into the matmuls (an extra row
  or column), adds the decoder-norm-weighted L1's gradient (one value per latent) in that chunked
  pass, keeps one dense (batch, d_sae) temporary per pass, in rows padded by a cache line, and
  computes W_enc's gradient transposed (the faster BLAS layout).

Sparse codes are `idx (R, B, k)` (latent ids) with `vals (R, B, k)`; the gradients of W_dec and
W_enc gather per latent with a stable sort and `embedding_bag`, which is deterministic on CPU and
CUDA (no atomics), so a resumed run repeats an uninterrupted one bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd import Function

from pipeline.transfer import to_device

# Rows of the (rows * k, d) gather in `_rowwise_dot` per chunk on a CPU: keeps the temporary (a few
# MiB) in cache instead of streaming batch * k * d_in values through memory.
_GATHER_CHUNK_ROWS = 256
# Bytes per chunk of the elementwise passes over (.., B) latent rows on a CPU: a chunk's temporaries
# stay in cache.
_COUNT_CHUNK_BYTES = 1 << 21
# On a GPU there is no cache to keep a chunk in, and every chunk costs one kernel launch per op
# (~10 us of dispatch each: a 2 MiB chunking of d_sae 32768 x batch 4096 is ~1,000 launches a pass,
# longer than the step's matmuls there). Chunks then only bound the temporaries' memory.
_GPU_CHUNK_BYTES = 1 << 28


def chunk_rows(row_bytes: int, device: torch.device, cpu_bytes: int | None = None) -> int:
    """Rows of `row_bytes` per chunk of a pass: `cpu_bytes` of them (default `_COUNT_CHUNK_BYTES`)
    on a CPU, in cache; 256 MiB elsewhere (few launches, bounded temporaries)."""
    if device.type != "cpu":
        return max(1, _GPU_CHUNK_BYTES // row_bytes)
    return max(1, (cpu_bytes if cpu_bytes is not None else _COUNT_CHUNK_BYTES) // row_bytes)


def counts(index: torch.Tensor, n: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """How often each of 0..n-1 occurs in `index` (int64), or the sum of `weights` per value.

    `torch.bincount` on CUDA reads the largest index back to the host (a sync every call); a
    scatter-add into n zeros does not. Integer sums (and float sums of 0/1 weights, exact up to
    2**24) do not depend on the order the GPU's atomics add them in: deterministic."""
    if weights is None:
        return torch.zeros(n, dtype=torch.long, device=index.device).scatter_add_(0, index, torch.ones_like(index))
    return torch.zeros(n, dtype=weights.dtype, device=index.device).scatter_add_(0, index, weights)


def host_to_device(values: list, like: torch.Tensor) -> torch.Tensor:
    """A tensor of Python `values` on `like`'s device (dtype of `like`), copied without a host wait."""
    return to_device(torch.tensor(values, dtype=like.dtype), like.device)


def _flat_codes(idx: torch.Tensor, n_latents: int) -> torch.Tensor:
    """(R, B, k) latent ids -> (R * B, k) row ids into a (R * n_latents, d) table of all runs."""
    R, B, k = idx.shape
    offsets = torch.arange(R, device=idx.device).mul_(n_latents).view(R, 1, 1)
    return (idx + offsets).view(R * B, k)


def _bag_sum(codes: torch.Tensor, weights: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """(N, d): row n is sum_s weights[n, s] * table[codes[n, s]]."""
    return F.embedding_bag(codes, table, per_sample_weights=weights, mode="sum")


def _transposed_bag_sum(codes: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor,
                        n_out: int) -> torch.Tensor:
    """(n_out, d): row j is sum over (n, s) with codes[n, s] == j of weights[n, s] * rows[n].

    The transpose of `_bag_sum`: a stable sort groups the entries by code, and `embedding_bag`
    over those groups sums each one in a fixed order (no scatter, no atomics)."""
    k = codes.shape[1]
    flat = codes.reshape(-1)
    order = torch.argsort(flat, stable=True)
    per_code = counts(flat, n_out)
    starts = per_code.cumsum(0).sub_(per_code)
    return F.embedding_bag(order.div(k, rounding_mode="floor"), rows, starts,
                           per_sample_weights=weights.reshape(-1)[order], mode="sum")


def _rowwise_dot(codes: torch.Tensor, table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(N, k): entry (n, s) is table[codes[n, s]] . rows[n]."""
    N, k = codes.shape
    out = rows.new_empty(N, k)
    row_bytes = k * table.shape[1] * table.element_size()  # a row of the gathered temporary
    step = chunk_rows(row_bytes, rows.device, _GATHER_CHUNK_ROWS * row_bytes)
    for start in range(0, N, step):
        stop = min(N, start + step)
        picked = table.index_select(0, codes[start:stop].reshape(-1)).view(stop - start, k, -1)
        # Multiply-and-sum rather than bmm: a batch of (k x d) @ (d x 1) products is 3x slower.
        torch.sum(picked.mul_(rows[start:stop].unsqueeze(1)), dim=-1, out=out[start:stop])
    return out


def centred_with_ones(x: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    """`[x - b_dec, 1]` as (R, B, d + 1) for x (B, d) or (R, B, d) and b_dec (R, d): with the ones
    column, a bias rides in the encoder matmul and its gradient in the weight gradient's matmul."""
    R, d = b_dec.shape
    B = x.shape[-2]
    x_c = (x - b_dec.unsqueeze(1)).expand(R, B, d)
    return torch.cat([x_c, x_c.new_ones(R, B, 1)], dim=-1)


class _SparseDecode(Function):
    @staticmethod
    def forward(ctx: Any, idx: torch.Tensor, vals: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
        R, B, k = idx.shape
        _, S, d = W_dec.shape
        codes = _flat_codes(idx, S)
        ctx.save_for_backward(codes, vals, W_dec)
        return _bag_sum(codes, vals.reshape(R * B, k), W_dec.reshape(R * S, d)).view(R, B, d)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[None, torch.Tensor | None, torch.Tensor | None]:
        codes, vals, W_dec = ctx.saved_tensors
        R, S, d = W_dec.shape
        B, k = vals.shape[1], vals.shape[2]
        grad_rows = grad_out.reshape(R * B, d)
        grad_vals = grad_W = None
        if ctx.needs_input_grad[1]:
            grad_vals = _rowwise_dot(codes, W_dec.reshape(R * S, d), grad_rows).view(R, B, k)
        if ctx.needs_input_grad[2]:
            grad_W = _transposed_bag_sum(codes, vals.reshape(R * B, k), grad_rows, R * S).view(R, S, d)
        return None, grad_vals, grad_W


def sparse_decode(idx: torch.Tensor, vals: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """`(R, B, d_in)`: out[r, b] = sum_s vals[r, b, s] * W_dec[r, idx[r, b, s]], without b_dec.

    Equals `dense(vals) @ W_dec` for the dense (R, B, d_sae) latents that hold `vals` at `idx`
    (ids distinct within a row), in O(B * k * d_in) forward and backward. `idx (R, B, k)` long,
    `vals (R, B, k)`, `W_dec (R, d_sae, d_in)`; differentiable in vals and W_dec. Computes in W_dec's
    dtype (bf16 activations from autocast are cast up: a gather needs no matrix unit)."""
    return _SparseDecode.apply(idx, vals.to(W_dec.dtype), W_dec)


class _SparsePreActs(Function):
    @staticmethod
    def forward(ctx: Any, selected: torch.Tensor, idx: torch.Tensor, x: torch.Tensor, W_enc: torch.Tensor,
                b_enc: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(idx, x, W_enc, b_dec)
        return selected.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        idx, x, W_enc, b_dec = ctx.saved_tensors
        R, d, S = W_enc.shape
        B, k = idx.shape[1], idx.shape[2]
        need_x, need_W, need_b_enc, need_b_dec = ctx.needs_input_grad[2:6]
        codes = _flat_codes(idx, S)
        grad_flat = grad.reshape(R * B, k)
        grad_x = grad_W = grad_b_enc = grad_b_dec = None
        if need_W or need_b_enc or need_b_dec:
            # One pass gives both: a column of ones next to the centred input yields b_enc's gradient.
            x_aug = centred_with_ones(x, b_dec).view(R * B, d + 1)
            per_latent = _transposed_bag_sum(codes, grad_flat, x_aug, R * S).view(R, S, d + 1)
            if need_W:
                grad_W = per_latent[..., :d].transpose(1, 2)
            grad_b_enc = per_latent[..., d]
        if need_x or need_b_dec:
            if need_x:
                # d pre / d x_c: the selected encoder columns, summed with the gradient as weights.
                W_t = W_enc.transpose(1, 2).reshape(R * S, d)
                grad_xc = _bag_sum(codes, grad_flat, W_t).view(R, B, d)
                grad_x = grad_xc if x.dim() == 3 else grad_xc.sum(dim=0)
                grad_b_dec = -grad_xc.sum(dim=1)
            else:
                # The batch sum of d pre / d x_c, without forming it per token: W_enc @ grad_b_enc.
                grad_b_dec = -torch.bmm(W_enc, grad_b_enc.unsqueeze(-1)).squeeze(-1)
        return (None, None, grad_x, grad_W, grad_b_enc if need_b_enc else None,
                grad_b_dec if need_b_dec else None)


def sparse_pre_acts(selected: torch.Tensor, idx: torch.Tensor, x: torch.Tensor, W_enc: torch.Tensor,
                    b_enc: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    """The pre-activations `(x - b_dec) @ W_enc + b_enc` at `idx (R, B, k)`, differentiable in x,
    W_enc, b_enc and b_dec with a backward that touches only those B * k entries.

    `selected` holds their values, already computed (a TopK step computes every pre-activation
    without autograd to choose idx; the values are then gathered, not computed again). Shapes as
    `StackedSAE.pre_acts`: x (B, d_in) or (R, B, d_in), W_enc (R, d_in, d_sae), b_enc (R, d_sae),
    b_dec (R, d_in). Computes in W_enc's dtype, as `sparse_decode`."""
    return _SparsePreActs.apply(selected.to(W_enc.dtype), idx, x.to(W_enc.dtype), W_enc, b_enc, b_dec)


# relu's backward in place: grad kept where the reference tensor is > 0.
threshold_backward_ = torch.ops.aten.threshold_backward.grad_input


def _relu_and_count_(latents_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ReLU `latents_t (R, S, B)` (latent-major) in place and, in the same pass, per latent: the
    tokens it is active on and its sum over the batch, `(fired (R, S), col_sum (R, S))`.

    Separate `relu_`, `(latents > 0).sum` and `.sum` passes each stream the whole tensor through
    memory (and a bool sum converts to int64 first); chunk by chunk, the counts are computed while
    the chunk is in cache, and with latents stored latent-major they reduce along contiguous rows
    (2.5x faster than column sums of a token-major (B, S) tensor at d_sae 32k)."""
    R, S, B = latents_t.shape
    fired = latents_t.new_empty(R, S)
    col_sum = latents_t.new_empty(R, S)
    rows = chunk_rows(B * latents_t.element_size(), latents_t.device)
    signs = latents_t.new_empty(min(rows, S), B)
    for r in range(R):
        for start in range(0, S, rows):
            chunk = latents_t[r, start:start + rows].relu_()
            # 0/1 floats: the sums stay exact up to 2**24 tokens and need no int64 copy.
            torch.sum(torch.sign(chunk, out=signs[:len(chunk)]), dim=1, out=fired[r, start:start + rows])
            torch.sum(chunk, dim=1, out=col_sum[r, start:start + rows])
    return fired, col_sum


def padded_empty(like: torch.Tensor, *shape: int) -> torch.Tensor:
    """An uninitialized tensor of `shape` whose rows are one cache line (64 bytes) longer than its
    last dimension: with a power-of-two row length (the batch, at the usual sizes), the matmuls
    writing and reading these rows alias in the cache (measured, batch 4096, d_sae 2048: the decoder
    forward 13.4 -> 12.0 ms; the gated kernel's decoder and gradient matmuls 8-14% faster)."""
    pad = max(1, 64 // like.element_size())
    return like.new_empty(*shape[:-1], shape[-1] + pad)[..., :shape[-1]]


def mask_and_sum_(grad_t: torch.Tensor, latents_t: torch.Tensor, grad_latents: torch.Tensor | None = None,
                  row_add: torch.Tensor | None = None) -> torch.Tensor:
    """The ReLU's backward in place on the latent-major gradient `grad_t (R, S, B)` (kept where
    `latents_t > 0`), after adding `grad_latents (R, B, S)` and `row_add (R, S)` (one value per
    latent) if given; returns its row sums (R, S), b_enc's gradient. Chunk by chunk, so the sum
    reads each chunk while it is still in cache."""
    R, S, B = grad_t.shape
    row_sum = grad_t.new_empty(R, S)
    rows = chunk_rows(B * grad_t.element_size(), grad_t.device)
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

    W_enc's gradient is computed transposed, `grad_pre_t @ x_c` (S x B @ B x d): 25% faster than
    `x_c^T @ grad_pre_t^T` on this CPU (measured, batch 4096, d_in 128: 12.0 against 16.1 ms at
    d_sae 2048), and with d columns rather than the d + 1 of the ones-augmented input (13.9 ms)."""
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
                W_dec: torch.Tensor) -> tuple[torch.Tensor, ...]:
        R, d, S = W_enc.shape
        B = x.shape[-2]
        # b_enc rides in the encoder matmul as an extra input column (no separate pass over (R, B, S)).
        x_aug = centred_with_ones(x, b_dec)
        W_enc_aug = torch.cat([W_enc, b_enc.unsqueeze(1)], dim=1)
        latents_t = torch.bmm(W_enc_aug.transpose(1, 2), x_aug.transpose(1, 2), out=padded_empty(x_aug, R, S, B))
        fired, col_sum = _relu_and_count_(latents_t)
        latents = latents_t.transpose(1, 2)
        recon = torch.baddbmm(b_dec.unsqueeze(1), latents, W_dec)
        norms = W_dec.norm(dim=-1)
        # mean_b sum_s latents[b, s] * norms[s] needs only each latent's batch sum.
        l1 = (col_sum * norms).sum(dim=-1) / B
        l0 = fired.sum(dim=-1) / B  # the mean over tokens of their active latents
        ctx.save_for_backward(x_aug, W_enc, W_dec, norms, col_sum, latents_t)
        ctx.x_dim = x.dim()
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(l0, fired)
        return latents, recon, l1, l0, fired

    @staticmethod
    def backward(ctx: Any, grad_latents: torch.Tensor | None, grad_recon: torch.Tensor | None,
                 grad_l1: torch.Tensor | None, _grad_l0: None, _grad_fired: None) -> tuple:
        x_aug, W_enc, W_dec, norms, col_sum, latents_t = ctx.saved_tensors
        R, d, S = W_enc.shape
        B = latents_t.shape[2]
        need_x, need_W_enc, need_b_enc, need_b_dec, need_W_dec = ctx.needs_input_grad
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
            grad_b_enc = mask_and_sum_(grad_pre_t, latents_t, grad_latents, l1_rows)
            grad_x, grad_W_enc, grad_b_dec = encoder_grads(grad_pre_t, grad_b_enc, x_aug, W_enc, need_x, ctx.x_dim)
        if grad_recon is not None:
            grad_b_dec = grad_recon.sum(dim=1) if grad_b_dec is None else grad_b_dec + grad_recon.sum(dim=1)
        return (grad_x, grad_W_enc if need_W_enc else None, grad_b_enc if need_b_enc else None,
                grad_b_dec if need_b_dec else None, grad_W_dec)


def relu_sae(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor,
             W_dec: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A ReLU SAE's forward for R runs: `(latents (R, B, d_sae), recon (R, B, d_in), l1 (R,), l0 (R,),
    fired (R, d_sae))`.

    latents = relu((x - b_dec) @ W_enc + b_enc), recon = latents @ W_dec + b_dec,
    l1 = mean over the batch of sum_i latents_i * ||W_dec_i|| (the decoder-norm-weighted L1),
    l0 = mean over the batch of the active latents, fired = per latent, the tokens it is active on
    (l0 and fired carry no gradient). `latents` is a transposed view of a latent-major tensor.
    Differentiable in everything (latents too); the backward
    computes x's gradient (a full matmul) only when x requires one. Shapes as
    `StackedSAE.pre_acts` and `decode`."""
    return _ReluSAE.apply(x, W_enc, b_enc, b_dec, W_dec)
