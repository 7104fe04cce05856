"""Target L0: k for the TopK family, a closed-loop coefficient for the penalty-based architectures."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from pipeline.errors import PipelineError
from tests.builders import sparse_batches, sparse_cache
from trainer.registry import get_architecture
from trainer.run import TrainConfig, controlled_target, evaluate, run_config
from trainer.sae_standard import StandardConfig, StandardSAE
from trainer.sweep import plan_sweep, run_sweep
from trainer.target_l0 import TargetL0, final_coefficients, make_controller
from trainer.train import LoopConfig, train_stack

TARGETS = [3.0, 6.0, 12.0]


def _stack(arch: str, d_out: int | None = None):
    cls = get_architecture(arch)
    extra = {"d_out": d_out} if d_out else {}
    return cls([cls.config_class(d_in=32, d_sae=128, seed=s, **extra) for s in range(len(TARGETS))])


@pytest.mark.parametrize("arch", ["standard", "gated", "jumprelu", "standard-transcoder"])
def test_each_run_of_a_stack_reaches_its_own_target(arch):
    """600 steps of 256 rows from the architecture's default coefficient: every run of the stack ends
    within 10% of its own target on held-out rows, and logs the coefficient its controller moves."""
    transcoder = arch.endswith("-transcoder")
    data = sparse_batches(608, 256)
    if transcoder:  # reconstruct a fixed linear map of the input (another hook's stand-in)
        M = torch.randn(32, 24, generator=torch.Generator().manual_seed(3)) / 32**0.5
        data = [(x, x @ M) for x in data]
    train, held = data[:600], data[600:]
    model = _stack(arch.removesuffix("-transcoder"), d_out=24 if transcoder else None)
    lines: list[dict] = []
    loop = LoopConfig(lr=3e-3, lr_warmup_steps=20, lr_decay="cosine", total_steps=600, log_every=50,
                      target_l0=TARGETS)
    train_stack(model, train, loop, log=lines.append)
    l0 = evaluate(model, held)[0]["eval_l0"]
    assert l0 == pytest.approx(TARGETS, rel=0.1), l0
    name = "l0_coefficient" if arch == "jumprelu" else "l1_coefficient"
    logged = lines[-1][name]
    assert logged == pytest.approx(getattr(model, name).tolist()) and len(set(logged)) == 3
    assert logged[0] > logged[1] > logged[2]  # a sparser target needs a larger penalty
    assert final_coefficients(model, 1) == {name: pytest.approx(logged[1])}


def test_runs_without_a_target_and_frozen_runs_keep_their_coefficient():
    model = StandardSAE([StandardConfig(d_in=32, d_sae=64, l1_coefficient=c, seed=s) for s, c in enumerate((1., 2.))])
    ctl = make_controller(model, [None, 4.0])
    out = {"l0": torch.tensor([30.0, 30.0])}
    ctl.update(out, 256, torch.tensor([1.0, 1.0]))
    assert model.l1_coefficient[0] == 1.0 and model.l1_coefficient[1] > 2.0  # too dense: more penalty
    before = model.l1_coefficient.clone()
    ctl.update(out, 256, torch.tensor([1.0, 0.0]))  # run 1 frozen (done or failed): lr factor 0
    assert torch.equal(model.l1_coefficient, before)
    assert make_controller(model, None) is None and make_controller(model, [None, None]) is None
    with pytest.raises(PipelineError, match="target_l0 must be positive"):
        make_controller(model, [1.0, -2.0])
    topk = get_architecture("topk")([get_architecture("topk").config_class(d_in=8, d_sae=16, k=2)])
    with pytest.raises(PipelineError, match="no sparsity coefficient .* set its k instead"):
        TargetL0(topk, [4.0])


def test_jumprelu_looks_ahead_in_proportion_to_how_fast_its_thresholds_move():
    """JumpReLU's L0 follows its coefficient at the speed its thresholds move, lr x threshold_rate: a
    run 3x faster than the look-ahead was tuned at (lr 1e-3 x rate 20) looks 3x fewer steps ahead
    (clamped to 1/10-10x); an L1 penalty's look-ahead does not move."""
    jr = _stack("jumprelu")
    ctl = make_controller(jr, 4.0, lrs=torch.tensor([1e-3, 3e-3, 1e-6], dtype=torch.float64))
    assert ctl.damping.tolist() == pytest.approx([50.0, 50.0 / 3, 500.0])
    jr.threshold_rate.copy_(torch.tensor([10.0, 20.0, 40.0]))
    ctl = make_controller(jr, 4.0, lrs=torch.tensor([1e-3, 1e-3, 1e-3]))
    assert ctl.damping.tolist() == pytest.approx([100.0, 50.0, 25.0])
    assert make_controller(jr, 4.0).damping.tolist() == [50.0] * 3  # no lrs given: as configured
    std = _stack("standard")
    assert make_controller(std, 4.0, lrs=torch.tensor([1e-3, 3e-3, 1e-2])).damping.tolist() == [40.0] * 3


def test_target_sets_k_for_the_topk_family_and_names_runs():
    for arch in ("topk", "batchtopk", "matryoshka"):
        cfg = TrainConfig(arch=arch, target_l0=16, d_sae=256)
        assert run_config(cfg, 32).k == 16 and controlled_target(cfg) is None
        assert cfg.run_name() == f"{arch}-d256-k16"
    with pytest.raises(PipelineError, match="target_l0 sets k for topk: give a whole number, got 16.5"):
        run_config(TrainConfig(arch="topk", target_l0=16.5), 32)
    std = TrainConfig(arch="standard", target_l0=16, l1=3.0)
    assert controlled_target(std) == 16.0 and run_config(std, 32).l1_coefficient == 3.0  # where it starts
    assert std.run_name() == "standard-d1024-l0target16"
    with pytest.raises(PipelineError, match="--target-l0 must be a number > 0"):
        TrainConfig(target_l0=0)
    # A sweep over targets: every architecture at each L0; TopK runs of different k are stacked apart,
    # the standard runs (one coefficient each) form one stack.
    plan = plan_sweep({"base": {"d_sae": 64}, "sweep": {"arch": ["topk", "standard"], "target_l0": [4, 8]}}, {},
                      "t", {"h": 16})
    assert [[plan.runs[i].name for i in idx] for idx in plan.stacks] == [
        ["topk-l0target4"], ["topk-l0target8"], ["standard-l0target4", "standard-l0target8"]]
    assert [plan.runs[i].k for i in plan.stacks[1]] == [8]


@pytest.mark.slow  # a whole sweep twice, or a real training process
def test_sweep_over_target_l0_records_the_coefficients(tmp_path):
    sparse_cache(tmp_path / "c", rows=8000, eval_rows=2000)
    spec = {"base": {"cache": str(tmp_path / "c"), "out": str(tmp_path / "out"), "d_sae": 64, "batch_size": 256,
                     "tokens": 256 * 600, "log_every": 100, "checkpoint_every": 0, "wandb": False, "lr": 3e-3,
                     "lr_warmup_steps": 20},
            "sweep": {"arch": ["standard", "topk"], "target_l0": [3, 6]}}
    rows = {r["run"]: r for r in run_sweep(spec, {}, name="t")}
    assert set(rows) == {"topk-l0target3", "topk-l0target6", "standard-l0target3", "standard-l0target6"}
    for name, r in rows.items():
        assert r["status"] == "ok" and r["l0"] == pytest.approx(r["target_l0"], rel=0.1), r
    with open(tmp_path / "out" / "summary.csv") as f:
        table = {t["run"]: t for t in csv.DictReader(f)}
    for name in ("standard-l0target3", "standard-l0target6"):
        summary = json.loads((tmp_path / "out" / name / "summary.json").read_text())
        meta = json.loads((tmp_path / "out" / name / "cfg.json").read_text())["metadata"]
        assert meta["l1_coefficient"] == summary["l1_coefficient"] == pytest.approx(
            float(table[name]["k_or_coefficient"]))
        assert meta["training_config"]["target_l0"] == float(table[name]["target_l0"])
    assert float(table["standard-l0target3"]["k_or_coefficient"]) > float(table["standard-l0target6"]["k_or_coefficient"])
    # Each run's metrics lines carry its own coefficient (None for a TopK run, logged after the stack that has one).
    for name, expect in (("standard-l0target3", float), ("topk-l0target3", type(None))):
        last = json.loads((tmp_path / "out" / name / "metrics.jsonl").read_text().splitlines()[-1])
        assert isinstance(last["l1_coefficient"], expect), last
    assert table["topk-l0target6"]["k_or_coefficient"] == "6"
