"""What a run leaves for others: W&B records of what was trained, files others can read."""

from __future__ import annotations

import json
import os
import shutil
import stat

import pytest
import torch

from pipeline.manifest import manifest_hash, read_manifest
from pipeline.writer import ActivationBlock, CacheWriter, WriterConfig

TOPK_ONLY = {"k", "initial_k", "k_anneal_steps"}
L1_ONLY = {"l1", "l1_warmup_steps"}


def model_cache(path, rows=6000, eval_rows=1000, d=32):
    """Sparse rows (as tests.test_train_loop.sparse_cache) in a cache whose provenance names a model."""
    g = torch.Generator().manual_seed(0)
    dirs = torch.nn.functional.normalize(torch.randn(48, d, generator=g), dim=1)
    w = CacheWriter(path, {"x": d}, WriterConfig(shard_mb=0.5), provenance={"model": {"name": "toy-lm"}})
    for start in range(0, rows + eval_rows, 1000):
        idx = torch.rand(1000, 48, generator=g).argsort(dim=1)[:, :3]
        coef = torch.zeros(1000, 48).scatter_(1, idx, torch.rand(1000, 3, generator=g) + 0.5)
        w.put(ActivationBlock({"x": coef @ dirs + 3.0}, split="train" if start < rows else "eval"))
    w.close()
    return path


class FakeRun:
    """What a W&B run is sent: its init arguments, the logged steps, the summary."""

    def __init__(self, **kwargs):
        self.kwargs, self.logged, self.summary, self.finished = kwargs, [], {}, False

    @property
    def config(self) -> dict:
        return self.kwargs["config"]

    def log(self, data: dict, step: int) -> None:
        self.logged.append((step, data))

    def finish(self) -> None:
        self.finished = True


@pytest.fixture
def fake_wandb(monkeypatch):
    wandb = pytest.importorskip("wandb")
    runs: list[FakeRun] = []

    def init(**kwargs):
        runs.append(FakeRun(**kwargs))
        return runs[-1]

    monkeypatch.setattr(wandb, "init", init)
    return runs


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return model_cache(tmp_path_factory.mktemp("records") / "c")


def test_wandb_records_what_a_run_trained(cache, tmp_path, fake_wandb):
    from trainer.run import TrainConfig, run_train

    run_train(TrainConfig(cache=str(cache), out=str(tmp_path), d_sae=64, k=4, batch_size=256, tokens=256 * 12,
                          log_every=5, wandb=True, device="cpu"))
    (run,) = fake_wandb
    cfg = run.config
    assert cfg["hook"] == "x" and cfg["d_in"] == 32 and cfg["model_name"] == "toy-lm"  # hook defaulted: named
    assert cfg["cache"] == str(cache) and cfg["cache_manifest_hash"] == manifest_hash(read_manifest(cache))
    assert cfg["k"] == 4 and cfg["d_sae"] == 64 and not (L1_ONLY | {"l0", "hook_out"}) & set(cfg)
    assert [s for s, _ in run.logged] == [5, 10, 12] and run.finished  # the last step too


def test_wandb_in_a_sweep_records_each_runs_own_fields_to_the_last_step(cache, tmp_path, fake_wandb):
    from trainer.sweep import run_sweep

    spec = {"base": {"cache": str(cache), "out": str(tmp_path / "sw"), "d_sae": 64, "batch_size": 256,
                     "tokens": 256 * 24, "log_every": 10, "wandb": True, "device": "cpu"},
            "sweep": {"arch": ["topk", "standard"], "k": [4], "l1": [1.0]}}
    run_sweep(spec, {}, name="t")
    by_name = {r.kwargs["name"]: r for r in fake_wandb}
    assert set(by_name) == {"topk-d64-k4", "standard-d64-l1_1"}
    topk, standard = by_name["topk-d64-k4"].config, by_name["standard-d64-l1_1"].config
    assert topk["k"] == 4 and not (L1_ONLY | {"l0"}) & set(topk)
    assert standard["l1"] == 1.0 and not (TOPK_ONLY | {"l0"}) & set(standard)
    for cfg in (topk, standard):
        assert cfg["hook"] == "x" and cfg["d_in"] == 32 and cfg["model_name"] == "toy-lm"
        assert cfg["cache_manifest_hash"] == manifest_hash(read_manifest(cache))
    for run in fake_wandb:  # 24 steps logged every 10: the 24th is logged as well
        assert [s for s, _ in run.logged] == [10, 20, 24] and run.kwargs["group"] == "t"
    lines = (tmp_path / "sw" / "topk-d64-k4" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [10, 20, 24]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_safetensors_and_json_respect_the_umask(tmp_path, umask):
    """safetensors writes through a 0600 temporary file: exports and checkpoints must get the mode
    any new file gets (0644 under the usual umask), so colleagues can read them."""
    from trainer.checkpoint import save_checkpoint
    from trainer.export import export_saelens
    from trainer.sae_topk import TopKConfig, TopKSAE
    from trainer.train import LoopConfig, StackTrainer

    old = os.umask(umask)
    try:
        model = TopKSAE([TopKConfig(d_in=8, d_sae=16, k=2)])
        out = export_saelens(model, 0, tmp_path / "sae", {"hook_name": "x"}, sparsity=torch.zeros(16))
        trainer = StackTrainer(model, LoopConfig())
        ckpt = save_checkpoint(tmp_path / "run", {"": (model, trainer.opt)}, {"step": 0})
    finally:
        os.umask(old)
    files = [out / "sae_weights.safetensors", out / "sparsity.safetensors", out / "cfg.json",
             ckpt / "model.safetensors", ckpt / "optimizer.safetensors", ckpt / "state.json"]
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f


def test_a_kill_between_the_checkpoint_renames_resumes_from_the_previous_one(tmp_path):
    """save_checkpoint moves the last checkpoint to checkpoint.old before renaming the new one in: a
    kill between the two renames leaves only .old, which a resume must find (nothing is lost)."""
    from trainer.checkpoint import load_checkpoint, save_checkpoint
    from trainer.sae_topk import TopKConfig, TopKSAE
    from trainer.train import LoopConfig, StackTrainer

    model = TopKSAE([TopKConfig(d_in=8, d_sae=16, k=2)])
    trainer = StackTrainer(model, LoopConfig())
    ckpt = save_checkpoint(tmp_path / "run", {"": (model, trainer.opt)}, {"step": 7, "config": {}})
    ckpt.rename(ckpt.with_name(ckpt.name + ".old"))  # the state right after the first rename
    saved = model.W_dec.detach().clone()
    with torch.no_grad():
        model.W_dec.zero_()
    state = load_checkpoint(tmp_path / "run", {"": (model, trainer.opt)}, {})
    assert state["step"] == 7 and torch.equal(model.W_dec, saved)
    assert ckpt.is_dir() and not ckpt.with_name(ckpt.name + ".old").exists()  # named back
    shutil.rmtree(tmp_path / "run")
    assert load_checkpoint(tmp_path / "run", {"": (model, trainer.opt)}, {}) is None


def test_training_on_an_interrupted_cache_says_so(tmp_path, capsys):
    """A cache whose writer stopped (complete: false) trains on what was committed, with one line
    saying how many rows that is and how to finish the cache."""
    from tests.builders import sparse_cache
    from trainer.run import TrainConfig, run_train

    sparse_cache(tmp_path / "c", rows=4000, eval_rows=1000)
    base = dict(cache=str(tmp_path / "c"), out=str(tmp_path / "runs"), arch="topk", d_sae=64, k=4, tokens=2048,
                batch_size=256, wandb=False, checkpoint_every=0)
    run_train(TrainConfig(**base, name="complete"))
    assert "incomplete" not in capsys.readouterr().out
    m = read_manifest(tmp_path / "c")
    (tmp_path / "c" / "manifest.json").write_text(json.dumps({**m, "complete": False}))
    run_train(TrainConfig(**base, name="partial"))
    out = capsys.readouterr().out
    assert f"cache {tmp_path / 'c'} is incomplete" in out and "the 4,000 train rows committed so far" in out
    assert "`pipeline cache ... --resume`" in out
