"""Activations as stored: float32, float16, or bfloat16 kept as its 16-bit patterns (numpy has no
bfloat16), converted, checked and summarised on their way in (`to_stored`) and viewed back on the
way out (`from_stored`). One place for the stored layout: the writer, the reader and the loader use it."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from pipeline.errors import CacheWriteError, PipelineError
from pipeline.stats import accumulate_stats

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


def stored_numpy(t: torch.Tensor, dtype: str) -> np.ndarray:
    """A CPU tensor already in the stored dtype as the numpy array that is written (bf16 as uint16),
    sharing its memory."""
    if dtype == "bfloat16":
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()



def nonfinite_error(hook: str, bad: int, source_absmax: float, dtype: str) -> CacheWriteError:
    if not np.isfinite(source_absmax):
        return CacheWriteError(f"hook {hook} produced {bad} NaN/inf values; the model or input is broken")
    return CacheWriteError(
        f"hook {hook}: {bad} values overflow {dtype} (largest |x| = {source_absmax:.4g}); "
        "write with --dtype float32 or bfloat16"
    )



def to_stored(x: Any, dtype: str, hook: str, stats: dict | None = None) -> np.ndarray:
    """Convert a CPU block of one hook to the stored dtype, check it, and add it to `stats`.

    Only the dtype conversion runs in torch; the check and statistics run in numpy,
    single-threaded, so this thread does not fight the model's forward pass for torch's intra-op
    thread pool (that contention halved the forward's speed on a 2-core CPU).
    """
    t = torch.as_tensor(x).detach()
    if t.ndim != 2:
        raise PipelineError(f"hook {hook}: a block must be (rows, d), got shape {tuple(t.shape)}")
    array = stored_numpy(t.to(TORCH_DTYPES[dtype]).to("cpu").contiguous(), dtype)
    if dtype == "bfloat16":
        values = (array.astype(np.uint32) << 16).view(np.float32)
    else:
        values = array if dtype == "float32" else array.astype(np.float32)
    # One pass gives the statistics and the check: a NaN/inf anywhere makes its row's square sum
    # non-finite (a huge finite value can too; then the exact check below decides).
    sq = np.einsum("ij,ij->i", values, values)
    if not np.isfinite(sq).all() and not np.isfinite(values).all():
        bad = int((~np.isfinite(values)).sum())
        raise nonfinite_error(hook, bad, float(t.to("cpu", torch.float32).abs().max()), dtype)
    if stats is not None:
        accumulate_stats(stats, values, sq)
    return array



def from_stored(array: np.ndarray, dtype: str) -> torch.Tensor:
    """A stored array (bfloat16 as uint16 bit patterns) as a tensor of its real dtype, sharing memory."""
    with warnings.catch_warnings():
        # Memory-mapped shards are read-only on purpose; torch warns about any non-writable array.
        warnings.simplefilter("ignore", UserWarning)
        if dtype == "bfloat16":
            return torch.from_numpy(np.asarray(array).view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(np.asarray(array))
