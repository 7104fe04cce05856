"""torch.distributed (gloo, 2 CPU processes): a 2-rank cache, data-parallel training and a sweep
spread over ranks each equal what one process makes."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from pipeline.backends import read_table
from pipeline.manifest import read_manifest
from pipeline.verify import verify_cache
from tests.builders import sparse_cache

REPO = Path(__file__).resolve().parents[1]
WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, fn, args) -> None:
    """What torchrun sets up for a worker, then `fn(*args)`."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    torch.set_num_threads(1)
    try:
        fn(*args)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    # The work is done and checked by the parent from disk: leave without the interpreter's C++
    # teardown, where a worker now and then aborted ("terminate called without an active exception",
    # SIGABRT, 2 of ~40 CI runs) after finishing.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(fn, *args) -> None:
    mp.spawn(_rank_main, args=(free_port(), fn, args), nprocs=WORLD, join=True)


# ----------------------------------------------------------------------------------------- cache

CACHE = dict(model="tiny", context_size=64, batch_size=8, shard_mb=0.05, eval_fraction=0.3)


def documents(path: Path) -> dict:
    """Many short, distinct documents, so both splits get sequences; the cache options for them."""
    rng = np.random.default_rng(0)
    words = "alpha beta gamma delta cache shard rank token layer model sparse dense".split()
    path.mkdir()
    for i in range(120):
        (path / f"doc{i:03d}.txt").write_text(f"doc {i}: " + " ".join(rng.choice(words, 25)) + ".")
    return {**CACHE, "dataset": str(path)}


def _cache_worker(opts: dict, zarr_out: str, arrow_out: str) -> None:
    from cache_writer.run import CacheConfig, run_cache

    # Resume per rank: a short cache, then extended (the ranks' sequence offsets move).
    run_cache(CacheConfig(out=zarr_out, tokens=3000, **opts), progress=False)
    run_cache(CacheConfig(out=zarr_out, tokens=6000, resume=True, **opts), progress=False)
    run_cache(CacheConfig(out=arrow_out, tokens=6000, format="arrow", **opts), progress=False)


def cache_content(path: Path) -> dict:
    """Per split: every row as (its whole context, position) -> (token id, stored values), and the
    multiset of contexts. Contexts name sequences, since the split-wide indices depend on the order."""
    m = read_manifest(path)
    hook = next(iter(m["hooks"]))
    out = {}
    for split, info in m["splits"].items():
        seqs = [np.asarray(read_table(m["backend"], path, f"tokens/{split}/sequences", s["name"], "token_ids"))
                for s in info["shards"]]
        seqs = np.concatenate(seqs) if seqs else np.zeros((0, m["context_size"]), np.int32)
        assert len(seqs) == info["sequences"]
        rows = {}
        for s in info["shards"]:
            cols = {c: np.asarray(read_table(m["backend"], path, f"tokens/{split}/rows", s["name"], c))
                    for c in ("token_id", "sequence", "position")}
            acts = np.asarray(read_table(m["backend"], path, f"hooks/{hook}/{split}", s["name"], hook))
            for tok, seq, pos, a in zip(cols["token_id"], cols["sequence"], cols["position"], acts):
                assert seqs[seq, pos] == tok  # split-wide sequence indices, re-indexed where needed
                key = (seqs[seq].tobytes(), int(pos))
                assert key not in rows, "a row written twice"
                rows[key] = (int(tok), a.tobytes())
        out[split] = (rows, Counter(x.tobytes() for x in seqs))
    return out


@pytest.mark.slow
def test_two_rank_cache_equals_one_rank_cache(tmp_path):
    from cache_writer.run import CacheConfig, run_cache
    from pipeline.loader import ActivationLoader

    opts = documents(tmp_path / "docs")
    spawn(_cache_worker, opts, str(tmp_path / "z2"), str(tmp_path / "a2"))
    one = run_cache(CacheConfig(out=str(tmp_path / "one"), tokens=6000, **opts), progress=False)
    ref = cache_content(tmp_path / "one")
    assert one["splits"]["train"]["rows"] and one["splits"]["eval"]["rows"]
    for name in ("z2", "a2"):
        path = tmp_path / name
        problems, m = verify_cache(path)
        assert problems == [] and m["complete"]
        assert {s: v["rows"] for s, v in m["splits"].items()} == {s: v["rows"] for s, v in one["splits"].items()}
        assert m["progress"]["units"] == one["progress"]["units"]
        assert {s["name"][:9] for s in m["splits"]["train"]["shards"]} == {"rank00000", "rank00001"}
        got = cache_content(path)
        for split in ("train", "eval"):
            assert got[split][1] == ref[split][1], f"{name} {split}: sequences differ"
            assert got[split][0] == ref[split][0], f"{name} {split}: rows differ"
        stats, ref_stats = m["hooks"], one["hooks"]
        for hook in stats:
            assert stats[hook]["stats"]["count"] == ref_stats[hook]["stats"]["count"]
            assert stats[hook]["stats"]["mean_norm"] == pytest.approx(ref_stats[hook]["stats"]["mean_norm"], rel=1e-9)
        loader = ActivationLoader(path, batch_size=256, split="train")
        assert sum(len(b) for b in loader) == m["splits"]["train"]["rows"]
        loader.close()
    # A finished 2-rank cache: resuming with another world size is refused, in one line.
    from pipeline.errors import PipelineError

    with pytest.raises(PipelineError, match="written by several processes"):
        run_cache(CacheConfig(out=str(tmp_path / "z2"), tokens=9000, resume=True, **opts), progress=False)


# ----------------------------------------------------------------------------- data-parallel training

ARCHS = ("topk", "batchtopk", "standard")
STEPS, BATCH, D, D_SAE = 30, 256, 16, 64


def global_batches(n: int = STEPS, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(48, D, generator=g), dim=1)
    out = []
    for _ in range(n):
        idx = torch.rand(BATCH, 48, generator=g).argsort(dim=1)[:, :3]
        coef = torch.zeros(BATCH, 48).scatter_(1, idx, torch.rand(BATCH, 3, generator=g) + 0.5)
        out.append(coef @ dirs + 2.0)
    return out


def build(arch: str):
    from trainer.registry import get_architecture

    cls = get_architecture(arch)
    if arch == "standard":  # the fused ReLU kernel; its firing counts come from the gathered latents
        return cls([cls.config_class(d_in=D, d_sae=D_SAE, l1_coefficient=l1, seed=s) for l1, s in ((0.5, 0), (1.0, 1))])
    # A short dead window: latents die within the run, so AuxK and the dead counts are exercised.
    return cls([cls.config_class(d_in=D, d_sae=D_SAE, k=k, seed=s, dead_tokens_threshold=1024)
                for k, s in ((3, 0), (6, 1))])


def train(arch: str, batches: list[torch.Tensor], ddp=None) -> dict:
    from trainer.train import LoopConfig, train_stack

    model = build(arch)
    cfg = LoopConfig(lr=3e-3, lr_warmup_steps=5, lr_decay="cosine", total_steps=STEPS, log_every=10)
    last = train_stack(model, batches, cfg, log=None, ddp=ddp)
    return {"state": {k: v.clone() for k, v in model.state_dict().items()}, "last": last}


def _ddp_worker(out: str, cache: str) -> None:
    from pipeline import distributed
    from trainer.distributed import DataParallel

    distributed.init("cpu")
    ddp = DataParallel()
    b = BATCH // WORLD
    mine = [x[ddp.rank * b:(ddp.rank + 1) * b] for x in global_batches()]
    results = {arch: train(arch, mine, ddp) for arch in ARCHS}
    if ddp.rank == 0:  # safetensors and JSON, never pickle
        from safetensors.torch import save_file

        save_file({f"{arch}/{name}": t.contiguous() for arch, r in results.items() for name, t in r["state"].items()},
                  f"{out}.safetensors")
        Path(f"{out}.json").write_text(json.dumps({arch: r["last"] for arch, r in results.items()}))
    # End to end: `pipeline train --ddp` on a cache, checkpointed, then extended by --resume.
    from trainer.run import TrainConfig, run_train

    cfg = dict(cache=cache, out=str(Path(out).parent / "runs"), arch="batchtopk", d_sae=D_SAE, k=4, batch_size=256,
               lr_warmup_steps=5, log_every=5, checkpoint_every=5, wandb=False, ddp=True, device="cpu")
    run_train(TrainConfig(tokens=256 * 10, **cfg))
    run_train(TrainConfig(tokens=256 * 16, resume=True, **cfg))


@pytest.mark.slow
def test_data_parallel_equals_one_process_on_the_global_batch(tmp_path):

    sparse_cache(tmp_path / "c", rows=8000, d=D, eval_rows=1000)
    spawn(_ddp_worker, str(tmp_path / "ddp.pt"), str(tmp_path / "c"))
    from safetensors.torch import load_file

    got = {arch: {"state": {}, "last": last} for arch, last in json.loads((tmp_path / "ddp.pt.json").read_text()).items()}
    for key, t in load_file(tmp_path / "ddp.pt.safetensors").items():
        arch, name = key.split("/", 1)
        got[arch]["state"][name] = t
    torch.set_num_threads(1)
    for arch in ARCHS:
        ref = train(arch, global_batches())
        for name, t in ref["state"].items():
            # Tolerance: the ranks' gradients are summed in another order than one batch's, and
            # Adam amplifies such float differences a little over 30 steps.
            if t.dtype.is_floating_point:
                torch.testing.assert_close(got[arch]["state"][name], t, rtol=1e-4, atol=2e-5, msg=f"{arch} {name}")
            else:  # dead-latent counts: exactly the global batch's
                assert torch.equal(got[arch]["state"][name], t), f"{arch} {name}"
        if "tokens_since_fired" in ref["state"]:
            assert bool((ref["state"]["tokens_since_fired"] >= 1024).any()), "no latent died: AuxK untested"
        for key in ("mse", "l0", "dead_fraction"):
            assert got[arch]["last"][key] == pytest.approx(ref["last"][key], rel=1e-3, abs=1e-4), key
    run = tmp_path / "runs" / "batchtopk-d64-k4"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 16 and summary["tokens"] == 256 * 16 and summary["eval_l0"] > 0
    assert (run / "sae_weights.safetensors").exists()
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [5, 10, 15, 16], "rank 0 alone logs, once per step (the resumed run goes on at step 11)"


# ------------------------------------------------------------------------------------------ sweep

SWEEP_TOML = """name = "d"
[base]
cache = "{cache}"
out = "{out}"
d_sae = 64
batch_size = 256
tokens = 5120
log_every = 10
checkpoint_every = 10
lr = 0.003
wandb = false
device = "cpu"
[sweep]
arch = ["topk", "standard"]
k = [3, 6]
l1 = [0.5]
"""


@pytest.mark.slow
def test_two_rank_sweep_produces_the_runs_of_one_rank(tmp_path):
    from safetensors.torch import load_file

    from trainer.sweep import load_sweep_spec, run_sweep

    sparse_cache(tmp_path / "c", rows=6000, eval_rows=1000)
    for which in ("one", "two"):
        (tmp_path / f"{which}.toml").write_text(SWEEP_TOML.format(cache=tmp_path / "c", out=tmp_path / which))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD),
           "--master-port", str(free_port()), "-m", "pipeline", "sweep", "--config", str(tmp_path / "two.toml")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    torch.set_num_threads(1)
    rows = run_sweep(load_sweep_spec(tmp_path / "one.toml"), {}, name="d")
    one = list(csv.DictReader(open(tmp_path / "one" / "summary.csv")))
    two = list(csv.DictReader(open(tmp_path / "two" / "summary.csv")))
    assert [r["run"] for r in two] == [r["run"] for r in one] == [r["run"] for r in rows]
    for a, b in zip(one, two):
        for col in ("l0", "explained_variance", "dead_fraction", "status"):
            assert a[col] == b[col], (a["run"], col)
    for r in one:
        wa = load_file(tmp_path / "one" / r["run"] / "sae_weights.safetensors")
        wb = load_file(tmp_path / "two" / r["run"] / "sae_weights.safetensors")
        for name in wa:
            assert torch.equal(wa[name], wb[name]), (r["run"], name)
    # Each rank checkpointed its own stacks (resume is per rank).
    assert sorted(p.name for p in (tmp_path / "two" / "_sweep").iterdir()) == [
        "rank-00000-of-00002", "rank-00001-of-00002"]
