"""Profile the cache writer's producer (main) thread: where does a step's time go?

    python benchmarks/profile_writer.py [--model tiny] [--tokens N] [--batch-size B]
"""

import argparse
import cProfile
import pstats
import shutil
import tempfile

import torch

from cache_writer.run import CacheConfig, run_cache


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    root = tempfile.mkdtemp()
    cfg = CacheConfig(out=f"{root}/c", model=args.model, tokens=args.tokens, batch_size=args.batch_size,
                      device=args.device)
    timings: dict = {}
    prof = cProfile.Profile()
    prof.enable()
    run_cache(cfg, progress=False, timings=timings)
    prof.disable()
    shutil.rmtree(root, ignore_errors=True)
    print({k: round(v, 2) for k, v in timings.items()})
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
