"""The training loop on a real cache through the loader, and an export SAELens loads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.loader import ActivationLoader
from pipeline.writer import ActivationBlock, CacheWriter, WriterConfig
from trainer.sae_standard import StandardConfig, StandardSAE
from trainer.sae_topk import TopKConfig, TopKSAE
from trainer.export import export_saelens
from trainer.train import LoopConfig, lr_factor, train_stack


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def sparse_cache(path, rows=20_000, d=32, n_feat=64, k=3, seed=0):
    """Rows are sparse non-negative combinations of unit directions, plus an offset (a large mean)."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(n_feat, d, generator=g), dim=1)
    w = CacheWriter(path, {"x": d}, WriterConfig(shard_mb=0.5))
    for start in range(0, rows, 2000):
        idx = torch.rand(2000, n_feat, generator=g).argsort(dim=1)[:, :k]
        coef = torch.zeros(2000, n_feat).scatter_(1, idx, torch.rand(2000, k, generator=g) + 0.5)
        w.put(ActivationBlock({"x": coef @ dirs + 3.0}))
    w.close()


def test_topk_trains_on_a_cache_and_logs(tmp_path):
    sparse_cache(tmp_path / "c")
    loader = ActivationLoader(tmp_path / "c", batch_size=256, tokens=256 * 400)
    model = TopKSAE([TopKConfig(d_in=32, d_sae=128, k=3, seed=0), TopKConfig(d_in=32, d_sae=128, k=6, seed=1)])
    cfg = LoopConfig(lr=3e-3, lr_warmup_steps=20, lr_decay="cosine", total_steps=400, log_every=100,
                     metrics_path=str(tmp_path / "metrics.jsonl"))
    last = train_stack(model, loader, cfg, log=None)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [100, 200, 300, 400]
    assert last["l0"] == pytest.approx([3.0, 6.0])
    assert min(last["explained_variance"]) > 0.8, last["explained_variance"]
    assert lines[-1]["mse"][0] < lines[0]["mse"][0]


def test_standard_l1_lowers_l0(tmp_path):
    sparse_cache(tmp_path / "c")
    loader = ActivationLoader(tmp_path / "c", batch_size=256, tokens=256 * 300)
    model = StandardSAE([StandardConfig(d_in=32, d_sae=128, l1_coefficient=c, l1_warmup_steps=50, seed=0)
                         for c in (0.01, 1.0)])
    last = train_stack(model, loader, LoopConfig(lr=3e-3, total_steps=300, log_every=300), log=None)
    assert last["l0"][1] < last["l0"][0]  # a larger L1 coefficient buys a sparser code
    assert last["explained_variance"][0] > 0.8


def test_lr_schedules():
    cfg = LoopConfig(lr_warmup_steps=10, total_steps=100, lr_decay="linear")
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(50, cfg) == 1.0
    assert lr_factor(90, cfg) == pytest.approx(0.5) and lr_factor(100, cfg) == 0.0
    cos = LoopConfig(total_steps=100, lr_decay="cosine")
    assert lr_factor(0, cos) == pytest.approx(1.0) and lr_factor(100, cos) == pytest.approx(0.1)


@pytest.mark.parametrize("arch", ["topk", "standard"])
def test_export_loads_in_saelens(tmp_path, arch):
    sae_lens = pytest.importorskip("sae_lens")
    if arch == "topk":
        model = TopKSAE([TopKConfig(d_in=16, d_sae=48, k=5, seed=3)])
    else:
        model = StandardSAE([StandardConfig(d_in=16, d_sae=48, seed=3)])
    with torch.no_grad():
        model.b_dec.normal_()
        model.b_enc.normal_(std=0.1)
    export_saelens(model, 0, tmp_path / "sae", {"hook_name": "x"}, sparsity=torch.full((48,), -2.0))
    sae = sae_lens.SAE.load_from_disk(str(tmp_path / "sae"), device="cpu")
    x = torch.randn(20, 16) + 1.0
    with torch.no_grad():
        ours = model.encode(x)[0]
        theirs = sae.encode(x)
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sae.decode(theirs), model.decode(ours.unsqueeze(0))[0], atol=1e-5, rtol=1e-5)
    assert np.isclose(json.loads((tmp_path / "sae" / "cfg.json").read_text())["d_sae"], 48)


def test_pipeline_train_cli_exports(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sparse_cache(tmp_path / "c")
    (tmp_path / "mine.py").write_text(
        "from trainer.registry import register_architecture\n"
        "from trainer.sae_topk import TopKSAE\n"
        "@register_architecture('mine')\n"
        "class Mine(TopKSAE):\n    pass\n")
    env = {"PYTHONPATH": f"{root}:{tmp_path}", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
           "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "pipeline", "train", "--cache", str(tmp_path / "c"), "--arch", "mine",
                          "--import", "mine", "--d-sae", "128", "--k", "3", "--lr", "3e-3", "--tokens", "60000",
                          "--batch-size", "256", "--out", str(tmp_path / "run"), "--no-wandb"], cwd=root, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "exported to" in out.stdout
    run = tmp_path / "run" / "mine-d128"
    cfg = json.loads((run / "cfg.json").read_text())
    assert cfg["d_in"] == 32 and cfg["d_sae"] == 128 and cfg["metadata"]["hook_name"] == "x"
    assert cfg["metadata"]["cache_manifest_hash"] and cfg["metadata"]["training_architecture"] == "mine"
    args = [sys.executable, "-m", "pipeline", "train", "--cache", str(tmp_path / "c"), "--arch", "mine", "--import",
            "mine", "--d-sae", "128", "--k", "3", "--lr", "3e-3", "--batch-size", "256", "--out", str(tmp_path / "run")]
    again = subprocess.run(args + ["--tokens", "60000"], cwd=root, env=env, capture_output=True, text=True)
    assert again.returncode == 2 and "holds a checkpoint of an earlier run; pass --resume" in again.stderr
    # W&B with no key runs offline: its files land in the run's folder, nothing is sent.
    more = subprocess.run(args + ["--tokens", "90000", "--resume"], cwd=root, env=env,
                          capture_output=True, text=True)
    assert more.returncode == 0, more.stderr[-2000:]
    assert list((run / "wandb").glob("offline-run-*")), sorted(p.name for p in run.iterdir())
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 352 and steps == sorted(steps)  # ceil(90000 / 256): continued, not restarted
    bad = subprocess.run([sys.executable, "-m", "pipeline", "train", "--cache", str(tmp_path / "c"), "--arch", "topkk",
                          "--out", str(tmp_path / "r2")], cwd=root, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown architecture 'topkk'; registered:" in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "pipeline", "train", "--cache", str(tmp_path / "c"), "--k", "500",
                          "--d-sae", "128", "--batch-size", "256", "--out", str(tmp_path / "r3")], cwd=root, env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "k = 500 must be between 1 and d_sae = 128" in bad.stderr


@pytest.mark.parametrize("arch", ["topk", "standard"])
def test_stopped_and_resumed_run_equals_straight_run(tmp_path, arch):
    """A run stopped after 70 of 150 steps and resumed from its checkpoint ends with bit-identical
    weights, optimizer state and dead-latent counters."""
    sparse_cache(tmp_path / "c", rows=8000)

    def make():
        if arch == "topk":
            return TopKSAE([TopKConfig(d_in=32, d_sae=64, k=3, seed=0, dead_tokens_threshold=2000, initial_k=12,
                                       k_anneal_steps=90)])
        return StandardSAE([StandardConfig(d_in=32, d_sae=64, l1_coefficient=0.5, l1_warmup_steps=40)])

    loop = LoopConfig(lr=3e-3, lr_warmup_steps=10, lr_decay="cosine", total_steps=150, log_every=1000)
    conf = {"arch": arch, "lr": 3e-3}

    def loader():  # 150 steps of 256 cross an epoch boundary (8000 rows)
        return ActivationLoader(tmp_path / "c", batch_size=256, tokens=256 * 150, seed=5)

    straight = make()
    train_stack(straight, loader(), loop, log=None, run_dir=tmp_path / "a", config=conf)
    first = make()
    train_stack(first, loader(), loop, log=None, run_dir=tmp_path / "b", max_steps=70, config=conf)
    resumed = make()  # a new process would start from fresh weights: the checkpoint replaces them
    train_stack(resumed, loader(), loop, log=None, run_dir=tmp_path / "b", config=conf)
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    from safetensors.torch import load_file

    oa = load_file(str(tmp_path / "a" / "checkpoint" / "optimizer.safetensors"))
    ob = load_file(str(tmp_path / "b" / "checkpoint" / "optimizer.safetensors"))
    assert oa.keys() == ob.keys() and all(torch.equal(oa[k], ob[k]) for k in oa)
    with pytest.raises(Exception, match=r"checkpoint in .* is from another config \(lr: checkpoint 0.003, now 0.01\)"):
        train_stack(make(), loader(), loop, log=None, run_dir=tmp_path / "b", config={"arch": arch, "lr": 1e-2})


def test_malloc_tuning_applies_on_glibc(monkeypatch):
    import platform

    from pipeline.malloc import tune_malloc

    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("PIPELINE_NO_MALLOC_TUNING", raising=False)
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    assert tune_malloc() is True
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "4294967296")
    assert tune_malloc() is False  # the user's own setting wins
