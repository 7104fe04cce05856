"""The GPU cost model (benchmarks/gpu_model.py, trainer/step_trace.py) at small sizes: a replay of the
real training step on the meta device, counted op by op."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from trainer.step_trace import MetaAutocast, StepTracer, assume_dead, replay_step
from trainer.train import LoopConfig

ROOT = Path(__file__).resolve().parents[1]


def gpu_model():
    spec = importlib.util.spec_from_file_location("gpu_model", ROOT / "benchmarks" / "gpu_model.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_tracer_counts_bytes_flops_and_live_memory():
    table = torch.empty(1000, 64, device="meta")
    idx = torch.empty(300, dtype=torch.long, device="meta")
    a, b = torch.empty(128, 64, device="meta"), torch.empty(64, 32, device="meta")
    bias = torch.empty(32, device="meta")
    tracer = StepTracer()
    tracer.hold([table])
    with tracer:
        picked = table.index_select(0, idx)          # gathers 300 rows, not the table
        out = torch.addmm(bias, a, b)                # cuBLASLt's bias epilogue: one write of the output
        view = out.t()                               # a view: nothing moved
        del picked
    gather, mm = tracer.trace.ops[0], tracer.trace.ops[1]
    assert (gather.name, gather.gathered, gather.table, gather.read) == ("index_select", 300 * 64 * 4, 1000 * 64 * 4,
                                                                         300 * 8)
    assert mm.flops == 2 * 128 * 64 * 32 and mm.written == 128 * 32 * 4
    assert mm.read == (128 * 64 + 64 * 32 + 32) * 4
    assert len(tracer.trace.ops) == 2 and view.shape == (32, 128)
    # The table was live from the start; the gathered rows (freed) and the matmul's output peaked on top.
    assert tracer.trace.peak == (1000 * 64 + 300 * 64 + 128 * 32) * 4
    assert tracer.trace.live == (1000 * 64 + 128 * 32) * 4


def test_meta_autocast_casts_as_cuda_autocast():
    w = torch.nn.Parameter(torch.empty(16, 8, device="meta"))
    x = torch.empty(4, 16, device="meta")
    with MetaAutocast(torch.bfloat16):
        y = x @ w
        z = torch.mm(x, w)
        s = y.pow(2).sum()
        kept = y + 1  # not on either list: stays bf16
    assert y.dtype == z.dtype == kept.dtype == torch.bfloat16 and s.dtype == torch.float32


def test_cost_model_table_at_small_sizes(tmp_path, capsys):
    out = tmp_path / "rows.json"
    model = gpu_model()
    rows = model.main(["--shape", "small", "--top", "3", "--json", str(out)])
    printed = capsys.readouterr().out
    assert json.loads(out.read_text()) == json.loads(json.dumps(rows))
    assert {r["arch"] for r in rows} == set(model.modeled_architectures()) >= {
        "topk", "batchtopk", "matryoshka", "standard", "jumprelu", "gated"}
    for r in rows:
        assert r["syncs"] == 0, r  # the CUDA path queues its work without a host read
        assert r["modeled_ms"] >= r["floor_ms"] > 0, r  # no step beats its floor
        assert r["launches"] > 0 and r["peak_gb"] > 0 and len(r["top"]) == 3
        assert f"| {r['arch']} | {r['kernels']} |" in printed
    kernels = {r["arch"]: r["kernels"] for r in rows}
    assert kernels["topk"] == "fused" and kernels["standard"] == "plain"
    # The dense step has at least its five matmuls (2 runs of 256 x 64 x 512), the fused TopK step one.
    one = 2 * 2 * 256 * 64 * 512
    tflop = {r["arch"]: r["tflop"] * 1e12 for r in rows if r["dead"] in (None, 0.1)}
    assert tflop["standard"] >= 5 * one and one <= tflop["topk"] < 2 * one


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka", "standard", "jumprelu", "gated"])
def test_memory_plan_is_the_real_steps_peak(arch):
    """trainer.memory's plan (the step replayed on the meta device) against the same step run for real on
    the CPU, its live storages counted the same way: within 10%."""
    from tests.builders import sparse_batches
    from trainer.memory import stack_bytes
    from trainer.registry import get_architecture
    from trainer.train import LoopConfig, StackTrainer

    cls = get_architecture(arch)
    fields = {f.name for f in dataclasses.fields(cls.config_class)}
    cfgs = [cls.config_class(d_in=32, d_sae=256, seed=s, **({"k": 4} if "k" in fields else {})) for s in range(2)]
    held, planned = stack_bytes(arch, cfgs, 512, "fp32", "cpu")
    model = cls(cfgs)
    if hasattr(model, "tokens_since_fired"):  # the plan makes room for AuxK over 10% of the latents dead
        with torch.no_grad():
            model.tokens_since_fired[:, :26] = 10**9
            model.b_enc[:, :26] = -100.0  # and they stay dead
    trainer = StackTrainer(model, LoopConfig(lr=1e-3, total_steps=1000))
    x = sparse_batches(2, 512, d=32)
    previous = trainer.train_step(x[0])
    tracer = StepTracer()
    tracer.hold([*model.parameters(), *model.buffers(), *trainer.opt.exp_avg.values(),
                 *trainer.opt.exp_avg_sq.values(), *[v for v in previous.values() if isinstance(v, torch.Tensor)], x[1]])
    with tracer:
        trainer.train_step(x[1])
    assert held < planned
    assert abs(planned - tracer.trace.peak) <= 0.1 * tracer.trace.peak, (planned, tracer.trace.peak)


def test_train_refuses_a_run_that_cannot_fit_with_the_numbers(tmp_path):
    from pipeline.errors import PipelineError
    from tests.builders import sparse_cache
    from trainer.run import TrainConfig, run_train

    sparse_cache(tmp_path / "c", rows=2000)
    with pytest.raises(PipelineError, match=r"this run needs about [0-9.]+ GiB on cpu \(d_sae 100000000, batch 256\) "
                                            r"but [0-9.]+ GiB is free; lower --d-sae or --batch-size"):
        run_train(TrainConfig(cache=str(tmp_path / "c"), out=str(tmp_path / "r"), d_sae=100_000_000, k=4,
                              batch_size=256, tokens=2560, wandb=False))


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka"])
def test_auxk_adds_no_op_without_dead_latents(arch):
    """The replayed step with no latent near dead dispatches exactly the ops of the same step with AuxK
    switched off (its dead window past any run); with 10% dead, AuxK's ops come on top, no host sync."""
    mod = gpu_model()
    shape = mod.SHAPES["small"]

    def ops(dead: float, window: int | None = None) -> list[str]:
        model = mod.build(arch, shape)
        if window is not None:
            model = type(model)([dataclasses.replace(c, dead_tokens_threshold=window) for c in model.cfgs])
            model = model.to("meta")
        trace = replay_step(model, LoopConfig(lr=1e-3, total_steps=1000), shape.batch, "bf16", assume_dead(dead))
        assert trace.syncs == []
        return [o.name for o in trace.ops]

    none_dead, auxk_off, some_dead = ops(0.0), ops(0.0, 10**12), ops(0.1)
    assert none_dead == auxk_off
    assert len(some_dead) > len(none_dead) and some_dead.count("bmm") > none_dead.count("bmm")


def test_the_host_view_of_dead_latents_survives_a_move_but_not_a_write():
    """A new stack skips AuxK without reading the device, also after .to(); after a write to the counts
    (a load, a test) the host reads them again once (a CPU at once), so a resumed run decides as an
    unbroken one."""
    from trainer.sae_topk import TopKConfig, TopKSAE

    model = TopKSAE([TopKConfig(d_in=8, d_sae=64, k=2, dead_tokens_threshold=100)]).to(torch.float64)
    assert model.dead_bound() == 0
    with torch.no_grad():
        model.tokens_since_fired[:, :5] = 1000
    assert model.dead_bound() == 5  # read again: the exact count
    model.after_step({"fired": torch.zeros(1, 64, dtype=torch.float64)}, 10)
    assert model.dead_bound() == 5  # the CPU's view is never late: the exact count
    with torch.no_grad():
        model.tokens_since_fired[:, 5:9] = 1000
    assert model.dead_bound() == 9
