"""How the fused kernels cut their passes (`Chunks`), and the small tensor helpers they share."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Chunks:
    """Chunk sizes of the fused kernels' passes; every kernel takes one (default `CHUNKS`)."""

    cpu_bytes: int = 1 << 21
    """Bytes per chunk of an elementwise pass over latent rows on a CPU: the chunk's temporaries stay
    in cache."""
    gpu_bytes: int = 1 << 28
    """The same on a GPU, where there is no cache to keep a chunk in and every chunk costs a launch
    per op (a 2 MiB chunking of d_sae 32768 x batch 4096 is ~1,000 launches a pass): it only bounds
    the temporaries' memory."""
    gather_rows: int = 256
    """Tokens per chunk of the fixed-k sparse gathers on a CPU (a few MiB of gathered rows)."""
    gather_entries: int = 2048
    """Entries per chunk of the variable-length sparse gathers on a CPU."""
    matmul_bytes: int = 1 << 25
    """Bytes of the gated backward's gradient chunk: its matmul re-packs the other operand per call,
    and smaller chunks make it slower."""

    def rows(self, row_bytes: int, device: torch.device, cpu_bytes: int | None = None) -> int:
        """Rows of `row_bytes` per chunk: `cpu_bytes` (default `self.cpu_bytes`) on a CPU, else
        `gpu_bytes`."""
        if device.type != "cpu":
            return max(1, self.gpu_bytes // row_bytes)
        return max(1, (cpu_bytes if cpu_bytes is not None else self.cpu_bytes) // row_bytes)


CHUNKS = Chunks()
"""The defaults, measured on the 2-core CPU of BENCHMARKS.md."""


def row_chunks(rows: int, *tensors: torch.Tensor) -> zip:
    """Chunks of `rows` latents of every (R, S) or (R, S, n) tensor, zipped: each as (R * S, n)
    views split in one call (cheaper than slicing per chunk). A chunk may hold the last latents of
    one run and the first of the next: every op on them must be row by row."""
    return zip(*((t if t.dim() == 3 else t.unsqueeze(-1)).flatten(0, 1).split(rows) for t in tensors))


def counts(index: torch.Tensor, n: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """How often each of 0..n-1 occurs in `index` (int64), or the sum of `weights` per value.

    `torch.bincount` on CUDA reads the largest index back to the host (a sync every call); a
    scatter-add into n zeros does not. Integer sums (and float sums of 0/1 weights, exact up to
    2**24) do not depend on the order the GPU's atomics add them in: deterministic."""
    if weights is None:
        return torch.zeros(n, dtype=torch.long, device=index.device).scatter_add_(0, index, torch.ones_like(index))
    return torch.zeros(n, dtype=weights.dtype, device=index.device).scatter_add_(0, index, weights)


def padded_empty(like: torch.Tensor, *shape: int) -> torch.Tensor:
    """An uninitialized tensor of `shape` whose rows are one cache line (64 bytes) longer than its
    last dimension: with a power-of-two row length (the batch, at the usual sizes), the matmuls
    writing and reading these rows alias in the cache (BENCHMARKS.md, "Kernel design choices")."""
    pad = max(1, 64 // like.element_size())
    return like.new_empty(*shape[:-1], shape[-1] + pad)[..., :shape[-1]]


# relu's backward in place: grad kept where the reference tensor is > 0.
threshold_backward_ = torch.ops.aten.threshold_backward.grad_input
