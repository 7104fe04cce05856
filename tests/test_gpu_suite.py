"""The prepared GPU benchmark runs end to end: its --smoke mode (tiny sizes, CPU) in CI, so the code a
lent GPU runs in its few minutes cannot rot between the sessions that have one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_suite  # noqa: E402
from trainer.registry import get_architecture  # noqa: E402


def run_suite(out: Path, scratch: Path, *args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    scratch.mkdir()
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--smoke", "--out", str(out),
                           "--scratch", str(scratch), *args], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # Scratch data went to a temporary directory, removed at the end; nothing but the report in --out.
    assert not any(scratch.glob("gpu_suite_*"))
    assert sorted(p.name for p in out.iterdir()) == ["gpu_suite.json", "gpu_suite.md"]
    results = json.loads((out / "gpu_suite.json").read_text())
    errors = {k: v["error"] for k, v in results.items() if isinstance(v, dict) and "error" in v}
    assert not errors, errors
    return results


@pytest.mark.slow
def test_gpu_suite_smoke(tmp_path):
    results = run_suite(tmp_path / "out", tmp_path / "scratch")
    assert {"env", "peak", "step", "loader", "sweep", "saelens", "writer"} <= set(results)
    rows = results["step"]["rows"]
    assert not [r for r in rows if "skipped" in r]
    measured = [r for r in rows if "step_ms" in r]
    # Every architecture, both kernels where both exist, both smoke precisions; the fused dense
    # kernels in bf16 are reported as not applicable rather than measured.
    assert {r["arch"] for r in measured} >= {"topk", "batchtopk", "matryoshka", "standard", "jumprelu", "gated"}
    assert all(r["step_ms"] > 0 and r["ratio"] > 0 and r["tokens_per_s"] > 0 for r in measured)
    assert {(r["arch"], r["precision"]) for r in rows if "n/a" in r} == {
        (a, "bf16") for a in ("standard", "jumprelu", "gated")}
    # The TopK family with 10% of its latents dead on both paths, and with none on the auto path.
    family = ("topk", "batchtopk", "matryoshka")
    assert {(r["arch"], r["precision"], r["kernels"], r["dead"]) for r in measured if r["arch"] in family} == {
        (a, p, k, d) for a in family for p in ("bf16", "fp32") for k, d in
        (("fused", gpu_suite.DEAD), ("fused", 0.0), ("plain", gpu_suite.DEAD))}
    assert all(r["dead"] is None for r in measured if r["arch"] not in family)
    # One auto path per architecture and precision (the TopK family's twice: with and without dead).
    assert sum(r["auto"] for r in measured) == 12 + 6
    # The cost model's time of every step; measured / modeled and the model's matmul FLOPs where it
    # replays the same path (the smoke's CPU takes the fused dense kernels in fp32, CUDA does not).
    assert all(r["modeled_ms"] > 0 and r["floor_ms"] > 0 and r["modeled_kernels"] in ("fused", "plain")
               for r in measured)
    same = [r for r in measured if r["modeled_kernels"] == r["kernels"]]
    assert {r["arch"] for r in same} >= {"topk", "batchtopk", "matryoshka", "standard", "jumprelu", "gated"}
    assert all(r["measured_over_modeled"] > 0 and r["flops_from"] == "model" for r in same)
    assert all("measured_over_modeled" not in r for r in measured if r not in same)
    assert all(r["matmul_tflop"] > 0 and r["frac_bf16_peak"] >= 0 for r in measured)
    assert results["meta"]["model_gpu"] == "h100"
    assert all(r["ours_over_saelens"] > 0 for r in results["saelens"]["rows"])
    assert results["loader"]["loader_gbs"] > 0 and results["loader"]["train_cache_over_memory"] > 0
    assert results["sweep"]["speedup"] > 0
    assert all(r["ratio"] > 0 for r in results["writer"]["rows"])
    table = (tmp_path / "out" / "gpu_suite.md").read_text()
    assert "| topk | 16 | 64 | bf16 | fused | 10% | True |" in table and "| topk | 16 | 64 | bf16 | fused | 0% | True |" in table
    assert "measured / modeled" in table and "ours / SAELens" in table


@pytest.mark.slow  # the suite's script as a process
def test_gpu_suite_budget_skips_with_reasons(tmp_path):
    """With no time left every item of every section is skipped, saying why, and nothing fails."""
    results = run_suite(tmp_path / "out", tmp_path / "scratch", "--budget-s", "0",
                        "--sections", "peak,step,loader,sweep,saelens,writer")
    budget = "time budget"
    assert set(results["peak"]["skipped"]) == {"matmul_bf16", "matmul_tf32", "matmul_fp32", "copies"}
    rows = results["step"]["rows"]
    assert len(rows) == 2 * (6 * 2 + 3) and all(r["skipped"].startswith(budget) for r in rows)
    assert set(results["loader"]["skipped"]) == {"cache", "raw_read", "loader", "train"}
    assert results["loader"]["skipped"]["cache"].startswith(budget)
    assert set(results["sweep"]["skipped"]) == {"cache", "warmup", "stacked", "one_by_one"}
    assert all(r["skipped"].startswith(budget) for r in results["saelens"]["rows"] + results["writer"]["rows"])
    assert len(results["saelens"]["rows"]) == 6 and len(results["writer"]["rows"]) == 2
    table = (tmp_path / "out" / "gpu_suite.md").read_text()
    assert "skipped: time budget" in table and "loader: cache skipped: time budget" in table


def test_models_built_on_the_device_match_the_trainers_init():
    """build_sae draws the same init on the weights' own device (here the CPU: the same values as
    trainer.init's host draw), and mark_dead leaves the latents it marks dead and the rest alive."""
    cls = get_architecture("topk")
    ref = cls([cls.config_class(d_in=8, d_sae=32, k=4, seed=r) for r in range(2)])
    model = gpu_suite.build_sae("topk", 8, 32, "cpu", runs=2, k=4)
    for name, value in ref.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    gpu_suite.mark_dead(model, 0.25)
    assert model.dead_mask().sum(dim=1).tolist() == [8, 8]
    assert (model.b_enc[model.dead_mask()] == gpu_suite.DEAD_BIAS).all()
    assert (model.b_enc[~model.dead_mask()] == 0).all()
