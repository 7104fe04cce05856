"""Sparse kernels of the TopK family's training step, batched over the run dimension R.

A TopK decoder reads only k of d_sae latents per token, but a dense `latents @ W_dec` (and its two
backward matmuls) touch all of them. Here the decoder sums the selected decoder rows instead
(`embedding_bag` with per-sample weights), and the encoder gets the gradient of the selected
pre-activations only: every gradient of the step costs O(batch * k * d_in) instead of
O(batch * d_sae * d_in).

- Fixed k per token (TopK): codes are `idx (R, B, k)` (latent ids) with `vals (R, B, k)`:
  `sparse_decode`, `sparse_pre_acts`.
- A variable number per token (BatchTopK, Matryoshka): the kept entries as compressed sparse rows
  (`BatchCodes`): `segment_decode`, `segment_pre_acts`, and the batch-wide selection itself.

Per-latent sums (the gradients of W_dec and W_enc) gather with a stable sort and `embedding_bag`,
deterministic on CPU and CUDA (no atomics), so a resumed run repeats an uninterrupted one bit for
bit.

The variable-length part in detail. Autograd through `topk` over the flattened (batch x d_sae)
pre-activations, a dense scatter and a
dense decoder costs a full sort-like pass and three dense matmuls the step does not need. Here:

1. **Selection without a sort of every value.** The top n = k * batch of each run is found
   exactly from a threshold t that is known to lie *below* the n-th largest value: every entry
   >= t is a candidate (one compare pass and a `nonzero`), and an order statistic of the few
   candidates (about 1.2 n of them) gives the exact n-th largest value. t comes from the previous
   step (the value that would have let ~1.2 n entries through; the weights move little per step)
   or, on the first step or when that fails, from a top-k over a sample of the rows. If fewer
   than n entries pass t, the guess was too high and a lower one is tried (the last resort is
   t = -inf, i.e. every entry): the result is always exactly the top n, whatever the guess.
   Ties at the n-th value (measure zero for float data) are broken by position.
2. **Sparse codes, variable per token.** Only kept entries with a positive value matter (the
   ReLU zeroes the others and passes them no gradient). They are held as compressed sparse rows
   (`BatchCodes`): entries sorted by (run, token, latent), with each token's start offset, plus
   a stable permutation grouping them by latent, computed once and shared by every backward.
3. **Gradients touching only the kept entries.** `segment_decode` sums decoder rows per bag
   (`embedding_bag` with offsets, so bags may hold any number of entries: a token for BatchTopK,
   a (token, prefix group) pair for Matryoshka) and `segment_pre_acts` gives the encoder the
   gradient of the kept pre-activations only, as `sparse_decode` / `sparse_pre_acts` do for
   fixed-k codes: O(kept * d_in) instead of O(batch * d_sae * d_in).
4. **On a GPU, no host sync.** The threshold selector reads candidate counts back (cheap on a CPU);
   `codes_from_topk` finds the same entries with one fixed-size `topk` per run instead
   (`BatchTopKSAE.selection`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch.autograd import Function

from trainer.kernels import gather_dot
from trainer.kernels.chunks import CHUNKS, Chunks, counts
from trainer.kernels.triton_check import use_triton
from trainer.precision import autocast_dtype


# -- fixed k per token ---------------------------------------------------------------------------

def _flat_codes(idx: torch.Tensor, n_latents: int) -> torch.Tensor:
    """(R, B, k) latent ids -> (R * B, k) row ids into a (R * n_latents, d) table of all runs."""
    R, B, k = idx.shape
    offsets = torch.arange(R, device=idx.device).mul_(n_latents).view(R, 1, 1)
    return (idx + offsets).view(R * B, k)


@torch.library.custom_op("sae::bag_sum", mutates_args=())
def bag_sum(table: torch.Tensor, codes: torch.Tensor, offsets: torch.Tensor | None, weights: torch.Tensor,
            runs: int) -> torch.Tensor:
    """`F.embedding_bag(codes, table, offsets, per_sample_weights=weights, mode="sum")`: every weighted
    row sum of this module. `runs`: the table holds that many runs' rows and the bags come grouped by
    run, each reading its own run's rows, so one run's rows are in use at a time: the cost model
    (trainer/step_trace.py) applies its L2 rule to a run's share of the table."""
    return F.embedding_bag(codes, table, offsets, per_sample_weights=weights, mode="sum")


@bag_sum.register_fake
def _(table: torch.Tensor, codes: torch.Tensor, offsets: torch.Tensor | None, weights: torch.Tensor,
      runs: int) -> torch.Tensor:
    return table.new_empty(codes.shape[0] if offsets is None else offsets.numel(), table.shape[1])


def _bag_sum(codes: torch.Tensor, weights: torch.Tensor, table: torch.Tensor, runs: int) -> torch.Tensor:
    """(N, d): row n is sum_s weights[n, s] * table[codes[n, s]]."""
    return bag_sum(table, codes, None, weights, runs)


def _transposed_bag_sum(codes: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor,
                        n_out: int, runs: int) -> torch.Tensor:
    """(n_out, d): row j is sum over (n, s) with codes[n, s] == j of weights[n, s] * rows[n].

    The transpose of `_bag_sum`: a stable sort groups the entries by code, and `embedding_bag`
    over those groups sums each one in a fixed order (no scatter, no atomics)."""
    k = codes.shape[1]
    flat = codes.reshape(-1)
    order = torch.argsort(flat, stable=True)
    per_code = counts(flat, n_out)
    starts = per_code.cumsum(0).sub_(per_code)
    return bag_sum(rows, order.div(k, rounding_mode="floor"), starts, weights.reshape(-1)[order], runs)


def _rowwise_dot(codes: torch.Tensor, table: torch.Tensor, rows: torch.Tensor, chunks: Chunks,
                 runs: int = 1) -> torch.Tensor:
    """(N, k): entry (n, s) is table[codes[n, s]] . rows[n] (`table` holds `runs` runs' rows, the
    codes grouped by run). On a GPU one fused kernel (trainer/kernels/gather_dot.py)."""
    N, k = codes.shape
    if use_triton(table.device):
        return gather_dot.gather_dot(table, codes.reshape(-1), rows.contiguous(), None, k, runs).view(N, k)
    out = rows.new_empty(N, k)
    row_bytes = k * table.shape[1] * table.element_size()  # a row of the gathered temporary
    step = chunks.rows(row_bytes, rows.device, chunks.gather_rows * row_bytes)
    for start in range(0, N, step):
        stop = min(N, start + step)
        picked = table.index_select(0, codes[start:stop].reshape(-1)).view(stop - start, k, -1)
        _dot_rows(picked, rows[start:stop].unsqueeze(-1), out[start:stop].unsqueeze(-1))
    return out


def _dot_rows(picked: torch.Tensor, rows: torch.Tensor, out: torch.Tensor, batched: bool | None = None) -> None:
    """`out (n, k, 1)` = `picked (n, k, d)` @ `rows (n, d, 1)`. On a CPU as a multiply and a sum (a batch
    of (k x d) @ (d x 1) products is 3x slower there; `picked` is overwritten); elsewhere as that batch of
    products, which reads the gathered rows once where the multiply and the sum pass over them three
    times (BENCHMARKS.md "GPU cost model"). `batched` forces one form (None: by device)."""
    if not (picked.device.type != "cpu" if batched is None else batched):
        torch.sum(picked.mul_(rows.transpose(1, 2)), dim=-1, keepdim=True, out=out)
    else:
        torch.bmm(picked, rows.to(picked.dtype), out=out)


def sparse_encoder_grads(needs: tuple[bool, ...], x: torch.Tensor, W_enc: torch.Tensor, b_dec: torch.Tensor, B: int,
                         latent_sums: Callable[[torch.Tensor], torch.Tensor],
                         token_sums: Callable[[torch.Tensor], torch.Tensor]) -> tuple:
    """The one sparse encoder backward: the gradients of x, W_enc, b_enc and b_dec (`needs`, in that
    order) from the gradient of the selected pre-activations `(x - b_dec) @ W_enc + b_enc`, given its
    two sums over the selected entries, which depend on how they are held (fixed k per token or
    compressed rows): `latent_sums(rows (R * B, n))` -> (R * S, n), each latent's sum of its tokens'
    rows weighted by the gradient; `token_sums(table (R * S, d))` -> (R * B, d), each token's sum
    of its latents' rows weighted by it. Returns the autograd tuple of the Functions below (None
    for the values and the codes)."""
    need_x, need_W, need_b_enc, need_b_dec = needs
    R, d, S = W_enc.shape
    grad_x = grad_W = grad_b_enc = grad_b_dec = None
    if need_W:
        # Each latent's rows, (R, S, d): W_enc's own storage order (latent-major, `StackedSAE`), so
        # autograd takes this gradient as it is instead of copying it into the parameter's layout.
        x_c = (x - b_dec.unsqueeze(1)).expand(R, B, d).reshape(R * B, d)
        grad_W = latent_sums(x_c).view(R, S, d).transpose(1, 2)
    if need_W or need_b_enc or need_b_dec:
        grad_b_enc = latent_sums(x.new_ones(R * B, 1)).view(R, S)
    if need_x:
        # d pre / d x_c: the selected encoder columns, summed per token with the gradient as weights.
        grad_xc = token_sums(W_enc.transpose(1, 2).reshape(R * S, d)).view(R, B, d)
        grad_x = grad_xc if x.dim() == 3 else grad_xc.sum(dim=0)
        grad_b_dec = -grad_xc.sum(dim=1)
    elif need_b_dec:
        # The batch sum of d pre / d x_c, without forming it per token: W_enc @ grad_b_enc.
        grad_b_dec = -torch.bmm(W_enc, grad_b_enc.unsqueeze(-1)).squeeze(-1)
    return (None, None, grad_x, grad_W, grad_b_enc if need_b_enc else None, grad_b_dec if need_b_dec else None)


def _gather_table(W_dec: torch.Tensor) -> torch.Tensor:
    """W_dec as (R * S, d) rows to gather from, in autocast's dtype when it is on (one cast a step; every
    gather and dot over the rows then moves half the bytes), else as it is."""
    dtype = autocast_dtype(W_dec.device.type) or W_dec.dtype
    return W_dec.reshape(-1, W_dec.shape[-1]).to(dtype)


class _SparseDecode(Function):
    @staticmethod
    def forward(ctx: Any, idx: torch.Tensor, vals: torch.Tensor, W_dec: torch.Tensor, chunks: Chunks) -> torch.Tensor:
        R, B, k = idx.shape
        _, S, d = W_dec.shape
        codes = _flat_codes(idx, S)
        table = _gather_table(W_dec)
        ctx.save_for_backward(codes, vals, table)
        ctx.chunks, ctx.W_shape = chunks, W_dec.shape
        return _bag_sum(codes, vals.reshape(R * B, k).to(table.dtype), table, R).view(R, B, d)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[None, torch.Tensor | None, torch.Tensor | None]:
        codes, vals, table = ctx.saved_tensors
        R, S, d = ctx.W_shape
        B, k = vals.shape[1], vals.shape[2]
        grad_rows = grad_out.reshape(R * B, d)
        grad_vals = grad_W = None
        if ctx.needs_input_grad[1]:
            dots = _rowwise_dot(codes, table, grad_rows.to(table.dtype), ctx.chunks, R)
            grad_vals = dots.view(R, B, k).to(vals.dtype)
        if ctx.needs_input_grad[2]:  # in the weights' dtype: each latent sums many rows
            grad_W = _transposed_bag_sum(codes, vals.reshape(R * B, k), grad_rows.to(vals.dtype), R * S,
                                         R).view(R, S, d)
        return None, grad_vals, grad_W, None


def sparse_decode(idx: torch.Tensor, vals: torch.Tensor, W_dec: torch.Tensor, chunks: Chunks = CHUNKS) -> torch.Tensor:
    """`(R, B, d_in)`: out[r, b] = sum_s vals[r, b, s] * W_dec[r, idx[r, b, s]], without b_dec.

    Equals `dense(vals) @ W_dec` for the dense (R, B, d_sae) latents that hold `vals` at `idx`
    (ids distinct within a row), in O(B * k * d_in) forward and backward. `idx (R, B, k)` long,
    `vals (R, B, k)`, `W_dec (R, d_sae, d_in)`; differentiable in vals and W_dec. The gathers compute
    in autocast's dtype when it is on (as a matmul would; embedding_bag accumulates in float32), W_dec's
    gradient in W_dec's dtype."""
    return _SparseDecode.apply(idx, vals.to(W_dec.dtype), W_dec, chunks)


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
        codes = _flat_codes(idx, S)
        grad_flat = grad.reshape(R * B, k)
        return sparse_encoder_grads(ctx.needs_input_grad[2:6], x, W_enc, b_dec, B,
                                    lambda rows: _transposed_bag_sum(codes, grad_flat, rows, R * S, R),
                                    lambda table: _bag_sum(codes, grad_flat, table, R))


def sparse_pre_acts(selected: torch.Tensor, idx: torch.Tensor, x: torch.Tensor, W_enc: torch.Tensor,
                    b_enc: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    """The pre-activations `(x - b_dec) @ W_enc + b_enc` at `idx (R, B, k)`, differentiable in x,
    W_enc, b_enc and b_dec with a backward that touches only those B * k entries.

    `selected` holds their values, already computed (a TopK step computes every pre-activation
    without autograd to choose idx; the values are then gathered, not computed again). Shapes as
    `StackedSAE.pre_acts`: x (B, d_in) or (R, B, d_in), W_enc (R, d_in, d_sae), b_enc (R, d_sae),
    b_dec (R, d_in). Computes in W_enc's dtype, as `sparse_decode`."""
    return _SparsePreActs.apply(selected.to(W_enc.dtype), idx, x.to(W_enc.dtype), W_enc, b_enc, b_dec)


# -- a few latents, dense: AuxK over the dead ones ------------------------------------------------

class _SharedGather(Function):
    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, index: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.save_for_backward(index)
        ctx.dim, ctx.shape = dim, weight.shape
        ctx.set_materialize_grads(False)
        return weight.view_as(weight), weight.gather(dim, index)

    @staticmethod
    def backward(ctx: Any, grad_all: torch.Tensor | None, grad_part: torch.Tensor | None) -> tuple:
        (index,) = ctx.saved_tensors
        if grad_part is None:
            return grad_all, None, None
        if grad_all is None:
            grad_all = grad_part.new_zeros(ctx.shape)
        elif 0 in grad_all.stride():  # a broadcast gradient cannot take an in-place add
            grad_all = grad_all.clone()
        # The slice's rows go into the full gradient in place: autograd never holds a second one.
        return grad_all.scatter_add_(ctx.dim, index, grad_part.to(grad_all.dtype)), None, None


def shared_gather(weight: torch.Tensor, index: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(weight, weight.gather(dim, index))` where both are used in one step: the gathered slice's
    gradient is added into the full one's rows in place (a few rows' traffic) instead of autograd
    adding two full-size gradients. `index` has the gathered shape (an expanded view is fine). Use
    the first output in place of `weight` for everything else in the step."""
    return _SharedGather.apply(weight, index, dim)


class _GivenPreActs(Function):
    @staticmethod
    def forward(ctx: Any, values: torch.Tensor, x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor,
                b_in: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, W_enc, b_in)
        ctx.compute_dtype = values.dtype
        return values.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        x, W_enc, b_in = ctx.saved_tensors
        need_x, need_W, need_b, need_b_in = ctx.needs_input_grad[1:5]
        # The matmuls in the forward's dtype (bf16 under autocast, which backward runs outside of).
        cd = ctx.compute_dtype
        g = grad.to(cd)
        grad_x = grad_W = grad_b = grad_b_in = None
        if need_W:
            x_c = (x - b_in.unsqueeze(1)).to(cd)
            x_c = x_c.expand(W_enc.shape[0], *x_c.shape[-2:])
            grad_W = torch.bmm(x_c.transpose(1, 2), g)
        g_sum = grad.sum(dim=1, dtype=W_enc.dtype)
        if need_b:
            grad_b = g_sum
        if need_b_in:
            grad_b_in = -torch.bmm(W_enc, g_sum.unsqueeze(-1)).squeeze(-1)
        if need_x:
            grad_xc = torch.bmm(g, W_enc.transpose(1, 2).to(cd)).to(x.dtype)
            grad_x = grad_xc if x.dim() == 3 else grad_xc.sum(dim=0)
        return None, grad_x, grad_W, grad_b, grad_b_in


def given_pre_acts(values: torch.Tensor, x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor,
                   b_in: torch.Tensor) -> torch.Tensor:
    """`(x - b_in) @ W_enc + b_enc` (R, B, n) for a few latents' encoder columns `W_enc (R, d_in, n)`,
    `b_enc (R, n)`, whose values are already known (`values`, gathered from the step's
    pre-activations, computed without a graph): returns them, with the gradient of that formula
    (three small dense matmuls over n latents, in `values`' dtype)."""
    return _GivenPreActs.apply(values, x, W_enc, b_enc, b_in)


# -- a variable number per token ------------------------------------------------------------------

# Candidates aimed for per kept entry when the threshold is guessed: enough that the guess rarely
# lets fewer than n through (which costs a second pass), few enough that the order statistic over
# them stays cheap.
_CANDIDATE_MARGIN = 1.2
# Rows of a run's pre-activations sampled for a first guess of its threshold.
_SAMPLE_ROWS = 128


@dataclass
class BatchCodes:
    """Kept entries of R runs' (R, B, S) latents, as compressed sparse rows.

    Entries are sorted by (run, token, latent). `token` is r * B + b (a row of the (R * B, d)
    inputs and reconstructions), `code` is r * S + s (a row of the (R * S, d) flattened decoder or
    transposed encoder), `latent` is s. `order` lists the entries grouped by code (stable: tokens
    ascending within a latent); `code_counts` / `code_starts` delimit the groups."""

    shape: tuple[int, int, int]
    flat: torch.Tensor          # (nnz,) index into the flattened (R, B, S) latents
    token: torch.Tensor         # (nnz,)
    latent: torch.Tensor        # (nnz,)
    code: torch.Tensor          # (nnz,)
    vals: torch.Tensor          # (nnz,) the kept activations (> 0), no graph
    token_starts: torch.Tensor  # (R * B,) first entry of each token
    order: torch.Tensor         # (nnz,)
    code_counts: torch.Tensor   # (R * S,) entries per code: the firing count of each latent
    code_starts: torch.Tensor   # (R * S,) first position of each code in `order`
    run_counts: torch.Tensor    # (R,) active entries per run
    active: torch.Tensor | None = None
    """(nnz,) 0/1 floats: the entries that count (positive and kept); None when all of them do.
    A fixed-size selection (`codes_from_topk`) holds entries that do not: their value is 0."""

    @property
    def token_by_code(self) -> torch.Tensor:
        return self.token.index_select(0, self.order)

    def dense_into(self, out: torch.Tensor) -> torch.Tensor:
        """`out (R, B, S)` overwritten with the dense latents: vals at the kept entries, zeros elsewhere."""
        out.zero_().view(-1).index_copy_(0, self.flat, self.vals.to(out.dtype))
        return out

    def fired(self, dtype: torch.dtype) -> torch.Tensor:
        """(R, S): per latent, the tokens it is active on."""
        R, _, S = self.shape
        if self.active is None:
            return self.code_counts.view(R, S).to(dtype)
        return counts(self.code, R * S, self.active.to(dtype)).view(R, S)

    def batch_threshold(self, n: torch.Tensor) -> torch.Tensor:
        """(R,) BatchTopK's batch threshold: the smallest kept activation of each run, or 0 when fewer
        than n[r] (a tensor) entries were positive (every positive one was then kept); NaN when none was."""
        R = self.shape[0]
        run = self.token.div(self.shape[1], rounding_mode="floor")
        vals = self.vals if self.active is None else self.vals.masked_fill(self.active == 0, float("inf"))
        smallest = self.vals.new_full((R,), float("inf")).scatter_reduce_(0, run, vals, "amin")
        smallest = torch.where(smallest.isinf(), torch.full_like(smallest, float("nan")), smallest)
        return torch.where(self.run_counts >= n, smallest, torch.zeros_like(smallest))


def codes_from_flat(flat: torch.Tensor, vals: torch.Tensor, shape: tuple[int, int, int],
                    active: torch.Tensor | None = None) -> BatchCodes:
    """`BatchCodes` from flat indices into (R, B, S), sorted, and their values (all positive, or
    `active` 0/1 floats saying which count)."""
    R, B, S = shape
    token = flat.div(S, rounding_mode="floor")
    latent = flat - token * S
    code = token.div(B, rounding_mode="floor").mul_(S).add_(latent)
    token_counts = counts(token, R * B)
    code_counts = counts(code, R * S)
    run_counts = (token_counts.view(R, B).sum(dim=1) if active is None
                  else counts(token.div(B, rounding_mode="floor"), R, active).to(torch.long))
    return BatchCodes(shape=shape, flat=flat, token=token, latent=latent, code=code, vals=vals,
                      token_starts=token_counts.cumsum(0).sub_(token_counts),
                      order=torch.argsort(code, stable=True), code_counts=code_counts,
                      code_starts=code_counts.cumsum(0).sub_(code_counts), run_counts=run_counts, active=active)


@torch.no_grad()
def codes_from_topk(pre: torch.Tensor, n: torch.Tensor, n_max: int, ordered: bool = True) -> BatchCodes:
    """`BatchCodes` of the top n[r] entries (R,) over each run's whole batch of `pre (R, B, S)`,
    without a host sync: one `topk` of n_max = max(n) per run, so every run holds n_max entries, of
    which those past its own n[r] or not positive are inactive (value 0). The same entries as the
    exact `BatchTopKSelector` (ties at the n-th value aside), as fixed-size tensors (a GPU step
    that never waits for the host). `ordered=False` when every run keeps n_max (no order needed)."""
    R, B, S = pre.shape
    vals, flat = pre.reshape(R, B * S).topk(n_max, dim=-1, sorted=ordered)
    active = (torch.arange(n_max, device=pre.device) < n.view(R, 1)) & (vals > 0)
    flat, order = flat.sort(dim=-1)  # (token, latent) order within each run
    active = active.gather(1, order).to(torch.float32)
    vals = vals.gather(1, order) * active.to(vals.dtype)
    flat = flat + torch.arange(R, device=pre.device).view(R, 1) * (B * S)
    return codes_from_flat(flat.view(-1), vals.view(-1), (R, B, S), active.view(-1))


@torch.no_grad()
def codes_from_dense(latents: torch.Tensor) -> BatchCodes:
    """`BatchCodes` of the positive entries of dense latents (R, B, S): for a selection given as
    dense latents (the data-parallel hook's)."""
    flat = latents.reshape(-1)
    idx = flat.nonzero().squeeze(1)
    return codes_from_flat(idx, flat.index_select(0, idx), tuple(latents.shape))


# -- the batch-wide top n ------------------------------------------------------------------------

def _sample_threshold(pre_r: torch.Tensor, n: int, margin: float) -> float:
    """A guess of a value below the n-th largest of `pre_r (B, S)`: the value that lets
    margin * n / B entries per row through on a strided sample of rows."""
    B, S = pre_r.shape
    sample = pre_r[::max(1, B // _SAMPLE_ROWS)]
    m = sample.shape[0]
    q = math.ceil(n * m / B * margin) + 8
    if q >= sample.numel():
        return -math.inf
    t = float(sample.reshape(-1).topk(q, sorted=False).values.min())
    return -math.inf if math.isnan(t) else t  # NaNs (a diverged run) rank first in topk


def _nth_largest_kept(cand: torch.Tensor, n: int) -> torch.Tensor:
    """Bool mask over candidate values `cand (c,)`: the n largest (ties at the n-th value broken by
    position) that are also positive; every positive one when c <= n (only NaNs were left out)."""
    c = cand.numel()
    if c <= n:
        return cand > 0
    nth = cand.kthvalue(c - n + 1).values  # the n-th largest
    keep = cand > nth
    need = n - int(keep.sum())
    tie = cand == nth
    if int(tie.sum()) > need:  # more entries equal the n-th value than places left: the first ones
        tie &= tie.cumsum(0) <= need
    return (keep | tie) & (cand > 0)


class BatchTopKSelector:
    """The exact top n[r] entries of each run's pre-activations (R, B, S), positive ones only, as
    sorted flat indices; keeps each run's last threshold as the next step's guess (module docstring).

    The guess only decides how much work finding the top n takes, never which entries are kept:
    a fresh selector (a resumed run, a single run vs a stack) picks exactly the same entries."""

    def __init__(self) -> None:
        self.hint: dict[int, float] = {}

    @torch.no_grad()
    def __call__(self, pre: torch.Tensor, n: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(flat indices (nnz,) sorted, their values (nnz,)) of the kept entries of `pre`."""
        R, B, S = pre.shape
        flat = pre.reshape(-1)
        thresholds = [self.hint.get(r) for r in range(R)]
        thresholds = [_sample_threshold(pre[r], n[r], _CANDIDATE_MARGIN) if t is None else t
                      for r, t in enumerate(thresholds)]
        idx, counts = self._candidates(pre, thresholds)
        parts_idx, parts_val = [], []
        at = 0
        for r in range(R):
            cand_idx = idx[at:at + counts[r]]
            at += counts[r]
            margin, t = _CANDIDATE_MARGIN, thresholds[r]
            # Fewer than n passed: the guess was above the n-th value; lower it. After -inf, only
            # NaNs (a diverged run: they never pass a comparison) can still be missing.
            while cand_idx.numel() < n[r] and t > -math.inf:
                margin *= 4
                t = _sample_threshold(pre[r], n[r], margin) if margin < 100 else -math.inf
                cand_idx, _ = self._candidates(pre[r:r + 1], [t])
                cand_idx = cand_idx + r * B * S
            cand = flat.index_select(0, cand_idx)
            keep = _nth_largest_kept(cand, n[r])
            self._remember(r, cand, n[r])
            parts_idx.append(cand_idx[keep])
            parts_val.append(cand[keep])
        return torch.cat(parts_idx), torch.cat(parts_val)

    @staticmethod
    def _candidates(pre: torch.Tensor, thresholds: list[float]) -> tuple[torch.Tensor, list[int]]:
        """Sorted flat indices of the entries of `pre (R', B, S)` >= each run's threshold, and the
        count per run."""
        R, B, S = pre.shape
        t = torch.tensor(thresholds, dtype=pre.dtype, device=pre.device).view(R, 1, 1)
        idx = (pre >= t).view(-1).nonzero().squeeze(1)
        if R == 1:
            return idx, [idx.numel()]
        bounds = torch.arange(1, R + 1, device=idx.device) * (B * S)
        ends = torch.searchsorted(idx, bounds).tolist()
        return idx, [b - a for a, b in zip([0] + ends[:-1], ends)]

    def _remember(self, r: int, cand: torch.Tensor, n: int) -> None:
        """Next step's guess for run r: the value that would have let margin * n entries through now."""
        want = math.ceil(n * _CANDIDATE_MARGIN)
        c = cand.numel()
        if c == 0:
            self.hint.pop(r, None)
        else:
            self.hint[r] = float(cand.kthvalue(c - want + 1).values) if c >= want else float(cand.min())


# -- sparse kernels over variable-length bags ----------------------------------------------------

def _entry_dot(table: torch.Tensor, codes: torch.Tensor, rows: torch.Tensor, bags: torch.Tensor,
               chunks: Chunks, runs: int = 1) -> torch.Tensor:
    """(nnz,): entry e is table[codes[e]] . rows[bags[e]], gathered chunk by chunk in cache (on a GPU
    in one fused kernel; `runs` as `_rowwise_dot`)."""
    if use_triton(table.device):
        return gather_dot.gather_dot(table, codes, rows.contiguous(), bags, 0, runs)
    out = rows.new_empty(codes.numel())
    row_bytes = 2 * rows.shape[1] * rows.element_size()  # a row of each temporary
    step = chunks.rows(row_bytes, rows.device, chunks.gather_entries * row_bytes)
    for a in range(0, codes.numel(), step):
        b = min(codes.numel(), a + step)
        picked = table.index_select(0, codes[a:b])
        _dot_rows(picked.unsqueeze(1), rows.index_select(0, bags[a:b]).unsqueeze(-1), out[a:b].view(-1, 1, 1))
    return out


def _per_code_sum(codes: BatchCodes, bags_by_code: torch.Tensor, weights: torch.Tensor,
                  rows: torch.Tensor) -> torch.Tensor:
    """(R * S, d): row j is sum over entries e of code j of weights[e] * rows[bag of e] (the
    transpose of a bag sum), in the latent-grouped order: `embedding_bag`, no scatter."""
    return bag_sum(rows, bags_by_code, codes.code_starts, weights.index_select(0, codes.order), codes.shape[0])


class _SegmentDecode(Function):
    @staticmethod
    def forward(ctx: Any, vals: torch.Tensor, W_dec: torch.Tensor, codes: BatchCodes, bags: torch.Tensor,
                bag_starts: torch.Tensor, bags_by_code: torch.Tensor, chunks: Chunks) -> torch.Tensor:
        table = _gather_table(W_dec)
        ctx.codes, ctx.chunks, ctx.W_shape = codes, chunks, W_dec.shape
        ctx.save_for_backward(vals, table, bags, bags_by_code)
        return bag_sum(table, codes.code, bag_starts, vals.to(table.dtype), codes.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        vals, table, bags, bags_by_code = ctx.saved_tensors
        codes: BatchCodes = ctx.codes
        R, S, d = ctx.W_shape
        grad = grad.contiguous()
        grad_vals = grad_W = None
        if ctx.needs_input_grad[0]:
            grad_vals = _entry_dot(table, codes.code, grad.to(table.dtype), bags, ctx.chunks, R).to(vals.dtype)
        if ctx.needs_input_grad[1]:  # in the weights' dtype: each latent sums many rows
            grad_W = _per_code_sum(codes, bags_by_code, vals, grad.to(vals.dtype)).view(R, S, d)
        return grad_vals, grad_W, None, None, None, None, None


def segment_decode(vals: torch.Tensor, W_dec: torch.Tensor, codes: BatchCodes, bags: torch.Tensor | None = None,
                   bag_starts: torch.Tensor | None = None, chunks: Chunks = CHUNKS) -> torch.Tensor:
    """`(n_bags, d)`: bag i is sum over entries e in it of vals[e] * W_dec[code[e]], without b_dec.

    `vals (nnz,)` is differentiable, as is `W_dec (R, S, d)`. Bags default to the tokens (n_bags =
    R * B: `dense(vals) @ W_dec` per run, flattened); otherwise `bags (nnz,)` is each entry's bag id,
    nondecreasing over the entries, and `bag_starts (n_bags,)` each bag's first entry. Computes in
    W_dec's dtype (a gather needs no matrix unit)."""
    vals = vals.to(W_dec.dtype)
    if bags is None:
        bags, bag_starts, bags_by_code = codes.token, codes.token_starts, codes.token_by_code
    else:
        bags_by_code = bags.index_select(0, codes.order)
    return _SegmentDecode.apply(vals, W_dec, codes, bags, bag_starts, bags_by_code, chunks)


class _SegmentPreActs(Function):
    @staticmethod
    def forward(ctx: Any, selected: torch.Tensor, codes: BatchCodes, x: torch.Tensor, W_enc: torch.Tensor,
                b_enc: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
        ctx.codes = codes
        ctx.save_for_backward(x, W_enc, b_dec)
        return selected.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        x, W_enc, b_dec = ctx.saved_tensors
        codes: BatchCodes = ctx.codes
        R, d, S = W_enc.shape
        grad = grad.contiguous()
        return sparse_encoder_grads(ctx.needs_input_grad[2:6], x, W_enc, b_dec, codes.shape[1],
                                    lambda rows: _per_code_sum(codes, codes.token_by_code, grad, rows),
                                    lambda table: bag_sum(table, codes.code, codes.token_starts, grad,
                                                          codes.shape[0]))


def segment_pre_acts(codes: BatchCodes, x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor,
                     b_dec: torch.Tensor) -> torch.Tensor:
    """The kept pre-activations `(x - b_dec) @ W_enc + b_enc` (nnz,) (their values: `codes.vals`,
    computed without autograd), differentiable in x, W_enc, b_enc and b_dec with a backward that
    touches only the kept entries. Shapes as `StackedSAE.pre_acts`. Computes in W_enc's dtype; the
    values of inactive entries (`codes.active`) are 0 and pass no gradient."""
    kept = _SegmentPreActs.apply(codes.vals.to(W_enc.dtype), codes, x.to(W_enc.dtype), W_enc, b_enc, b_dec)
    return kept if codes.active is None else kept * codes.active.to(kept.dtype)
