"""Keep glibc from returning big buffers to the OS after every step (the malloc trap).

PyTorch on the CPU allocates per-step temporaries of tens of MiB; glibc serves those with mmap and
unmaps them on free, so every step page-faults them back in (measured: a TopK step with d_sae
4096, batch 4096 went from 521 ms to 345 ms with this; the environment-variable form gave 316 ms).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


def tune_malloc() -> bool:
    """Serve large allocations from the heap and never trim it; True if applied (glibc only).

    Skipped when the user set MALLOC_MMAP_THRESHOLD_ (their choice wins) or on other C libraries.
    """
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") or os.environ.get("PIPELINE_NO_MALLOC_TUNING"):
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))
