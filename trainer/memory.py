"""Memory planning: what a stack of SAEs holds, what the device has free, and what is left for a
resident copy of the cache (pipeline.loader's `resident`)."""

from __future__ import annotations

import os

import torch

RESIDENT_MARGIN = 0.8
"""Share of the memory left after the training plan that a resident cache may take (the rest covers
allocator fragmentation, evaluation batches and what the plan does not count)."""


def stack_bytes(n_runs: int, d_in: int, d_sae: int, batch: int) -> tuple[int, int]:
    """Bytes a stack of `n_runs` float32 SAEs holds for the whole sweep (weights, gradients, Adam's
    two moments) and at the peak of one step (pre-activations, latents, their gradients and the
    reconstruction for a batch): an upper estimate, measured within 10% on CPU for topk/standard."""
    params = n_runs * (2 * d_in * d_sae + d_sae + d_in)
    step = n_runs * batch * (5 * d_sae + 3 * d_in)
    return 4 * 4 * params, 4 * step


def available_bytes(device: torch.device) -> int:
    """Free memory where the SAEs live: the GPU's, or the machine's available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def resident_budget(device: torch.device, planned: int) -> int:
    """Bytes a resident cache may take on `device` next to a training plan of `planned` bytes."""
    return max(0, int(RESIDENT_MARGIN * (available_bytes(device) - planned)))
