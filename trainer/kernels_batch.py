"""The batch-wide top-k of a BatchTopK (and Matryoshka) training step, and sparse kernels for
codes with a variable number of latents per token.

Autograd through `topk` over the flattened (batch x d_sae) pre-activations, a dense scatter and a
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
   gradient of the kept pre-activations only, as `trainer.kernels.sparse_decode` /
   `sparse_pre_acts` do for fixed-k codes: O(kept * d_in) instead of O(batch * d_sae * d_in).
   Per-latent sums go through `embedding_bag` over the latent-grouped order, which is
   deterministic (no atomics), so a resumed run repeats an uninterrupted one bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch.autograd import Function

from trainer.kernels import centred_with_ones, chunk_rows, counts

# Candidates aimed for per kept entry when the threshold is guessed: enough that the guess rarely
# lets fewer than n through (which costs a second pass), few enough that the order statistic over
# them stays cheap.
_CANDIDATE_MARGIN = 1.2
# Rows of a run's pre-activations sampled for a first guess of its threshold.
_SAMPLE_ROWS = 128
# Entries per chunk of the gather in `_entry_dot`: two (chunk, d) temporaries that stay in cache.
_DOT_CHUNK = 2048


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
def codes_from_topk(pre: torch.Tensor, n: torch.Tensor, n_max: int) -> BatchCodes:
    """`BatchCodes` of the top n[r] entries (R,) over each run's whole batch of `pre (R, B, S)`,
    without a host sync: one `topk` of n_max = max(n) per run, so every run holds n_max entries, of
    which those past its own n[r] or not positive are inactive (value 0). The same entries as the
    exact `BatchTopKSelector` (ties at the n-th value aside), as fixed-size tensors (a GPU step
    that never waits for the host)."""
    R, B, S = pre.shape
    vals, flat = pre.reshape(R, B * S).topk(n_max, dim=-1, sorted=True)
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

def _entry_dot(table: torch.Tensor, codes: torch.Tensor, rows: torch.Tensor, bags: torch.Tensor) -> torch.Tensor:
    """(nnz,): entry e is table[codes[e]] . rows[bags[e]], gathered chunk by chunk in cache."""
    out = rows.new_empty(codes.numel())
    row_bytes = 2 * rows.shape[1] * rows.element_size()  # a row of each temporary
    step = chunk_rows(row_bytes, rows.device, _DOT_CHUNK * row_bytes)
    for a in range(0, codes.numel(), step):
        b = min(codes.numel(), a + step)
        picked = table.index_select(0, codes[a:b])
        torch.sum(picked.mul_(rows.index_select(0, bags[a:b])), dim=-1, out=out[a:b])
    return out


def _per_code_sum(codes: BatchCodes, bags_by_code: torch.Tensor, weights: torch.Tensor,
                  rows: torch.Tensor) -> torch.Tensor:
    """(R * S, d): row j is sum over entries e of code j of weights[e] * rows[bag of e] (the
    transpose of a bag sum), in the latent-grouped order: `embedding_bag`, no scatter."""
    return F.embedding_bag(bags_by_code, rows, codes.code_starts,
                           per_sample_weights=weights.index_select(0, codes.order), mode="sum")


class _SegmentDecode(Function):
    @staticmethod
    def forward(ctx: Any, vals: torch.Tensor, W_dec: torch.Tensor, codes: BatchCodes, bags: torch.Tensor,
                bag_starts: torch.Tensor, bags_by_code: torch.Tensor) -> torch.Tensor:
        R, S, d = W_dec.shape
        ctx.codes = codes
        ctx.save_for_backward(vals, W_dec, bags, bags_by_code)
        return F.embedding_bag(codes.code, W_dec.reshape(R * S, d), bag_starts, per_sample_weights=vals, mode="sum")

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        vals, W_dec, bags, bags_by_code = ctx.saved_tensors
        codes: BatchCodes = ctx.codes
        R, S, d = W_dec.shape
        grad = grad.contiguous()
        grad_vals = grad_W = None
        if ctx.needs_input_grad[0]:
            grad_vals = _entry_dot(W_dec.reshape(R * S, d), codes.code, grad, bags)
        if ctx.needs_input_grad[1]:
            grad_W = _per_code_sum(codes, bags_by_code, vals, grad).view(R, S, d)
        return grad_vals, grad_W, None, None, None, None


def segment_decode(vals: torch.Tensor, W_dec: torch.Tensor, codes: BatchCodes, bags: torch.Tensor | None = None,
                   bag_starts: torch.Tensor | None = None) -> torch.Tensor:
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
    return _SegmentDecode.apply(vals, W_dec, codes, bags, bag_starts, bags_by_code)


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
        B = codes.shape[1]
        need_x, need_W, need_b_enc, need_b_dec = ctx.needs_input_grad[2:6]
        grad = grad.contiguous()
        grad_x = grad_W = grad_b_enc = grad_b_dec = None
        if need_W or need_b_enc or need_b_dec:
            # One pass gives both: a column of ones next to the centred input yields b_enc's gradient.
            x_aug = centred_with_ones(x, b_dec).view(R * B, d + 1)
            per_latent = _per_code_sum(codes, codes.token_by_code, grad, x_aug).view(R, S, d + 1)
            if need_W:
                grad_W = per_latent[..., :d].transpose(1, 2)
            grad_b_enc = per_latent[..., d]
        if need_x or need_b_dec:
            if need_x:
                # d pre / d x_c: the kept encoder columns, summed per token with the gradient as weights.
                W_t = W_enc.transpose(1, 2).reshape(R * S, d)
                grad_xc = F.embedding_bag(codes.code, W_t, codes.token_starts, per_sample_weights=grad,
                                          mode="sum").view(R, B, d)
                grad_x = grad_xc if x.dim() == 3 else grad_xc.sum(dim=0)
                grad_b_dec = -grad_xc.sum(dim=1)
            else:
                # The batch sum of d pre / d x_c, without forming it per token: W_enc @ grad_b_enc.
                grad_b_dec = -torch.bmm(W_enc, grad_b_enc.unsqueeze(-1)).squeeze(-1)
        return (None, None, grad_x, grad_W, grad_b_enc if need_b_enc else None,
                grad_b_dec if need_b_dec else None)


def segment_pre_acts(codes: BatchCodes, x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor,
                     b_dec: torch.Tensor) -> torch.Tensor:
    """The kept pre-activations `(x - b_dec) @ W_enc + b_enc` (nnz,) (their values: `codes.vals`,
    computed without autograd), differentiable in x, W_enc, b_enc and b_dec with a backward that
    touches only the kept entries. Shapes as `StackedSAE.pre_acts`. Computes in W_enc's dtype; the
    values of inactive entries (`codes.active`) are 0 and pass no gradient."""
    kept = _SegmentPreActs.apply(codes.vals.to(W_enc.dtype), codes, x.to(W_enc.dtype), W_enc, b_enc, b_dec)
    return kept if codes.active is None else kept * codes.active.to(kept.dtype)
