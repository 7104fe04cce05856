"""A training step queues its work without waiting for the device: no host sync inside `train_step`.

On a GPU, reading a value back (`.item()`, `bool(t)`, `.tolist()`, `.cpu()`), an op whose output size
depends on the data (`nonzero`, a boolean-mask index, `bincount`, `unique`), or a tensor made from
host data (a pageable host-to-device copy) makes the host wait for every queued kernel, so it can no
longer run ahead of the GPU. CI has no GPU, so this counts those calls on the CPU: aten ops through a
`TorchDispatchMode`, Python-level reads (which the CPU does without an aten op) through a
`TorchFunctionMode`. Every architecture's step is counted in the path `kernels="auto"` takes on CUDA
(the dense architectures' plain path, the TopK family's fused sparse path with BatchTopK's
fixed-size `topk` selection) and in the plain path; AuxK takes part (some latents are dead).

The CPU's own BatchTopK selector (`selection="threshold"`) reads candidate counts back by design:
it is the faster choice on a CPU, where a sync costs nothing; its count is reported, not bounded.
"""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from tests.builders import CUDA_PATH, aux_configs, trainer_for

aten = torch.ops.aten
# aten ops that read a device value back or size their output from the data.
SYNC_OPS = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten.bincount, aten.unique_dim,
            aten._unique, aten._unique2, aten.unique_consecutive, aten.repeat_interleave, aten.equal,
            aten.is_nonzero, aten.item, aten.lift_fresh}
# Python-level reads the CPU serves without an aten op (a GPU copies to the host first).
SYNC_METHODS = {"tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"}


class SyncCounter(TorchDispatchMode):
    """Records every call inside it that would make the host wait for a GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in SYNC_OPS:
            self.calls.append(str(func))
        elif func.overloadpacket in (aten.index, aten.index_put, aten.index_put_):
            indices = args[1] if len(args) > 1 else []
            if any(t is not None and t.dtype in (torch.bool, torch.uint8) for t in indices):
                self.calls.append(f"{func} with a boolean mask")
        return func(*args, **(kwargs or {}))


class HostReads(TorchFunctionMode):
    def __init__(self, counter: SyncCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in SYNC_METHODS:
            self.counter.calls.append(f"Tensor.{func.__name__}")
        return func(*args, **(kwargs or {}))


def count_syncs(fn) -> list[str]:
    counter = SyncCounter()
    with HostReads(counter), counter:
        fn()
    return counter.calls


@pytest.mark.parametrize("kernels", ["cuda-auto", "plain"])
@pytest.mark.parametrize("arch", ["topk", "standard", "jumprelu", "gated", "batchtopk", "matryoshka"])
def test_train_step_has_no_host_sync(arch, kernels):
    kernels = CUDA_PATH[arch] if kernels == "cuda-auto" else kernels
    tr, data = trainer_for(arch, kernels)
    for x in data[:4]:  # warm up: the one read of the dead-latent counts, past the first dead latents
        tr.train_step(x)
    if hasattr(tr.model, "dead_mask"):
        assert bool(tr.model.dead_mask().any()), "no dead latent: AuxK did not take part"
    for x in data[4:]:
        calls = count_syncs(lambda: tr.train_step(x))
        assert calls == [], f"{arch} ({kernels}) step {tr.step}: {calls}"


@pytest.mark.parametrize("kernels", ["cuda-auto", "plain"])
@pytest.mark.parametrize("arch", ["standard", "jumprelu", "gated"])
def test_target_l0_controller_has_no_host_sync(arch, kernels):
    """The coefficient controller (trainer.target_l0) updates on the device: runs with a target and
    without, past the lr and penalty warm-ups that hold it (10 steps)."""
    kernels = CUDA_PATH[arch] if kernels == "cuda-auto" else kernels
    n_runs = len(aux_configs(arch))
    tr, data = trainer_for(arch, kernels, target_l0=[4.0] + [None] * (n_runs - 2) + [16.0])
    name = tr.controller.name
    for x in (data * 2)[:12]:
        tr.train_step(x)
    before = getattr(tr.model, name).clone()
    for x in data[4:]:
        calls = count_syncs(lambda: tr.train_step(x))
        assert calls == [], f"{arch} ({kernels}) with a target, step {tr.step}: {calls}"
    moved = getattr(tr.model, name) != before
    assert moved[0] and moved[-1] and not moved[1:-1].any()  # only the runs with a target


def test_the_counter_sees_syncs():
    """The counter itself: each kind of sync it must catch."""
    x = torch.randn(8)
    assert count_syncs(lambda: x.sum().item()) != []
    assert count_syncs(lambda: bool((x > 0).any())) != []
    assert count_syncs(lambda: x.tolist()) != []
    assert count_syncs(lambda: x[x > 0]) != []
    assert count_syncs(lambda: torch.bincount(torch.tensor([1, 2]))) != []
    assert count_syncs(lambda: torch.tensor([1.0, 2.0])) != []
    assert count_syncs(lambda: (x * 2).relu_().topk(3)) == []


def test_threshold_selector_syncs_are_reported():
    """The CPU selector's reads, counted (not bounded: it is only chosen on a CPU)."""
    tr, data = trainer_for("batchtopk", "fused")
    tr.model.selection = "threshold"
    tr.train_step(data[0])
    calls = count_syncs(lambda: tr.train_step(data[1]))
    assert calls, "the threshold selector reads candidate counts back"
