"""Data integrity: checksums before training reads a shard, verify's consistency checks, the manifest's
schema, read-only and full disks, and statistics that do not depend on where a cache was extended."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import pipeline.integrity as integrity
from pipeline.errors import CacheFormatError, CacheWriteError
from pipeline.integrity import VERIFIED_FILE, BadShardWarning
from pipeline.loader import ActivationLoader
from pipeline.manifest import atomic_write_bytes, read_manifest
from pipeline.reader import Cache
from pipeline.verify import verify_cache
from pipeline.writer import ActivationBlock, CacheWriter, WriterConfig
from tests.synthetic import CONTEXT, HOOKS, write_synthetic

HOOK = "blocks.0.hook_resid_post"


def id_cache(path: Path, fmt: str, rows: int = 2400) -> dict:
    """Unshuffled rows whose first value is the row's index, in shards of ~400 rows."""
    w = CacheWriter(path, {"x": 8}, WriterConfig(format=fmt, shard_mb=0.012, shuffle=False))
    for start in range(0, rows, 100):
        x = torch.arange(start, start + 100, dtype=torch.float32)[:, None].repeat(1, 8)
        w.put(ActivationBlock({"x": x}))
    return w.close()


def flip_byte(cache: Path, shard: dict, table: str) -> str:
    """Flip one bit in the middle of the largest file of a shard's table; returns its path."""
    rel = max((r for r in shard["files"] if r.startswith(table)), key=lambda r: shard["files"][r]["bytes"])
    f = cache / rel
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    return rel


@pytest.fixture(autouse=True)
def fresh_memory(monkeypatch, tmp_path):
    """Each test starts with nothing verified in this process, and a home of its own."""
    integrity._done.clear()
    monkeypatch.setattr(integrity, "HOME_DIR", tmp_path / "home-cache")


def shard_of(manifest: dict, row_id: int) -> int:
    bounds = np.cumsum([s["rows"] for s in manifest["splits"]["train"]["shards"]])
    return int(np.searchsorted(bounds, row_id, side="right"))


# ----------------------------------------------------------------- 1. checksums before the loader reads


@pytest.mark.parametrize("fmt", ["zarr", "arrow"])
def test_loader_stops_on_a_corrupt_shard_or_skips_it(tmp_path, fmt):
    m = id_cache(tmp_path / "c", fmt)
    shards = m["splits"]["train"]["shards"]
    assert len(shards) >= 4
    flip_byte(tmp_path / "c", shards[2], "hooks/x/train")
    with pytest.raises(CacheFormatError, match=r"shard train/shard-00002 of .* is corrupt \(hooks/x/train/shard-00002"
                                               r".*checksum mismatch.*`pipeline verify .*--skip-bad-shards"):
        list(ActivationLoader(tmp_path / "c", batch_size=100))
    with pytest.warns(BadShardWarning, match=r"skipping shard train/shard-00002 .* its [\d,]+ rows are left out"):
        loader = ActivationLoader(tmp_path / "c", batch_size=100, skip_bad_shards=True)
    got = sorted(int(v) for b in loader for v in b[:, 0].tolist())
    start = sum(s["rows"] for s in shards[:2])
    assert got == [i for i in range(m["splits"]["train"]["rows"]) if not start <= i < start + shards[2]["rows"]]


@pytest.mark.parametrize("fmt", ["zarr", "arrow"])
def test_no_batch_before_its_shards_are_verified_and_results_are_kept(tmp_path, fmt, monkeypatch):
    m = id_cache(tmp_path / "c", fmt)
    hashed = []
    real = integrity.file_checksum
    monkeypatch.setattr(integrity, "file_checksum", lambda p: hashed.append(Path(p).name) or real(p))
    loader = ActivationLoader(tmp_path / "c", batch_size=100)
    for batch in loader:  # every shard a batch holds rows of has been verified before it was yielded
        assert {shard_of(m, int(i)) for i in batch[:, 0].tolist()} <= {s for s, p in loader.verifier.results.items()
                                                                       if p is None}
    loader.close()
    files = sum(len(s["files"]) for s in m["splits"]["train"]["shards"])
    assert len(hashed) == files  # each file once, though two threads (reader and background) check
    record = json.loads((tmp_path / "c" / VERIFIED_FILE).read_text())
    assert len(record) == files and all(v["problem"] is None for v in record.values())
    # A later run (another process: nothing in memory) hashes only the file that changed.
    integrity._done.clear()
    hashed.clear()
    shard = m["splits"]["train"]["shards"][1]
    changed = tmp_path / "c" / max(shard["files"], key=lambda r: shard["files"][r]["bytes"])
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    assert len(list(ActivationLoader(tmp_path / "c", batch_size=100))) == 24
    assert hashed == [changed.name]


def test_read_only_cache_keeps_its_record_at_home(tmp_path):
    id_cache(tmp_path / "c", "zarr")
    (tmp_path / "c" / VERIFIED_FILE).mkdir()  # stands for a cache directory we cannot write into
    list(ActivationLoader(tmp_path / "c", batch_size=100))
    kept = list((tmp_path / "home-cache").glob("*.json"))
    assert len(kept) == 1 and len(json.loads(kept[0].read_text())) > 0


@pytest.mark.parametrize("fmt", ["zarr", "arrow"])
def test_train_fails_naming_a_corrupt_shard_or_skips_it(tmp_path, fmt):
    from trainer.run import TrainConfig, run_train

    m = write_synthetic(tmp_path / "c", 40, WriterConfig(format=fmt, shard_mb=0.004))
    flip_byte(tmp_path / "c", m["splits"]["train"]["shards"][1], f"hooks/{HOOK}/train")
    base = dict(cache=str(tmp_path / "c"), out=str(tmp_path / "runs"), hook=HOOK, d_sae=32, k=4, batch_size=64,
                tokens=64 * 8, wandb=False, device="cpu", b_dec_init="mean", init_scale_search=False)
    with pytest.raises(CacheFormatError, match=r"shard train/shard-00001 .* is corrupt .*`pipeline verify"):
        run_train(TrainConfig(**base))
    integrity._done.clear()
    with pytest.warns(BadShardWarning, match="skipping shard train/shard-00001"):
        metrics = run_train(TrainConfig(**base, name="skipped", skip_bad_shards=True))
    assert (Path(metrics["run_dir"]) / "sae_weights.safetensors").is_file()


def test_cli_train_one_line_on_a_corrupt_shard(tmp_path, cli):
    m = write_synthetic(tmp_path / "c", 30, WriterConfig(format="arrow", shard_mb=0.004))
    flip_byte(tmp_path / "c", m["splits"]["train"]["shards"][0], f"hooks/{HOOK}/train")
    args = ["train", "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "runs"), "--hook", HOOK, "--d-sae", "32",
            "--k", "4", "--batch-size", "64", "--tokens", "512", "--no-wandb", "--device", "cpu"]
    code, err, _ = cli(*args)
    assert code == 2 and err.strip().count("\n") == 0, err
    assert err.startswith("error: shard train/shard-00000") and "pipeline verify" in err
    code, err, out = cli(*args, "--skip-bad-shards")
    assert code == 0, err[-2000:]
    assert "exported to" in out
    # One plain line, not Python's warnings format (file:line, category, the source line).
    skips = [line for line in err.splitlines() if "skipping shard" in line]
    assert len(skips) == 1 and skips[0].startswith("warning: skipping shard train/shard-00000 of "), err
    assert "BadShardWarning" not in err and "warnings.warn" not in err


# ----------------------------------------------------------------- 2. verify checks the manifest too


@pytest.mark.parametrize("fmt", ["zarr", "arrow"])
def test_verify_checks_the_manifest_against_itself_and_the_directory(tmp_path, fmt):
    c = tmp_path / "c"
    write_synthetic(c, 40, WriterConfig(format=fmt, shard_mb=0.004))
    assert verify_cache(c)[0] == []
    m = json.loads((c / "manifest.json").read_text())
    train = m["splits"]["train"]
    gone = train["shards"].pop(2)  # a shard removed from the manifest, the totals edited to match
    train["rows"] -= gone["rows"]
    train["sequences"] -= gone["sequences"]
    (c / "manifest.json").write_text(json.dumps(m))
    problems = verify_cache(c)[0]
    text = "\n".join(problems)
    assert "split train: shard shard-00003 follows shard-00001" in text
    assert f"hooks/{HOOK}/train/{gone['name']}{'.arrow' if fmt == 'arrow' else ''} is on disk but not in the manifest" in text
    assert f"tokens/train/rows/{gone['name']}" in text
    count = m["hooks"][HOOK]["stats"]["count"]
    assert f"hook {HOOK}: statistics count {count} rows, the train split has {train['rows']:,}" in text
    assert "shard train/shard-00003: " in text and "token rows point outside its contexts" in text
    # totals that do not add up are named as well
    m["splits"]["eval"]["rows"] += 5
    (c / "manifest.json").write_text(json.dumps(m))
    assert any(p.startswith("split eval: its shards hold") for p in verify_cache(c)[0])


def edit_manifest(cache: Path, edit) -> None:
    m = json.loads((cache / "manifest.json").read_text())
    edit(m)
    (cache / "manifest.json").write_text(json.dumps(m))


def drop_last_shard(m: dict) -> None:
    train = m["splits"]["train"]
    gone = train["shards"].pop()  # the totals edited to match: only the directory tells
    train["rows"] -= gone["rows"]
    train["sequences"] -= gone["sequences"]
    for hook in m["hooks"].values():
        hook["stats"]["count"] -= gone["rows"]


@pytest.mark.parametrize("edit,problem", [
    (drop_last_shard, r"hooks/x/train/shard-00005 is on disk but not in the manifest"),
    (lambda m: m["hooks"]["x"]["stats"].update(count=m["hooks"]["x"]["stats"]["count"] + 1),
     r"hook x: statistics count 2,?401 rows, the train split has 2,400"),
    (lambda m: m["splits"]["train"]["shards"][1].update(sequences=7),
     r"split train: its shards hold 7 sequences, the manifest's total says 0"),
])
def test_train_and_sweep_refuse_a_cache_verify_calls_bad_for_its_manifest(tmp_path, edit, problem):
    """Cheap checks only (no shard is read): a run never trains on a cache whose manifest lost a
    shard or whose counts were edited, and says how to see every problem."""
    from trainer.run import TrainConfig, run_train
    from trainer.sweep import run_sweep

    c = tmp_path / "c"
    id_cache(c, "zarr")
    edit_manifest(c, edit)
    assert verify_cache(c)[0]
    where = rf"cache {c} contradicts its manifest: {problem}.*; `pipeline verify {c}` lists every problem$"
    with pytest.raises(CacheFormatError, match=where):
        run_train(TrainConfig(cache=str(c), out=str(tmp_path / "r"), d_sae=16, k=2, batch_size=100, tokens=200,
                              wandb=False))
    with pytest.raises(CacheFormatError, match=where):
        run_sweep({"base": {"cache": str(c), "out": str(tmp_path / "s"), "d_sae": 16, "batch_size": 100,
                            "tokens": 200, "wandb": False}, "sweep": {"k": [2, 4]}}, {})
    assert not (tmp_path / "r").exists() and not (tmp_path / "s").exists()


def test_verify_names_folders_written_inside_a_cache(tmp_path):
    c = tmp_path / "c"
    id_cache(c, "zarr")
    for inside in ("topk-d16-k2", "hooks/topk-d16-k2", "hooks/x/inner"):
        (c / inside).mkdir()
    text = "\n".join(verify_cache(c)[0])
    for inside in ("topk-d16-k2", "hooks/topk-d16-k2", "hooks/x/inner"):
        assert f"{inside}/ is a folder the cache does not have (something written inside the cache: move it out)" \
            in text, text


# ----------------------------------------------------------------- 3. the manifest's schema


@pytest.mark.parametrize("edit,message", [
    (lambda m: [], r"holds a list, not an object"),
    (lambda m: {k: v for k, v in m.items() if k != "splits"}, r"`manifest.splits` is missing"),
    (lambda m: {**m, "hooks": []}, r"`manifest.hooks` is a list, expected an object"),
    (lambda m: m | {"splits": {**m["splits"], "train": {**m["splits"]["train"], "shards": [{"name": "x"}]}}},
     r"`manifest.splits.train.shards\[0\].rows` is missing"),
    (lambda m: m | {"progress": {**m["progress"], "units": "12"}}, r"`manifest.progress.units` is a string, expected an integer"),
])
def test_manifest_schema_is_checked_on_open(tmp_path, edit, message):
    write_synthetic(tmp_path / "c", 3)
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(edit(m)))
    with pytest.raises(CacheFormatError, match=message):
        Cache(tmp_path / "c")


def test_wrong_manifests_and_corrupt_zarr_json_give_one_line(tmp_path, cli):
    write_synthetic(tmp_path / "c", 3)
    (tmp_path / "c" / "manifest.json").write_text("[]")
    code, err, _ = cli("verify", str(tmp_path / "c"))
    assert code == 2 and err.count("\n") == 1 and "not an object" in err, err
    m = write_synthetic(tmp_path / "d", 6)
    meta = tmp_path / "d" / f"hooks/{HOOK}/train/shard-00000/zarr.json"
    data = bytearray(meta.read_bytes())
    data[10] ^= 0x80  # no longer UTF-8
    meta.write_bytes(bytes(data))
    with pytest.raises(CacheFormatError, match="zarr.json is unreadable"):
        ActivationLoader(tmp_path / "d", hooks=HOOK, batch_size=16)
    code, err, _ = cli("train", "--cache", str(tmp_path / "d"), "--out", str(tmp_path / "runs"), "--hook", HOOK,
                       "--batch-size", "16", "--tokens", "64", "--no-wandb", "--device", "cpu")
    assert code == 2 and err.count("\n") == 1 and "zarr.json is unreadable" in err, err
    assert m["complete"]


# ----------------------------------------------------------------- 4. read-only caches


def test_resume_on_a_read_only_cache_is_one_line(tmp_path, monkeypatch):
    import pipeline.writer as writer_mod

    write_synthetic(tmp_path / "c", 6)
    (tmp_path / "c" / f"hooks/{HOOK}/train/shard-00042.tmp").write_bytes(b"left over")

    def read_only(path):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(writer_mod, "remove_entry", read_only)
    with pytest.raises(CacheWriteError, match=r"cannot resume the cache in .*: Read-only file system \(.*shard-00042"
                                              r"\.tmp\); the cache directory must be writable"):
        write_synthetic(tmp_path / "c", 9, resume=True)


# ----------------------------------------------------------------- 5. full disks


def test_disk_space_refusal_writes_nothing(tmp_path):
    big = dict(has_tokens=True, provenance={"context_size": CONTEXT}, expected_rows=10**13)
    with pytest.raises(CacheWriteError, match="not enough disk space"):
        CacheWriter(tmp_path / "c", HOOKS, **big)
    assert not (tmp_path / "c").exists()
    assert write_synthetic(tmp_path / "c", 3)["complete"]  # a retry is not refused
    before = (tmp_path / "c" / "manifest.json").read_bytes()
    for kwargs in (dict(resume=True), dict(overwrite=True)):
        with pytest.raises(CacheWriteError, match="not enough disk space"):
            CacheWriter(tmp_path / "c", HOOKS, WriterConfig(shard_mb=0.002), **kwargs, **big)
        assert (tmp_path / "c" / "manifest.json").read_bytes() == before
    assert verify_cache(tmp_path / "c")[0] == []


@pytest.mark.parametrize("fmt", ["zarr", "arrow"])
def test_disk_full_mid_shard_leaves_no_partial_file(tmp_path, monkeypatch, fmt):
    import pipeline.backends as backends

    real = backends._write_zarr if fmt == "zarr" else backends._write_arrow
    calls = {"n": 0}

    def fills_up(path, *args):
        calls["n"] += 1
        if calls["n"] > 10:  # the disk fills halfway through a file
            real(path, *args)
            victim = path if path.is_file() else next(p for p in path.rglob("*") if p.is_file())
            victim.write_bytes(victim.read_bytes()[:7])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, *args)

    monkeypatch.setattr(backends, f"_write_{fmt}", fills_up)
    with pytest.raises(CacheWriteError, match=r"disk is full"):
        write_synthetic(tmp_path / "c", 30, WriterConfig(format=fmt, shard_mb=0.002))
    assert not list((tmp_path / "c").rglob("*.tmp"))
    assert verify_cache(tmp_path / "c")[0] == []


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "manifest.json"
    target.write_text("old")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"new")
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]


# ----------------------------------------------------------------- 6. statistics of an extended cache


@pytest.mark.parametrize("fmt", ["zarr", "arrow"])
def test_extended_cache_manifest_equals_uninterrupted(tmp_path, fmt):
    cfg = WriterConfig(format=fmt, shard_mb=0.002)
    write_synthetic(tmp_path / "long", 40, cfg)
    write_synthetic(tmp_path / "ext", 13, cfg)
    write_synthetic(tmp_path / "ext", 29, cfg, resume=True)
    write_synthetic(tmp_path / "ext", 40, cfg, resume=True)
    a, b = read_manifest(tmp_path / "long"), read_manifest(tmp_path / "ext")
    for m in (a, b):
        m.pop("created")
    assert a["hooks"] == b["hooks"]  # bit for bit: sum, mean, norms
    assert a == b
