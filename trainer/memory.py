"""Memory planning: what a stack of SAEs holds, what the device has free, and what is left for a
resident copy of the cache (pipeline.loader's `resident`)."""

from __future__ import annotations

import os
from typing import Sequence

import torch

from pipeline.files import size  # noqa: F401 (trainer.memory.size: what its callers import)
from trainer.precision import resolve_precision

RESIDENT_MARGIN = 0.8
"""Share of the memory left after the training plan that a resident cache may take (the rest covers
allocator fragmentation, evaluation batches and what the plan does not count)."""


PLANNED_DEAD = 0.1
"""Share of dead latents a plan makes room for: AuxK's buffers grow with the dead latents it reads."""


def stack_bytes(arch: str, cfgs: Sequence, batch: int, precision: str = "auto",
                device: torch.device | str = "cpu", kernels: str = "auto") -> tuple[int, int]:
    """Bytes a stack of `arch` runs (its configs `cfgs`) holds for the whole run (weights, buffers,
    Adam's moments) and the most it has live at once in a training step (that included: gradients,
    activations, autocast's copies, optimizer and constraint temporaries, AuxK's buffers with
    `PLANNED_DEAD` of the latents dead), on `device` at `precision`.

    Not a formula: one real step replayed on the meta device (trainer.step_trace), with the path
    `kernels` resolves to on that device, its live storages counted. Repeated plans of one shape
    are cached."""
    device_type = torch.device(device).type
    precision = resolve_precision(precision, device_type)
    key = (arch, tuple(repr(c) for c in cfgs), batch, precision, device_type, kernels)
    if key not in _PLANS:
        _PLANS[key] = _replayed(arch, cfgs, batch, precision, device_type, kernels)
    return _PLANS[key]


_PLANS: dict[tuple, tuple[int, int]] = {}


def _replayed(arch: str, cfgs: Sequence, batch: int, precision: str, device_type: str, kernels: str) -> tuple[int, int]:
    from trainer.registry import get_architecture
    from trainer.step_trace import assume_dead, replay_step
    from trainer.train import LoopConfig

    with torch.device("meta"):
        model = get_architecture(arch)(list(cfgs))
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}.values()
    held = sum(t.untyped_storage().nbytes() for t in tensors)
    held += 2 * sum(p.untyped_storage().nbytes() for p in model.parameters())  # Adam's two moments
    trace = replay_step(model, LoopConfig(lr=1e-3, total_steps=1000, kernels=kernels), batch, precision,
                        assume_dead(PLANNED_DEAD), device_type)
    return held, trace.peak


def stacks_bytes(plans: Sequence[tuple[int, int]]) -> int:
    """Bytes of several stacks trained on the same batches, one step after another: everything each
    holds, plus the largest step's own live memory on top."""
    return sum(h for h, _ in plans) + max((p - h for h, p in plans), default=0)


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
