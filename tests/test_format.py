"""The cache format: round trips, an independent reader, crash safety, and bad input."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import CacheFormatError, CacheWriteError, PipelineError
from pipeline.manifest import read_manifest
from pipeline.reader import Cache
from pipeline.verify import verify_cache
from pipeline.writer import ActivationBlock, CacheWriter, WriterConfig
from tests.synthetic import CONTEXT, HOOKS, step_blocks, write_synthetic

ROOT = Path(__file__).resolve().parents[1]
TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ----------------------------------------------------------------- a reader built from FORMAT.md only


def independent_read(cache: Path, hook: str, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(activations as float32, token rows (n, 3), sequences) using json + zarr / pyarrow / datasets."""
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["format"] == "sae-activation-cache" and manifest["format_version"] == 1
    acts, toks, seqs = [], [], []
    for shard in manifest["splits"][split]["shards"]:
        name = shard["name"]
        if manifest["backend"] == "zarr":
            import zarr

            a = zarr.open_array(str(cache / "hooks" / hook / split / name), mode="r")[...]
            t = zarr.open_array(str(cache / "tokens" / split / "rows" / name), mode="r")[...]
            s = zarr.open_array(str(cache / "tokens" / split / "sequences" / name), mode="r")[...]
        else:
            import pyarrow as pa

            def table(rel):
                return pa.ipc.open_stream(pa.memory_map(str(cache / rel / f"{name}.arrow"))).read_all()

            a = np.stack(table(f"hooks/{hook}/{split}").column(hook).to_pylist()) if shard["rows"] else \
                np.zeros((0, manifest["hooks"][hook]["shape"][0]))
            rows = table(f"tokens/{split}/rows")
            t = np.stack([rows.column(c).to_numpy() for c in ("token_id", "sequence", "position")], axis=1)
            s = np.asarray(table(f"tokens/{split}/sequences").column("token_ids").to_pylist())
        assert a.shape[0] == shard["rows"]
        acts.append(a)
        toks.append(t)
        seqs.append(s)
    a = np.concatenate(acts)
    if manifest["dtype"] == "bfloat16":
        a = (a.astype(np.uint32) << 16).view(np.float32)  # bf16 bits are the high half of a float32
    return a.astype(np.float32), np.concatenate(toks), np.concatenate(seqs)


def expected_rows(n_steps: int, split: str, hook: str, dtype: str) -> dict[tuple[int, int], np.ndarray]:
    """(global sequence index, position) -> expected stored value, from the deterministic source."""
    out, base = {}, 0
    for step in range(n_steps):
        for b in step_blocks(step):
            if b.split != split:
                continue
            vals = b.acts[hook].to(TORCH[dtype]).float().numpy()
            for r in range(b.rows):
                out[(base + int(b.sequence[r]), int(b.position[r]))] = vals[r]
            base += len(b.sequences)
    return out


@pytest.mark.parametrize("fmt", ["zarr", "arrow"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_round_trip_independent_reader(tmp_path, fmt, dtype):
    n_steps = 12
    m = write_synthetic(tmp_path / "c", n_steps, WriterConfig(format=fmt, dtype=dtype, shard_mb=0.002))
    assert m["complete"] and len(m["splits"]["train"]["shards"]) > 1
    for split in ("train", "eval"):
        for hook in HOOKS:
            acts, toks, seqs = independent_read(tmp_path / "c", hook, split)
            want = expected_rows(n_steps, split, hook, dtype)
            assert len(acts) == len(want) == m["splits"][split]["rows"]
            for row, (tok, seq, pos) in zip(acts, toks):
                np.testing.assert_array_equal(row, want[(seq, pos)])  # bit-exact in the stored dtype
                assert seqs[seq, pos] == tok
    # and the package's own reader agrees
    cache = Cache(tmp_path / "c")
    hook = next(iter(HOOKS))
    ours = cache.read_split(hook, "train").float().numpy()
    np.testing.assert_array_equal(ours, independent_read(tmp_path / "c", hook, "train")[0])


def test_arrow_hook_opens_with_datasets(tmp_path):
    import datasets

    write_synthetic(tmp_path / "c", 6, WriterConfig(format="arrow", shard_mb=0.002))
    hook = "blocks.0.hook_resid_post"
    ds = datasets.load_from_disk(str(tmp_path / "c" / "hooks" / hook / "train"))
    assert ds.num_rows == read_manifest(tmp_path / "c")["splits"]["train"]["rows"]
    assert len(ds[0][hook]) == HOOKS[hook]
    np.testing.assert_allclose(np.asarray(ds.with_format("numpy")[:][hook]),
                               Cache(tmp_path / "c").read_split(hook).numpy())


def test_shuffle_on_disk_and_statistics(tmp_path):
    m = write_synthetic(tmp_path / "s", 12, WriterConfig(shard_mb=0.002, shuffle=True))
    n = write_synthetic(tmp_path / "n", 12, WriterConfig(shard_mb=0.002, shuffle=False))
    ts = Cache(tmp_path / "s").tokens("train", 0)
    tn = Cache(tmp_path / "n").tokens("train", 0)
    assert sorted(map(tuple, ts)) == sorted(map(tuple, tn))  # same rows ...
    assert not np.array_equal(ts, tn)  # ... in another order
    assert np.all(np.diff(tn[:, 1]) >= 0)  # unshuffled: sequence order
    hook = "blocks.0.hook_resid_post"
    x = Cache(tmp_path / "s").read_split(hook).double()
    stats = m["hooks"][hook]["stats"]
    assert stats["count"] == x.shape[0]
    np.testing.assert_allclose(stats["mean"], x.mean(0).numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(stats["mean_norm"], x.norm(dim=1).mean().item(), rtol=1e-6)
    assert n["hooks"][hook]["stats"]["count"] == stats["count"]


# ----------------------------------------------------------------- crashes


def run_child(cache: Path, fmt: str, point: str, k: int, n_steps: int) -> int:
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "tests.writer_child", str(cache), fmt, point, str(k), str(n_steps)],
                          cwd=ROOT, env=env, timeout=120).returncode


def all_rows(cache: Path) -> dict:
    c = Cache(cache)
    out = {}
    for split in ("train", "eval"):
        for i in range(len(c.shards(split))):
            out[(split, i)] = (c.tokens(split, i).copy(), c.sequences(split, i).copy(),
                               {h: c.activations(h, split, i).copy() for h in HOOKS})
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """`uninterrupted(fmt)`: the cache the killed writers are compared with, written once per format
    (in this process: nothing kills it, so a child process would only add its imports)."""
    made: dict[str, Path] = {}

    def get(fmt: str) -> Path:
        if fmt not in made:
            made[fmt] = tmp_path_factory.mktemp(f"uninterrupted-{fmt}") / "ref"
            write_synthetic(made[fmt], 30, WriterConfig(format=fmt, shard_mb=0.002))
        return made[fmt]

    return get


@pytest.mark.slow  # a child process killed at each point
@pytest.mark.parametrize("fmt", ["zarr", "arrow"])
@pytest.mark.parametrize("point,k", [("stage", 7), ("rename", 9), ("manifest", 4), ("stage", 1)])
def test_sigkill_leaves_verifiable_resumable_cache(tmp_path, uninterrupted, fmt, point, k):
    n_steps = 30  # as the uninterrupted cache
    ref = uninterrupted(fmt)
    crashed = tmp_path / "crashed"
    assert run_child(crashed, fmt, point, k, n_steps) == -9  # SIGKILL
    problems, m = verify_cache(crashed)
    assert problems == [] and not m["complete"]
    claimed = len(m["splits"]["train"]["shards"])
    # every claimed shard is readable and equals the uninterrupted run's shard of the same index
    ref_rows, got = all_rows(ref), all_rows(crashed)
    for key, (tok, seq, acts) in got.items():
        np.testing.assert_array_equal(tok, ref_rows[key][0])
    # resume completes it; the result equals the uninterrupted run, row for row
    write_synthetic(crashed, n_steps, WriterConfig(format=fmt, shard_mb=0.002), resume=True)
    assert verify_cache(crashed)[0] == []
    got = all_rows(crashed)
    assert got.keys() == ref_rows.keys() and len(got) > claimed
    for key in ref_rows:
        np.testing.assert_array_equal(got[key][0], ref_rows[key][0])
        np.testing.assert_array_equal(got[key][1], ref_rows[key][1])
        for h in HOOKS:
            np.testing.assert_array_equal(got[key][2][h], ref_rows[key][2][h])
    if fmt == "arrow":  # the datasets index of every table lists the shards with the right widths
        import datasets

        seqs = datasets.load_from_disk(str(crashed / "tokens" / "train" / "sequences"))
        assert seqs.num_rows == read_manifest(crashed)["splits"]["train"]["sequences"]
        assert len(seqs[0]["token_ids"]) == CONTEXT
    assert read_manifest(crashed)["hooks"] == read_manifest(ref)["hooks"]  # statistics bit for bit


def test_extend_complete_cache_equals_longer_run(tmp_path):
    write_synthetic(tmp_path / "long", 20)
    write_synthetic(tmp_path / "ext", 11)
    write_synthetic(tmp_path / "ext", 20, resume=True)
    a, b = all_rows(tmp_path / "long"), all_rows(tmp_path / "ext")
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key][0], b[key][0])
        np.testing.assert_array_equal(a[key][2]["blocks.0.hook_resid_post"], b[key][2]["blocks.0.hook_resid_post"])
    sa = read_manifest(tmp_path / "long")["hooks"]["blocks.0.hook_resid_post"]["stats"]
    sb = read_manifest(tmp_path / "ext")["hooks"]["blocks.0.hook_resid_post"]["stats"]
    assert sa["count"] == sb["count"]
    np.testing.assert_allclose(sa["mean"], sb["mean"], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fmt", ["zarr", "arrow"])
def test_verify_names_flipped_byte(tmp_path, cli, fmt):
    m = write_synthetic(tmp_path / "c", 12, WriterConfig(format=fmt, shard_mb=0.002))
    shard = m["splits"]["train"]["shards"][1]
    rel = max(shard["files"], key=lambda r: shard["files"][r]["bytes"])
    f = tmp_path / "c" / rel
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    problems, _ = verify_cache(tmp_path / "c")
    assert len(problems) == 1 and "train/shard-00001" in problems[0] and "checksum" in problems[0]
    code, err, _ = cli("verify", tmp_path / "c")
    assert code == 1 and "train/shard-00001" in err


# ----------------------------------------------------------------- disk space


def test_size_refusal(tmp_path):
    with pytest.raises(CacheWriteError, match=r"not enough disk space .* needs ~.* GiB, .* GiB are free"):
        CacheWriter(tmp_path / "c", HOOKS, has_tokens=True, provenance={"context_size": CONTEXT},
                    expected_rows=10**13)


def test_simulated_enospc_keeps_committed_shards(tmp_path, monkeypatch):
    import pipeline.backends as backends
    import pipeline.writer as writer_mod

    calls = {"n": 0}

    def full_disk(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 8:  # the first groups commit, then the disk fills
            raise OSError(errno.ENOSPC, "No space left on device")
        return backends.stage_table(*args, **kwargs)

    monkeypatch.setattr(writer_mod, "stage_table", full_disk)
    with pytest.raises(CacheWriteError, match=r"disk is full \(ENOSPC\) .* committed shards are intact: .* --resume"):
        write_synthetic(tmp_path / "c", 30)
    problems, m = verify_cache(tmp_path / "c")
    assert problems == [] and m["splits"]["train"]["shards"] and not m["complete"]
    assert not list((tmp_path / "c").rglob("*.tmp"))
    monkeypatch.setattr(writer_mod, "stage_table", backends.stage_table)
    write_synthetic(tmp_path / "c", 30, resume=True)
    write_synthetic(tmp_path / "ref", 30)
    assert all_rows(tmp_path / "c").keys() == all_rows(tmp_path / "ref").keys()


# ----------------------------------------------------------------- bad input


def test_refuses_existing_cache_without_resume(tmp_path):
    write_synthetic(tmp_path / "c", 3)
    with pytest.raises(PipelineError, match=r"already holds a cache .* --resume .* --overwrite"):
        write_synthetic(tmp_path / "c", 3)
    m = write_synthetic(tmp_path / "c", 3, overwrite=True)
    assert m["complete"]


def test_resume_with_other_config_names_field(tmp_path):
    write_synthetic(tmp_path / "c", 3)
    with pytest.raises(PipelineError, match=r"config differs \(layout.dtype: cache 'float32', now 'float16'\)"):
        write_synthetic(tmp_path / "c", 3, WriterConfig(dtype="float16", shard_mb=0.002), resume=True)


def test_refuses_non_cache_directory(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    with pytest.raises(PipelineError, match="not empty and holds no cache"):
        write_synthetic(tmp_path / "c", 3)
    with pytest.raises(PipelineError, match="not empty and holds no cache"):
        write_synthetic(tmp_path / "c", 3, overwrite=True)
    assert (tmp_path / "c" / "notes.txt").exists()


def test_other_format_version(tmp_path):
    write_synthetic(tmp_path / "c", 3)
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    m["format_version"] = 99
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CacheFormatError, match=r"format version 99, .* reads version 1"):
        Cache(tmp_path / "c")


def test_unknown_dtype(tmp_path):
    with pytest.raises(PipelineError, match=r"unknown dtype 'float8'; use one of: float32, float16, bfloat16"):
        CacheWriter(tmp_path / "c", HOOKS, WriterConfig(dtype="float8"))
    write_synthetic(tmp_path / "d", 3)
    m = json.loads((tmp_path / "d" / "manifest.json").read_text())
    m["dtype"] = "int4"
    (tmp_path / "d" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CacheFormatError, match="unknown dtype 'int4'"):
        Cache(tmp_path / "d")


@pytest.mark.parametrize("fmt", ["zarr", "arrow"])
def test_truncated_shard_is_named(tmp_path, fmt):
    m = write_synthetic(tmp_path / "c", 12, WriterConfig(format=fmt, shard_mb=0.002))
    shard = m["splits"]["train"]["shards"][0]
    rel = max(shard["files"], key=lambda r: shard["files"][r]["bytes"])
    f = tmp_path / "c" / rel
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CacheFormatError, match="shard-00000.* truncated or corrupt"):
        Cache(tmp_path / "c").activations(rel.split("/")[1], "train", 0)
    assert "truncated" in verify_cache(tmp_path / "c")[0][0]


def test_hooks_disagree_in_rows(tmp_path):
    w = CacheWriter(tmp_path / "c", {"a": 4, "b": 4})
    with pytest.raises(PipelineError, match=r"block hooks disagree in row count: a=3, b=5"):
        w.put(ActivationBlock({"a": torch.zeros(3, 4), "b": torch.zeros(5, 4)}))
    with pytest.raises(PipelineError, match=r"hook b: block has shape \(3, 5\), the cache stores rows of d=4"):
        w.put(ActivationBlock({"a": torch.zeros(3, 4), "b": torch.zeros(3, 5)}))
    w.close()


def test_float16_overflow_names_hook(tmp_path):
    w = CacheWriter(tmp_path / "c", {"blocks.3.hook_resid_post": 4}, WriterConfig(dtype="float16"))
    w.put(ActivationBlock({"blocks.3.hook_resid_post": torch.full((2, 4), 1e6)}))
    with pytest.raises(CacheWriteError, match=r"hook blocks.3.hook_resid_post: 8 values overflow float16 .*--dtype float32"):
        w.close()
    w2 = CacheWriter(tmp_path / "d", {"h": 4}, WriterConfig(dtype="bfloat16"))
    w2.put(ActivationBlock({"h": torch.full((2, 4), float("nan"))}))
    with pytest.raises(CacheWriteError, match="hook h produced 8 NaN/inf values"):
        w2.close()


def test_synthetic_source_without_tokens(tmp_path):
    """Any source of blocks fits: no model, no tokens."""
    w = CacheWriter(tmp_path / "c", {"x": 6}, WriterConfig(format="arrow", shard_mb=0.0005),
                    provenance={"source": "synthetic"})
    data = torch.randn(200, 6)
    for i in range(0, 200, 25):
        w.put(ActivationBlock({"x": data[i:i + 25]}))
    m = w.close()
    assert m["splits"]["train"]["rows"] == 200 and not m["has_tokens"]
    got = Cache(tmp_path / "c").read_split("x")
    assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, data.tolist()))


@pytest.mark.parametrize("compression", ["zstd", "blosc"])
def test_compressed_zarr_round_trip(tmp_path, compression):
    plain = write_synthetic(tmp_path / "p", 9, WriterConfig(shard_mb=0.002))
    packed = write_synthetic(tmp_path / "z", 9, WriterConfig(shard_mb=0.002, compression=compression))
    assert packed["compression"] == compression and verify_cache(tmp_path / "z")[0] == []
    hook = next(iter(HOOKS))
    for split in ("train", "eval"):
        np.testing.assert_array_equal(Cache(tmp_path / "z").read_split(hook, split).numpy(),
                                      Cache(tmp_path / "p").read_split(hook, split).numpy())
        a, t, _ = independent_read(tmp_path / "z", hook, split)
        np.testing.assert_array_equal(a, independent_read(tmp_path / "p", hook, split)[0])
    assert plain["splits"]["train"]["rows"] == packed["splits"]["train"]["rows"]
    with pytest.raises(PipelineError, match="compression is only available with --format zarr"):
        CacheWriter(tmp_path / "a", HOOKS, WriterConfig(format="arrow", compression="zstd"))
