"""A fused gather-dot for the sparse decoder's backward on a GPU: out[e] = table[ia[e]] . rows[ib[e]].

The gradient of a TopK latent's value is the dot of its decoder row with its token's output
gradient. As plain ops (trainer/kernels/sparse.py: `index_select`, then a batch of products) the
picked rows are written to a temporary and read back: three passes over batch * k rows of d_in. This
Triton kernel reads each picked row once and keeps the products in registers; the token rows are
few (batch of them) and stay in cache.

Entries come grouped by run (codes of run r index rows r * S .. (r + 1) * S - 1 of the table), so
the table rows in use at a time are one run's: `runs` tells the cost model (trainer/step_trace.py)
how the table splits, for its L2 rule. On a CPU the kernel runs in Triton's interpreter (the tests);
CPU training keeps the plain ops, which are the reference.
"""

from __future__ import annotations

import torch

from trainer.kernels.adam_tail import triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _gather_dot(T, IA, Rows, IB, OUT, E, k, d: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
                    PER_ROW: tl.constexpr, ACC: tl.constexpr):
        e = tl.program_id(0).to(tl.int64) * BLOCK_E + tl.arange(0, BLOCK_E)
        live = e < E
        ia = tl.load(IA + e, mask=live, other=0).to(tl.int64)
        if PER_ROW:  # fixed k per token: entry e belongs to token e // k (no index tensor to read)
            ib = e // k
        else:
            ib = tl.load(IB + e, mask=live, other=0).to(tl.int64)
        acc = tl.zeros((BLOCK_E,), dtype=ACC)
        for start in range(0, d, BLOCK_D):  # d a constant: one compile per width, an unrolled loop
            offs = start + tl.arange(0, BLOCK_D)
            m = live[:, None] & (offs < d)[None, :]
            a = tl.load(T + ia[:, None] * d + offs[None, :], mask=m, other=0.0)
            b = tl.load(Rows + ib[:, None] * d + offs[None, :], mask=m, other=0.0)
            acc += tl.sum(a.to(ACC) * b.to(ACC), axis=1)
        tl.store(OUT + e, acc, mask=live)


@torch.library.custom_op("sae::gather_dot", mutates_args=())
def gather_dot(table: torch.Tensor, ia: torch.Tensor, rows: torch.Tensor, ib: torch.Tensor | None, k: int,
               runs: int) -> torch.Tensor:
    """(E,) float32 (float64 for float64 inputs): entry e is table[ia[e]] . rows[ib[e]], or, with `ib`
    None, rows[e // k]. `table` (n, d) and `rows` (m, d) contiguous, in one dtype; `ia`, `ib` (E,)
    long. `runs`: how many equal slices the table holds, the entries grouped by slice (the cost model's
    L2 rule)."""
    E, d = ia.numel(), table.shape[1]
    out = torch.empty(E, dtype=torch.float64 if table.dtype == torch.float64 else torch.float32,
                      device=table.device)
    if E:
        block_e = 16
        _gather_dot[(triton.cdiv(E, block_e),)](table, ia, rows, ia if ib is None else ib, out, E, max(k, 1), d,
                                                BLOCK_E=block_e, BLOCK_D=min(128, triton.next_power_of_2(d)),
                                                PER_ROW=ib is None,
                                                ACC=tl.float64 if out.dtype == torch.float64 else tl.float32)
    return out


@gather_dot.register_fake
def _(table: torch.Tensor, ia: torch.Tensor, rows: torch.Tensor, ib: torch.Tensor | None, k: int,
      runs: int) -> torch.Tensor:
    return table.new_empty(ia.numel(), dtype=torch.float64 if table.dtype == torch.float64 else torch.float32)
