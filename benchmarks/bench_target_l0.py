"""How close `--target-l0` lands: penalty-based architectures steered to each target L0.

    .venv/bin/python benchmarks/bench_target_l0.py --cache caches/default \\
        [--transcoder-cache caches/transcoder] [--tokens 4000000] [--d-sae 1024] [--targets 16 32 64] \\
        [--arch standard --arch gated --arch jumprelu] [--out DIR]

One `pipeline sweep` pass trains every architecture at every target (runs of one architecture form
one stack, each run with its own target; trainer/target_l0.py steers each run's L1 or L0
coefficient from its measured L0), then, with `--transcoder-cache` (a cache holding the tiny
model's `blocks.0.ln2.hook_normalized` and `blocks.0.hook_mlp_out`), `pipeline train` trains a
standard transcoder at each target. Every export is evaluated on the cache's whole eval split.
Prints a markdown table: eval L0, its distance to the target (the goal: within 5%), explained
variance, and the coefficient each run converged to. `--compare-fixed` then trains the sweep's runs
again in a second sweep with each coefficient fixed at the value its controlled run reached (the
reference a target L0 should not lose to at equal tokens) and prints them too.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from pipeline.malloc import tune_malloc
from trainer.run import TrainConfig, run_train
from trainer.sweep import run_sweep

TC_IN, TC_OUT = "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default="caches/default")
    ap.add_argument("--transcoder-cache", help="a cache with the tiny model's MLP input and output hooks")
    ap.add_argument("--tokens", type=int, default=4_000_000)
    ap.add_argument("--d-sae", type=int, default=1024)
    ap.add_argument("--targets", type=float, nargs="+", default=[16, 32, 64])
    ap.add_argument("--arch", action="append", help="default: standard, gated, jumprelu")
    ap.add_argument("--compare-fixed", action="store_true", help="also train each sweep run with its coefficient "
                    "fixed at the value the controller reached")
    ap.add_argument("--out", help="keep the runs here (default: a temporary directory)")
    args = ap.parse_args()
    tune_malloc()
    archs = args.arch or ["standard", "gated", "jumprelu"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        base = {"cache": args.cache, "out": str(out / "sweep"), "d_sae": args.d_sae, "tokens": args.tokens,
                "wandb": False, "checkpoint_every": 0, "log_every": 100}
        t0 = time.perf_counter()
        for r in run_sweep({"base": base, "sweep": {"arch": archs, "target_l0": args.targets}}, {}, name="target-l0"):
            rows.append({**r, "arch": r.get("arch", r["run"])})
        print(f"sweep: {time.perf_counter() - t0:.0f} s", flush=True)
        if args.compare_fixed:
            fixed = [{"arch": r["arch"], "name": f"{r['run']}-fixed",
                      ("l0" if r["arch"] == "jumprelu" else "l1"): r["k_or_coefficient"]}
                     for r in rows if r.get("status") == "ok"]
            for r in run_sweep({"base": {**base, "out": str(out / "fixed")}, "runs": fixed}, {}, name="fixed"):
                rows.append({**r, "arch": f"{r['arch']} (fixed)"})
        if args.transcoder_cache:
            for target in args.targets:
                t0 = time.perf_counter()
                m = run_train(TrainConfig(cache=args.transcoder_cache, out=str(out / "transcoder"), arch="standard",
                                          hook=TC_IN, hook_out=TC_OUT, d_sae=args.d_sae, tokens=args.tokens,
                                          target_l0=target, wandb=False, checkpoint_every=0, log_every=100))
                rows.append({"arch": "standard transcoder", "target_l0": target, "l0": m["eval_l0"][0],
                             "explained_variance": m["eval_explained_variance"][0],
                             "k_or_coefficient": m["l1_coefficient"][0], "status": "ok"})
                print(f"transcoder, target {target:g}: {time.perf_counter() - t0:.0f} s", flush=True)
    print("\n| architecture | target L0 | eval L0 | L0 / target - 1 | eval explained variance | coefficient reached |")
    print("| --- | --- | --- | --- | --- | --- |")
    worst = 0.0
    for r in rows:
        if r.get("status") != "ok":
            print(f"| {r['arch']} | {r.get('target_l0')} | {r.get('status')} | | | |")
            continue
        if r.get("target_l0") is None:  # a fixed-coefficient reference
            print(f"| {r['arch']} | - | {r['l0']:.2f} | - | {r['explained_variance']:.3f} | {r['k_or_coefficient']:.4g} |")
            continue
        rel = r["l0"] / r["target_l0"] - 1
        worst = max(worst, abs(rel))
        print(f"| {r['arch']} | {r['target_l0']:g} | {r['l0']:.2f} | {rel:+.1%} | {r['explained_variance']:.3f} | "
              f"{r['k_or_coefficient']:.4g} |")
    print(f"\nlargest |L0 / target - 1|: {worst:.1%} (goal: within 5%)")


if __name__ == "__main__":
    main()
