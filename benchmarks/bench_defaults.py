"""Do the training defaults train well without hand tuning? Our defaults against SAELens's.

Trains the same SAE on the same cache with (a) `pipeline train`'s defaults, (b) SAELens's
(b_dec at zero, lr 3e-4, no initial-scale search), and one-change ablations between them, and
prints the eval-split explained variance, L0 and dead fraction of each.

    .venv/bin/python benchmarks/bench_defaults.py --cache caches/default [--tokens 1000000]
"""

from __future__ import annotations

import argparse
import tempfile

from pipeline.malloc import tune_malloc
from trainer.run import TrainConfig, run_train

VARIANTS = {
    "ours (geometric-median b_dec, scale search, lr 1e-3)": {},
    "ours without scale search": {"init_scale_search": False},
    "ours with lr 3e-4": {"lr": 3e-4},
    "ours with b_dec at zero": {"b_dec_init": "zeros"},
    "SAELens defaults (b_dec zero, lr 3e-4, no search)": {"b_dec_init": "zeros", "lr": 3e-4,
                                                          "init_scale_search": False},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default="caches/default")
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--arch", action="append", default=None, help="topk and/or standard (default both)")
    ap.add_argument("--d-sae", type=int, default=1024)
    args = ap.parse_args()
    tune_malloc()
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for arch in args.arch or ["topk", "standard"]:
            for label, change in VARIANTS.items():
                cfg = TrainConfig(cache=args.cache, out=out, name=f"{arch}-{len(rows)}", arch=arch, d_sae=args.d_sae,
                                  tokens=args.tokens, log_every=10**9, checkpoint_every=10**9, wandb=False, **change)
                m = run_train(cfg)
                rows.append((arch, label, m["eval_explained_variance"][0], m["eval_l0"][0], m["eval_dead_fraction"][0]))
                print(f"{arch:9s} {label:55s} eval EV {rows[-1][2]:.3f}  L0 {rows[-1][3]:6.1f}  dead {rows[-1][4]:.3f}",
                      flush=True)
    print("\n| arch | settings | eval explained variance | L0 | dead fraction |\n| --- | --- | --- | --- | --- |")
    for arch, label, ev, l0, dead in rows:
        print(f"| {arch} | {label} | {ev:.3f} | {l0:.1f} | {dead:.3f} |")


if __name__ == "__main__":
    main()
