"""The shuffled, memory-mapped loader: exactly once, determinism, exact resume, ranks, dtypes, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.errors import CacheFormatError, PipelineError
from pipeline.loader import ActivationLoader
from pipeline.writer import ActivationBlock, CacheWriter, WriterConfig
from tests.builders import small_corpus


def id_cache(path, rows: int = 3000, fmt: str = "zarr", dtype: str = "float32", seq_len: int = 50,
             shuffle: bool = False, shard_mb: float = 0.01) -> None:
    """Row i holds [i, sequence of i, 2i, 3i] (exact in bf16 for i < 256 only, so ids use float32);
    hook 'double' is 2 x hook 'id', row for row."""
    w = CacheWriter(path, {"id": 4, "double": 4}, WriterConfig(format=fmt, dtype=dtype, shard_mb=shard_mb,
                                                               shuffle=shuffle))
    for start in range(0, rows, 100):
        i = torch.arange(start, min(start + 100, rows), dtype=torch.float64)
        x = torch.stack([i, torch.div(i, seq_len, rounding_mode="floor"), 2 * i, 3 * i], dim=1).float()
        if dtype == "bfloat16":  # keep values exact in bf16: small integers
            x = torch.remainder(x, 256)
        w.put(ActivationBlock({"id": x, "double": 2 * x}))
    w.close()


def ids(batches) -> list[int]:
    return [int(v) for b in batches for v in (b if torch.is_tensor(b) else b["id"])[:, 0].tolist()]


@pytest.mark.parametrize("resident", ["no", "yes"])
@pytest.mark.parametrize("fmt", ["zarr", "arrow"])
def test_every_row_exactly_once(tmp_path, fmt, resident):
    id_cache(tmp_path / "c", fmt=fmt)
    loader = ActivationLoader(tmp_path / "c", hooks="id", batch_size=64, block_rows=16, buffer_rows=256,
                              resident=resident)
    got = ids(loader)
    assert sorted(got) == list(range(3000))
    assert got != sorted(got)  # shuffled
    assert loader.batches_per_epoch() == 47  # 46 full batches and the epoch's tail of 56 rows


@pytest.mark.parametrize("resident", ["no", "yes"])
def test_ranks_partition_the_epoch(tmp_path, resident):
    id_cache(tmp_path / "c")
    parts = [ids(ActivationLoader(tmp_path / "c", hooks="id", batch_size=32, block_rows=16, buffer_rows=128,
                                  rank=r, world_size=3, resident=resident)) for r in range(3)]
    assert sum(len(p) for p in parts) == 3000
    assert sorted(sum(parts, [])) == list(range(3000))
    assert all(set(a).isdisjoint(b) for i, a in enumerate(parts) for b in parts[i + 1:])


@pytest.mark.parametrize("resident", ["no", "yes"])
def test_deterministic_from_seed_and_epoch(tmp_path, resident):
    id_cache(tmp_path / "c")
    kw = dict(hooks="id", batch_size=64, block_rows=16, buffer_rows=256, resident=resident)
    a = ActivationLoader(tmp_path / "c", seed=3, **kw)
    first, second = ids(a), ids(a)  # two epochs
    assert first == ids(ActivationLoader(tmp_path / "c", seed=3, **kw))
    assert first != second and sorted(second) == list(range(3000))
    assert first != ids(ActivationLoader(tmp_path / "c", seed=4, **kw))


@pytest.mark.parametrize("resident", ["no", "yes"])
@pytest.mark.parametrize("stop_after", [1, 7, 20, 47, 48, 60])  # an epoch has 47 batches: across its end too
def test_exact_resume_mid_epoch(tmp_path, stop_after, resident):
    id_cache(tmp_path / "c")
    kw = dict(hooks=["id", "double"], batch_size=64, block_rows=16, buffer_rows=256, seed=1, tokens=7000,
              resident=resident)
    straight = list(ActivationLoader(tmp_path / "c", **kw))
    first = ActivationLoader(tmp_path / "c", **kw)
    head = []
    for batch in first:
        head.append(batch)
        if len(head) == stop_after:
            break
    state = json.loads(json.dumps(first.state_dict()))  # a checkpoint stores it as JSON
    resumed = ActivationLoader(tmp_path / "c", **kw)
    resumed.load_state_dict(state)
    tail = list(resumed)
    assert len(head) + len(tail) == len(straight)
    for x, y in zip(head + tail, straight):
        torch.testing.assert_close(x["id"], y["id"], rtol=0, atol=0)
        torch.testing.assert_close(x["double"], y["double"], rtol=0, atol=0)
    assert sum(len(b["id"]) for b in straight) == 7000  # the token budget spans epochs


def test_resume_with_other_settings_is_refused(tmp_path):
    id_cache(tmp_path / "c")
    a = ActivationLoader(tmp_path / "c", hooks="id", batch_size=64)
    b = ActivationLoader(tmp_path / "c", hooks="id", batch_size=32)
    with pytest.raises(PipelineError, match="saved with batch_size=64, this loader has 32"):
        b.load_state_dict(a.state_dict())


def test_hooks_aligned_and_dict(tmp_path):
    id_cache(tmp_path / "c")
    for batch in ActivationLoader(tmp_path / "c", batch_size=128):  # hooks=None, two hooks -> dict
        assert set(batch) == {"id", "double"}
        torch.testing.assert_close(batch["double"], 2 * batch["id"])


@pytest.mark.parametrize("resident", ["no", "yes"])
@pytest.mark.parametrize("stored", ["float16", "bfloat16"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_dtypes(tmp_path, stored, out_dtype, resident):
    id_cache(tmp_path / "c", rows=1000, dtype=stored)
    loader = ActivationLoader(tmp_path / "c", hooks="double", batch_size=100, dtype=out_dtype, resident=resident)
    batches = list(loader)
    # Rows travel in the stored dtype (a staging slot, or the resident copy) and are cast after.
    held = loader._resident["double"] if resident == "yes" else loader._slots[0]["double"]
    assert held.dtype == getattr(torch, stored)
    assert all(b.dtype == out_dtype for b in batches)
    got = torch.cat(batches).float()
    i = torch.arange(1000, dtype=torch.float32)
    x = torch.stack([i, torch.div(i, 50, rounding_mode="floor"), 2 * i, 3 * i], 1)
    want = 2 * (torch.remainder(x, 256) if stored == "bfloat16" else x)
    want = want.to(getattr(torch, stored)).to(out_dtype).float()
    assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, want.tolist()))


def test_normalisation_scales_to_sqrt_d(tmp_path):
    id_cache(tmp_path / "c", rows=2000)
    loader = ActivationLoader(tmp_path / "c", hooks="id", batch_size=2000, normalize=True)
    batch = next(iter(loader))
    assert batch.norm(dim=1).mean().item() == pytest.approx(2.0, rel=1e-4)  # sqrt(4)
    assert loader.scale["id"] == pytest.approx(2.0 / ActivationLoader(tmp_path / "c", hooks="id", batch_size=2000)
                                               .source.hook_stats("id")["mean_norm"])


def shuffle_quality(batch_seqs: list[np.ndarray], n_rows_per_seq: int) -> tuple[float, float]:
    """(same-sequence pair rate / uniform's, mean distinct batches per sequence / uniform's)."""
    n_batches = len(batch_seqs)
    all_seqs = np.concatenate(batch_seqs)
    n_seq = len(np.unique(all_seqs))
    pairs = same = 0
    for s in batch_seqs:
        counts = np.bincount(s)
        same += (counts * (counts - 1)).sum()
        pairs += len(s) * (len(s) - 1)
    rate = same / pairs
    uniform_rate = (n_rows_per_seq - 1) / (len(all_seqs) - 1)
    spread = np.mean([len({i for i, s in enumerate(batch_seqs) if q in s}) for q in range(0, n_seq, 7)])
    uniform_spread = n_batches * (1 - (1 - 1 / n_batches) ** n_rows_per_seq)
    del n_seq
    return rate / uniform_rate, spread / uniform_spread


@pytest.mark.parametrize("resident", ["no", "yes"])
def test_shuffle_quality_on_unshuffled_cache(tmp_path, resident):
    """Defaults on a cache written in sequence order (like `--no-shuffle`): 2,000 sequences of 127 rows."""
    id_cache(tmp_path / "c", rows=254_000, seq_len=127, shuffle=False, shard_mb=1)
    batches = [b[:, 1].numpy().astype(np.int64) for b in ActivationLoader(tmp_path / "c", hooks="id",
                                                                          batch_size=4096, resident=resident)]
    pair_factor, spread = shuffle_quality(batches, 127)
    # Stated in the README: same-sequence pairs within 4x of a uniform shuffle's rate, and a
    # sequence's tokens reach at least 40% as many distinct batches as uniformly.
    assert pair_factor < 4.0, pair_factor
    assert spread > 0.4, spread


def test_resident_and_streamed_batches_are_the_same(tmp_path):
    """Both modes follow one plan: the same batches, bit for bit, over two epochs (and a tail)."""
    id_cache(tmp_path / "c", rows=3000)
    kw = dict(hooks=["id", "double"], batch_size=64, block_rows=16, buffer_rows=256, seed=2, tokens=6500)
    streamed = list(ActivationLoader(tmp_path / "c", resident="no", **kw))
    resident = list(ActivationLoader(tmp_path / "c", resident="yes", **kw))
    assert len(streamed) == len(resident) == 102
    for a, b in zip(streamed, resident):
        assert torch.equal(a["id"], b["id"]) and torch.equal(a["double"], b["double"])


def test_resident_budget_refuses_or_streams(tmp_path):
    """`yes` refuses with the numbers when the split does not fit the budget; `auto` streams then."""
    id_cache(tmp_path / "c", rows=3000)  # two hooks x 4 floats x 3000 rows = 96,000 bytes
    with pytest.raises(PipelineError, match=r"needs 0\.00 GiB on cpu .*float32.*budget is 0\.00 GiB.*--resident auto"):
        ActivationLoader(tmp_path / "c", batch_size=64, resident="yes", resident_budget=50_000)
    small = ActivationLoader(tmp_path / "c", batch_size=64, resident="auto", resident_budget=50_000)
    assert small.resident_bytes == 96_000 and not small.resident
    big = ActivationLoader(tmp_path / "c", batch_size=64, resident="auto", resident_budget=100_000)
    assert big.resident
    assert sorted(ids(small)) == sorted(ids(big)) == list(range(3000))
    with pytest.raises(PipelineError, match="resident='maybe'"):
        ActivationLoader(tmp_path / "c", batch_size=64, resident="maybe")


def test_plan_is_arrays_and_scales(tmp_path):
    """An epoch's plan is numpy arrays (no Python object per block): 100M rows in 400 shards plan
    1.56M blocks; every buffer's blocks lie inside their shards and the epoch covers each block once."""
    id_cache(tmp_path / "c", rows=3000)
    loader = ActivationLoader(tmp_path / "c", hooks="id", batch_size=64)
    loader.batch_size, loader.buffer_rows = 4096, 16 * 4096
    loader.shard_rows = np.full(400, 250_000, dtype=np.int64)  # a plan needs row counts only
    loader._first_block = np.concatenate([[0], np.cumsum(-(-loader.shard_rows // 64))])
    order = loader._order(0)
    assert isinstance(order, np.ndarray) and len(order) == 400 * 3907
    plan = loader._plan(0)
    first = next(plan)
    assert isinstance(first.shard, np.ndarray) and len(first.shard) == 1024
    assert bool((first.stop <= loader.shard_rows[first.shard]).all()) and bool((first.start % 64 == 0).all())
    assert first.full_rows == 16 * 4096 and len(first.perm) == 1024 * 64 - int((first.start + 64 > first.stop).sum())
    assert sum(len(b.shard) for b in plan) + 1024 == len(order)


# ----------------------------------------------------------------------------- bad input


def test_not_a_cache(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "file.txt").write_text("hi")
    with pytest.raises(CacheFormatError, match="neither an activation cache of ours .* nor a SAELens"):
        ActivationLoader(tmp_path / "x")


def test_other_format_version(tmp_path):
    id_cache(tmp_path / "c", rows=500)
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    m["format_version"] = 2
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CacheFormatError, match="format version 2"):
        ActivationLoader(tmp_path / "c")


@pytest.mark.parametrize("fmt", ["zarr", "arrow"])
def test_truncated_shard_named(tmp_path, fmt):
    id_cache(tmp_path / "c", rows=1000, fmt=fmt)
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    shard = m["splits"]["train"]["shards"][1]
    rel = max(shard["files"], key=lambda r: shard["files"][r]["bytes"])
    f = tmp_path / "c" / rel
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(CacheFormatError, match="shard-00001.* truncated or corrupt"):
        ActivationLoader(tmp_path / "c", hooks=rel.split("/")[1], batch_size=100)


def test_missing_hook_lists_hooks(tmp_path):
    id_cache(tmp_path / "c", rows=500)
    with pytest.raises(PipelineError, match=r"hook 'blocks.0.hook_resid_post' is not in cache .*; it has: id, double"):
        ActivationLoader(tmp_path / "c", hooks="blocks.0.hook_resid_post")


def test_batch_larger_than_split(tmp_path):
    id_cache(tmp_path / "c", rows=500)
    with pytest.raises(PipelineError, match=r"batch_size 4096 is larger than the train split \(500 rows\)"):
        ActivationLoader(tmp_path / "c", batch_size=4096)


def test_eval_split_of_a_language_model_cache(tmp_path):
    from cache_writer.run import CacheConfig, run_cache


    run_cache(CacheConfig(out=str(tmp_path / "lm"), tokens=6000, eval_fraction=0.3,
                          dataset=small_corpus(tmp_path / "docs")), progress=False)
    loader = ActivationLoader(tmp_path / "lm", split="eval", batch_size=64)
    rows = sum(len(b) for b in loader)
    assert rows == json.loads((tmp_path / "lm" / "manifest.json").read_text())["splits"]["eval"]["rows"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("resident", ["no", "yes"])
@pytest.mark.parametrize("stored", ["float32", "bfloat16"])
def test_cuda_batches_equal_cpu(tmp_path, resident, stored):
    """Streamed (pinned staging ring, side-stream copies, permutation on the device) or resident on
    the GPU: the CPU's batches, bit for bit, across an epoch boundary and a resume."""
    id_cache(tmp_path / "c", dtype=stored)
    kw = dict(hooks="id", batch_size=64, block_rows=16, buffer_rows=256, tokens=4000)
    cpu = list(ActivationLoader(tmp_path / "c", **kw))
    gpu = list(ActivationLoader(tmp_path / "c", device="cuda", resident=resident, **kw))
    first = ActivationLoader(tmp_path / "c", device="cuda", resident=resident, **kw)
    head = [b for _, b in zip(range(30), first)]
    resumed = ActivationLoader(tmp_path / "c", device="cuda", resident=resident, **kw)
    resumed.load_state_dict(first.state_dict())
    again = head + list(resumed)
    assert len(again) == len(cpu) == len(gpu)
    assert all(g.is_cuda for g in gpu)
    for a, b, c in zip(cpu, gpu, again):
        torch.testing.assert_close(a, b.cpu(), rtol=0, atol=0)
        torch.testing.assert_close(a, c.cpu(), rtol=0, atol=0)


def test_compressed_zarr_cache_loads_and_says_so(tmp_path):
    w = CacheWriter(tmp_path / "c", {"id": 4}, WriterConfig(compression="zstd", shard_mb=0.01))
    for start in range(0, 2000, 100):
        i = torch.arange(start, start + 100, dtype=torch.float32)
        w.put(ActivationBlock({"id": torch.stack([i, i, i, i], 1)}))
    w.close()
    with pytest.warns(UserWarning, match="is compressed: blocks are decoded by zarr"):
        loader = ActivationLoader(tmp_path / "c", batch_size=128)
    assert sorted(ids(loader)) == list(range(2000))
