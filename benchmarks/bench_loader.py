"""Loader throughput against the raw read speed of the same files, warm and cold, in one run.

    python benchmarks/bench_loader.py [--gb 2.0] [--d 768] [--batch-size 4096] [--dir DIR]

Writes a synthetic cache (Zarr and Arrow backends, float32) of the given size, then for each:
- raw: sequential read of every shard file (the limit),
- loader: `ActivationLoader` with its default two-level shuffle, batches of `--batch-size`,
- resident: the same with `resident="yes"` (the split copied to RAM once, not counted; every epoch
  is then served from there),
- datasets (Arrow only): `datasets.load_from_disk(...).with_format("torch")` iterated in order
  (SAELens's read path),
each warm (files in the page cache) and cold (pages evicted with POSIX_FADV_DONTNEED first).
Also the loader's peak anonymous memory (RssAnon) against its buffer size.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.loader import ActivationLoader
from pipeline.manifest import read_manifest
from pipeline.writer import ActivationBlock, CacheWriter, WriterConfig

HOOK = "blocks.6.hook_resid_post"


def make_cache(path: Path, fmt: str, rows: int, d: int) -> list[Path]:
    w = CacheWriter(path, {HOOK: d}, WriterConfig(format=fmt))
    rng = np.random.default_rng(0)
    block = torch.from_numpy(rng.standard_normal((8192, d), dtype=np.float32))
    for start in range(0, rows, 8192):
        w.put(ActivationBlock({HOOK: block[: min(8192, rows - start)]}))
    m = w.close()
    return [path / rel for s in m["splits"].values() for sh in s["shards"] for rel in sh["files"]
            if "/hooks/" in f"/{rel}" and not rel.endswith(".json")]


def evict(files: list[Path]) -> None:
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def raw_read(files: list[Path]) -> tuple[float, int]:
    buf = bytearray(64 << 20)
    view = memoryview(buf)
    t0, n = time.perf_counter(), 0
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while k := fh.readinto(view):
                n += k
    return time.perf_counter() - t0, n


def rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def loader_pass(path: Path, batch_size: int, resident: str = "no") -> tuple[float, int, int, int, int]:
    loader = ActivationLoader(path, hooks=HOOK, batch_size=batch_size, resident=resident)
    if loader.resident:
        loader._make_resident()  # once per run, not per epoch: not timed
    base, peak = rss_anon(), 0
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0, rows = time.perf_counter(), 0
    for i, batch in enumerate(loader):
        rows += batch.shape[0]
        if i % 8 == 0:
            peak = max(peak, rss_anon() - base)
    seconds = time.perf_counter() - t0
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    buffer_bytes = loader.buffer_rows * batch.shape[1] * 4
    return seconds, rows, peak, buffer_bytes, faults


def datasets_pass(path: Path, batch_size: int) -> tuple[float, int]:
    import datasets

    ds = datasets.load_from_disk(str(path / "hooks" / HOOK / "train")).with_format("torch")
    t0, rows = time.perf_counter(), 0
    for batch in ds.iter(batch_size=batch_size):
        rows += batch[HOOK].shape[0]
    return time.perf_counter() - t0, rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=2.0)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    rows = int(args.gb * 2**30 / (args.d * 4))
    root = Path(args.dir or tempfile.mkdtemp(prefix="bench_loader_"))
    print(f"cache: {rows:,} rows x d={args.d} float32 = {rows * args.d * 4 / 2**30:.2f} GiB per backend; "
          f"batch {args.batch_size}; torch threads {torch.get_num_threads()}; "
          f"MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_', 'unset')}")
    row_bytes = args.d * 4
    for fmt in ("zarr", "arrow"):
        path = root / fmt
        shutil.rmtree(path, ignore_errors=True)
        files = make_cache(path, fmt, rows, args.d)
        assert read_manifest(path)["splits"]["train"]["rows"] == rows
        for temp in ("warm", "cold"):
            results = {}
            for name in ("raw", "loader", "resident") + (("datasets",) if fmt == "arrow" else ()):
                if temp == "cold":
                    evict(files)
                else:
                    raw_read(files)  # make sure every page is cached
                if name == "raw":
                    s, n = raw_read(files)
                    results[name] = (s, n)
                elif name == "resident":
                    s, n_rows, *_ = loader_pass(path, args.batch_size, "yes")
                    results[name] = (s, n_rows * row_bytes)
                elif name == "loader":
                    s, n_rows, peak, buf, faults = loader_pass(path, args.batch_size)
                    results[name] = (s, n_rows * row_bytes)
                    mem = (f"peak RssAnon +{peak / 2**20:,.0f} MiB vs shuffle buffer {buf / 2**20:,.0f} MiB; "
                           f"{faults:,} minor page faults = {faults * 4096 / (n_rows * row_bytes):.2f} per 4 KiB read")
                else:
                    s, n_rows = datasets_pass(path, args.batch_size)
                    results[name] = (s, n_rows * row_bytes)
            raw_gbs = results["raw"][1] / results["raw"][0] / 1e9
            for name, (s, n) in results.items():
                gbs = n / s / 1e9
                print(f"{fmt:5s} {temp}: {name:8s} {gbs:6.2f} GB/s  {n / row_bytes / s:12,.0f} rows/s  "
                      f"ratio to raw {gbs / raw_gbs:5.2f}" + (f"  ({mem})" if name == "loader" else ""))
    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    main()
