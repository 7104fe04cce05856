"""Small device values read on the host a step or more late, without making the host wait.

A training step queues its GPU work and returns; reading a device value back (`.item()`,
`.tolist()`) would make the host wait for every queued kernel. Some host decisions only need a
recent value, not the current one (is any latent near dead? how many?): `LaggedRead` copies a small
tensor into pinned host memory with `non_blocking=True` after each step and records an event; the
host reads the newest copy whose event has completed. On a CPU the copy is done at once (there is
nothing to wait for); on the meta device (a replay, trainer.step_trace) nothing ever arrives unless
`assume` says what the host sees.
"""

from __future__ import annotations

import numpy as np
import torch


class LaggedRead:
    """The newest host copy of a small int64 device tensor pushed once per step, with the host token
    count it was pushed at. `slots` copies may be in flight at once (a host that runs further ahead
    skips pushes until one lands)."""

    def __init__(self, slots: int = 4) -> None:
        self.slots = slots
        self._ring: list[tuple[torch.Tensor, np.ndarray, object]] = []
        self._stamps: list[int | None] = []
        self._next = 0
        self._latest: tuple[int, np.ndarray] | None = None

    def push(self, value: torch.Tensor, stamp: int) -> None:
        """Start copying `value` (int64) to the host; `stamp` says when (e.g. tokens seen so far)."""
        if value.device.type == "meta":
            return  # no values
        cuda = value.device.type == "cuda"
        if not self._ring:
            # Host buffers with numpy views made once: reading a view later is no tensor read.
            for _ in range(self.slots):
                host = torch.empty(value.shape, dtype=value.dtype, device="cpu", pin_memory=cuda)
                self._ring.append((host, host.numpy(), torch.cuda.Event() if cuda else None))
                self._stamps.append(None)
        host, _, event = self._ring[self._next]
        if event is not None and self._stamps[self._next] is not None and not event.query():
            return  # this slot's copy has not landed: keep it; the next push tries again
        host.copy_(value.detach(), non_blocking=cuda)
        if event is not None:
            event.record()
        self._stamps[self._next] = stamp
        self._next = (self._next + 1) % self.slots

    def latest(self) -> tuple[int, np.ndarray] | None:
        """(stamp, values) of the newest copy that has arrived, or None before any has."""
        for i in range(self.slots if self._ring else 0):
            slot = (self._next - 1 - i) % self.slots
            stamp = self._stamps[slot]
            if stamp is None or (self._latest is not None and stamp <= self._latest[0]):
                break  # older slots are older still
            host, array, event = self._ring[slot]
            if event is None or event.query():  # a CPU copy is done when push returns
                self._latest = (stamp, array.copy())
                break
        return self._latest

    def wait(self) -> tuple[int, np.ndarray] | None:
        """The newest copy pushed, waiting for it to land (a host sync on a GPU): when `latest` is too
        old to use. None if nothing was pushed (then `latest`, possibly an assumed view)."""
        if not self._ring:
            return self._latest
        slot = (self._next - 1) % self.slots
        if self._stamps[slot] is None:
            return self._latest
        host, array, event = self._ring[slot]
        if event is not None:
            event.synchronize()
        self._latest = (self._stamps[slot], array.copy())
        return self._latest

    def assume(self, stamp: int, values: np.ndarray) -> None:
        """Set what the host sees (a replay on the meta device, where nothing arrives; a reset)."""
        self._latest = (stamp, np.asarray(values, dtype=np.int64))

    def forget(self) -> None:
        """Drop what was read (the device values were replaced, e.g. by loading a checkpoint)."""
        self._latest = None
        self._stamps = [None] * len(self._stamps)
