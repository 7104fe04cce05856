"""The prepared GPU benchmark runs end to end: its --smoke mode (tiny sizes, CPU) in CI, so the code a
lent GPU runs in its few minutes cannot rot between the sessions that have one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_suite_smoke(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_suite.json").read_text())
    errors = {k: v["error"] for k, v in results.items() if isinstance(v, dict) and "error" in v}
    assert not errors, errors
    assert {"env", "peak", "step", "loader", "sweep", "saelens", "writer"} <= set(results)
    rows = results["step"]["rows"]
    measured = [r for r in rows if "step_ms" in r]
    # Every architecture, both kernels where both exist, both smoke precisions; the fused dense
    # kernels in bf16 are reported as not applicable rather than measured.
    assert {r["arch"] for r in measured} >= {"topk", "batchtopk", "matryoshka", "standard", "jumprelu", "gated"}
    assert all(r["step_ms"] > 0 and r["ratio"] > 0 and r["tokens_per_s"] > 0 for r in measured)
    assert {(r["arch"], r["precision"]) for r in rows if "n/a" in r} == {
        (a, "bf16") for a in ("standard", "jumprelu", "gated")}
    assert sum(r["auto"] for r in measured) == 12  # one auto path per architecture and precision
    assert all(r["ours_over_saelens"] > 0 for r in results["saelens"]["rows"])
    assert results["loader"]["loader_gbs"] > 0 and results["loader"]["train_cache_over_memory"] > 0
    assert results["sweep"]["speedup"] > 0
    assert all(r["ratio"] > 0 for r in results["writer"]["rows"])
    table = (tmp_path / "gpu_suite.md").read_text()
    assert "| topk | 16 | 64 | bf16 | fused |" in table and "ours / SAELens" in table
    assert not (tmp_path / "suite_cache").exists()  # its scratch cache is removed
