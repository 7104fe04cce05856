"""A sweep of 8 SAEs against the same 8 SAEs trained one after another, on one cache, in one run.

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 \\
      .venv/bin/python benchmarks/bench_sweep.py --cache caches/default [--regime io|compute|both]

Two regimes (both by default):
- io: small SAEs (d_sae 256 and 1024 by default), the cache's pages evicted (POSIX_FADV_DONTNEED)
  before every pass, as when a real cache is larger than RAM: the sweep reads the cache once, the
  sequential runs eight times. To tell whether the regime is I/O-bound at all on this machine, it
  also times a cold read-only pass over one run's tokens (the loader alone) and each sequential
  run's training loop (its steps, reading included, from its tokens/s), and prints the most that
  sharing the reads can give: 8 runs' time over the same minus 7 cold reads.
- compute: larger SAEs (d_sae 8192), pages left in memory. Besides the speed-up, the sweep's time
  is compared with the sum of the runs' dense matmul-only times (the five matmuls of a step,
  forward and backward, at the same shapes, timed in this run): >= 0.8 means fusing the runs adds
  no overhead. It is given for the whole sweep (with each run's initial-scale search, final
  eval-split evaluation and export, which the matmul-only time leaves out) and for its training
  steps alone.
The 8 runs are 4 TopK (k = 16, 32, 64, 128) and 4 standard (L1 = 1, 2, 5, 10); the sweep stacks the
standard runs (R = 4) and gives each k its own stack (trainer.sweep.STACK_BY_COST). Both sides
include the first batch's initialisation, the final eval-split evaluation and the exports.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from pipeline.loader import ActivationLoader, open_source
from pipeline.malloc import tune_malloc
from trainer.run import TrainConfig, run_train
from trainer.sweep import plan_sweep, run_sweep

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


def read_seconds(cache: str, tokens: int, batch: int, files: list[Path] | None, reps: int = 3) -> float:
    """One pass of the loader alone over `tokens` rows (as a run reads them), the pages evicted first
    when `files` are given; the median of `reps` passes (a pass is short, and other processes that
    map the cache keep their pages in memory)."""
    times = []
    for _ in range(reps):
        if files:
            evict(files)
        t0 = time.perf_counter()
        for _ in ActivationLoader(cache, batch_size=batch, seed=0, tokens=tokens):
            pass
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def regime(cache: str, d_sae: int, tokens: int, batch: int, cold: bool, out: Path) -> dict:
    files = cache_files(cache)
    base = TrainConfig(cache=cache, d_sae=d_sae, tokens=tokens, batch_size=batch, log_every=10**9,
                       checkpoint_every=10**9, wandb=False, lr=1e-3)
    runs = [replace(base, arch="topk", k=k) for k in KS] + [replace(base, arch="standard", l1=c) for c in L1S]
    read_s = read_seconds(cache, tokens, batch, files if cold else None)
    t_runs, t_loops = [], []
    for i, r in enumerate(runs):
        if cold:
            evict(files)
        t0 = time.perf_counter()
        last = run_train(replace(r, out=str(out / "seq"), name=f"run{i}"))
        t_runs.append(time.perf_counter() - t0)
        # The loop's own rate (from after the first batch's initialisation to its last step).
        t_loops.append(last["tokens"] / last["tokens_per_s"])
    if cold:
        evict(files)
    spec = {"base": {k: getattr(base, k) for k in ("cache", "d_sae", "tokens", "batch_size", "log_every",
                                                   "checkpoint_every", "wandb", "lr")} | {"out": str(out / "sweep")},
            "sweep": {"arch": ["topk", "standard"], "k": KS, "l1": L1S}}
    t0 = time.perf_counter()
    rows = run_sweep(spec, {}, name="bench")
    t_sweep = time.perf_counter() - t0
    assert len(rows) == 8 and all(r["status"] == "ok" for r in rows), rows
    d_in = dict(open_source(cache).hooks)
    # The stacks are stepped one after another on each batch: the sweep's step time is the sum of
    # every stack's (a run's tokens/s is its stack's).
    plan = plan_sweep(spec, {}, "bench", d_in)
    rate = {r["run"]: r["tokens_per_s"] for r in rows}
    steps_s = sum(plan.runs[idx[0]].tokens / rate[plan.runs[idx[0]].name] for idx in plan.stacks)
    steps = -(-tokens // batch)
    t_mm = len(runs) * matmul_seconds(batch, next(iter(d_in.values())), d_sae, steps)
    t_seq = sum(t_runs)
    return {"d_sae": d_sae, "cold": cold, "tokens": tokens, "steps": steps, "read_s": read_s,
            "run_s": t_seq / len(runs), "loop_s": sum(t_loops) / len(runs), "sequential_s": t_seq,
            "sweep_s": t_sweep, "speedup": t_seq / t_sweep,
            "read_bound": t_seq / max(t_seq - (len(runs) - 1) * read_s, 1e-9),
            "stacks": len(plan.stacks), "sweep_steps_s": steps_s, "matmul_s": t_mm,
            "matmul_ratio": t_mm / t_sweep, "matmul_steps_ratio": t_mm / steps_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default="caches/default")
    ap.add_argument("--regime", choices=["io", "compute", "both"], default="both")
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--io-d-sae", default="256,1024", help="comma-separated d_sae of the io regime's rows")
    ap.add_argument("--io-tokens", type=int, default=200_000)
    ap.add_argument("--compute-d-sae", type=int, default=8192)
    ap.add_argument("--compute-tokens", type=int, default=122_880)
    args = ap.parse_args()
    tune_malloc()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.regime in ("io", "both"):
            for d_sae in (int(d) for d in args.io_d_sae.split(",")):
                results.append(("io (pages evicted)", regime(args.cache, d_sae, args.io_tokens, args.batch_size,
                                                            True, Path(tmp) / f"io{d_sae}")))
        if args.regime in ("compute", "both"):
            results.append(("compute", regime(args.cache, args.compute_d_sae, args.compute_tokens, args.batch_size,
                                              False, Path(tmp) / "compute")))
    print(f"\ndevice: cpu x {torch.get_num_threads()} threads, batch {args.batch_size}\n")
    print("| regime | d_sae | tokens per run | 8 sequential runs | sweep of 8 (stacks) | speed-up | "
          "sum of matmul-only times | matmul-only / sweep | sweep's training steps | matmul-only / steps |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for label, r in results:
        print(f"| {label} | {r['d_sae']} | {r['tokens']:,} | {r['sequential_s']:.1f} s | {r['sweep_s']:.1f} s "
              f"({r['stacks']}) | **{r['speedup']:.2f}x** | {r['matmul_s']:.1f} s | {r['matmul_ratio']:.2f} | "
              f"{r['sweep_steps_s']:.1f} s | {r['matmul_steps_ratio']:.2f} |")
    print("\nWhat bounds it, per run (read: the loader alone over one run's tokens, pages evicted in the io "
          "regime; loop: a sequential run's training steps, reading included; bound: 8 runs' time less 7 "
          "reads, the most sharing the reads can give):\n")
    print("| regime | d_sae | read one run's tokens | one sequential run | its training loop | read / loop | "
          "bound from shared reads |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for label, r in results:
        print(f"| {label} | {r['d_sae']} | {r['read_s']:.2f} s | {r['run_s']:.1f} s | {r['loop_s']:.1f} s | "
              f"{r['read_s'] / r['loop_s']:.2f} | {r['read_bound']:.2f}x |")


if __name__ == "__main__":
    main()
