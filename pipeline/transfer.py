"""Host-to-device copies that never make the host wait for the GPU.

A copy from pageable host memory to a GPU synchronises with the stream first (the driver stages it),
so a training or caching loop that copies a few indices per step stops running ahead of the GPU. From
pinned memory with `non_blocking=True`, the copy is queued like a kernel; PyTorch's caching host
allocator keeps the pinned block until the copy is done.
"""

from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A CPU tensor on `device`, queued without a host wait when the device is a GPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def values_to_device(values: list, like: torch.Tensor) -> torch.Tensor:
    """A tensor of Python `values` (dtype of `like`) on `like`'s device, queued without a host wait."""
    return to_device(torch.tensor(values, dtype=like.dtype), like.device)
