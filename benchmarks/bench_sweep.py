"""A sweep of 8 SAEs against the same 8 SAEs trained one after another, on one cache, in one run.

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 \\
      .venv/bin/python benchmarks/bench_sweep.py --cache caches/default [--regime io|compute|both]

Two regimes (both by default):
- io: small SAEs (d_sae 1024 by default), the cache's pages evicted (POSIX_FADV_DONTNEED) before
  every pass, as when a real cache is larger than RAM: the sweep reads the cache once, the
  sequential runs eight times.
- compute: larger SAEs (d_sae 8192). Besides the speed-up, the sweep's time is compared with the
  sum of the runs' dense matmul-only times (the five matmuls of a step, forward and backward, at
  the same shapes, timed in this run): >= 0.8 means fusing the runs adds no overhead.
The 8 runs are 4 TopK (k = 16, 32, 64, 128) and 4 standard (L1 = 1, 2, 5, 10): two stacks of 4.
Both sides include the final eval-split evaluation and the exports.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from pipeline.loader import open_source
from pipeline.malloc import tune_malloc
from trainer.run import TrainConfig, run_train
from trainer.sweep import run_sweep

KS = [16, 32, 64, 128]
L1S = [1.0, 2.0, 5.0, 10.0]


def cache_files(cache: str) -> list[Path]:
    return [p for p in Path(cache).rglob("*") if p.is_file() and "/hooks/" in str(p)]


def evict(files: list[Path]) -> None:
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def matmul_seconds(batch: int, d_in: int, d_sae: int, steps: int, reps: int = 3) -> float:
    """Time of `steps` training steps' dense matmuls for one run (encoder and decoder forward,
    decoder weight and latent gradients, encoder weight gradient)."""
    x, W_enc = torch.randn(batch, d_in), torch.randn(d_in, d_sae)
    W_dec, lat = torch.randn(d_sae, d_in), torch.randn(batch, d_sae)
    g_out = torch.randn(batch, d_in)

    def step() -> None:
        x @ W_enc
        lat @ W_dec
        lat.T @ g_out
        g_out @ W_dec.T
        x.T @ lat

    step()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(min(steps, 5)):
            step()
        best = min(best, (time.perf_counter() - t0) / min(steps, 5))
    return best * steps


def regime(cache: str, d_sae: int, tokens: int, batch: int, cold: bool, out: Path) -> dict:
    files = cache_files(cache)
    base = TrainConfig(cache=cache, d_sae=d_sae, tokens=tokens, batch_size=batch, log_every=10**9,
                       checkpoint_every=10**9, wandb=False, lr=1e-3)
    runs = [replace(base, arch="topk", k=k) for k in KS] + [replace(base, arch="standard", l1=c) for c in L1S]
    t_seq = 0.0
    for i, r in enumerate(runs):
        if cold:
            evict(files)
        t0 = time.perf_counter()
        run_train(replace(r, out=str(out / "seq"), name=f"run{i}"))
        t_seq += time.perf_counter() - t0
    if cold:
        evict(files)
    spec = {"base": {k: getattr(base, k) for k in ("cache", "d_sae", "tokens", "batch_size", "log_every",
                                                   "checkpoint_every", "wandb", "lr")} | {"out": str(out / "sweep")},
            "sweep": {"arch": ["topk", "standard"], "k": KS, "l1": L1S}}
    t0 = time.perf_counter()
    rows = run_sweep(spec, {}, name="bench")
    t_sweep = time.perf_counter() - t0
    assert len(rows) == 8 and all(r["status"] == "ok" for r in rows), rows
    d_in = next(iter(open_source(cache).hooks.values()))
    steps = -(-tokens // batch)
    t_mm = len(runs) * matmul_seconds(batch, d_in, d_sae, steps)
    return {"d_sae": d_sae, "cold": cold, "sequential_s": t_seq, "sweep_s": t_sweep, "speedup": t_seq / t_sweep,
            "matmul_s": t_mm, "matmul_ratio": t_mm / t_sweep, "tokens": tokens, "steps": steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default="caches/default")
    ap.add_argument("--regime", choices=["io", "compute", "both"], default="both")
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--io-d-sae", type=int, default=1024)
    ap.add_argument("--io-tokens", type=int, default=400_000)
    ap.add_argument("--compute-d-sae", type=int, default=8192)
    ap.add_argument("--compute-tokens", type=int, default=81_920)
    args = ap.parse_args()
    tune_malloc()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.regime in ("io", "both"):
            results.append(("io (pages evicted)", regime(args.cache, args.io_d_sae, args.io_tokens, args.batch_size,
                                                        True, Path(tmp) / "io")))
        if args.regime in ("compute", "both"):
            results.append(("compute", regime(args.cache, args.compute_d_sae, args.compute_tokens, args.batch_size,
                                              False, Path(tmp) / "compute")))
    print(f"\ndevice: cpu x {torch.get_num_threads()} threads, batch {args.batch_size}\n")
    print("| regime | d_sae | tokens per run | 8 sequential runs | sweep of 8 | speed-up | "
          "sum of matmul-only times | matmul-only / sweep |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for label, r in results:
        print(f"| {label} | {r['d_sae']} | {r['tokens']:,} | {r['sequential_s']:.1f} s | {r['sweep_s']:.1f} s | "
              f"**{r['speedup']:.2f}x** | {r['matmul_s']:.1f} s | {r['matmul_ratio']:.2f} |")


if __name__ == "__main__":
    main()
