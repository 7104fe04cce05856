"""Every architecture on the default cache at a comparable L0: quality, CE loss recovered, speed.

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 \\
    .venv/bin/python benchmarks/bench_architectures.py --cache caches/default [--tokens 2000000] \\
        [--d-sae 1024] [--l0 32] [--contexts 64] [--arch topk --arch gated ...] [--penalty gated=2]

One `pipeline sweep` pass trains one run per architecture at `target_l0 = --l0` (k for the k-based
ones; for the penalty-based ones a controller steers the coefficient to it, trainer/target_l0.py;
`--penalty gated=2` fixes a coefficient instead). Each run is its own stack,
so its tokens/s is its own step time. Every export is then evaluated on the cache's whole eval
split (explained variance, L0, dead fraction) and spliced into the cache's model on `--contexts`
eval contexts (CE loss recovered against zero and mean ablation, KL). Prints a markdown table.
`--arch` runs some architectures only (the batches are the same, so pieces make one table).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from analysis.evaluate_ce import ce_columns
from pipeline.malloc import tune_malloc
from trainer.registry import registered_architectures
from trainer.run import arch_fields
from trainer.sweep import run_sweep

def run_for(arch: str, l0: int, penalties: dict) -> dict:
    """The sweep run of `arch`: at target L0 `l0` (k for the k-based ones, a controlled coefficient
    for the others), or with the fixed penalty given for it."""
    names = arch_fields(arch)
    if arch in penalties and "k" not in names:
        return {"arch": arch, **penalties[arch]}
    if "k" in names or "l1_coefficient" in names or "l0_coefficient" in names:
        return {"arch": arch, "target_l0": l0}
    raise SystemExit(f"don't know how to set the sparsity of {arch!r}")


def setting(row: dict) -> str:
    """The sparsity knob as the table shows it: k=32, l1=2, l0=0.14 (-> for the coefficient a
    target L0's controller ended at)."""
    names = arch_fields(row["arch"])
    label = "k" if "k" in names else "l1" if "l1_coefficient" in names else "l0"
    steered = row.get("target_l0") is not None and "k" not in names
    return f"{label}{' -> ' if steered else '='}{row['k_or_coefficient']:.3g}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default="caches/default")
    ap.add_argument("--tokens", type=int, default=2_000_000)
    ap.add_argument("--d-sae", type=int, default=1024)
    ap.add_argument("--l0", type=int, default=32)
    ap.add_argument("--contexts", type=int, default=64)
    ap.add_argument("--arch", action="append", help="default: every registered architecture")
    ap.add_argument("--penalty", action="append", default=[], help="ARCH=VALUE for its l1 or l0 coefficient")
    ap.add_argument("--precision", action="append", help="fp32, tf32, bf16 (repeatable: each architecture once "
                    "per precision, with a parity table; default: auto)")
    ap.add_argument("--out", help="keep the runs here (default: a temporary directory)")
    args = ap.parse_args()
    tune_malloc()
    penalties = {}
    for item in args.penalty:
        arch, value = item.split("=")
        knob = "l0" if "l0_coefficient" in arch_fields(arch) else "l1"
        penalties[arch] = {knob: float(value)}
    precisions = args.precision or ["auto"]
    runs = []
    for a in args.arch or registered_architectures():
        for prec in precisions:
            r = {**run_for(a, args.l0, penalties), "precision": prec}
            r["name"] = a if len(precisions) == 1 else f"{a}-{prec}"
            runs.append(r)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        spec = {"base": {"cache": args.cache, "out": str(out), "d_sae": args.d_sae, "tokens": args.tokens,
                         "batch_size": 4096, "lr": 1e-3, "log_every": 100, "wandb": False,
                         "checkpoint_every": 10**9},
                "runs": runs}
        rows = run_sweep(spec, {}, name="architectures", evaluate_runs=ce_columns(args.cache, args.contexts))
    print(f"\n{args.tokens:,} tokens per run, d_sae {args.d_sae}, target L0 {args.l0}, "
          f"CE on {args.contexts} eval contexts\n")
    print("| architecture | setting | precision | eval L0 | eval explained variance | dead fraction | "
          "CE recovered (zero abl.) | CE recovered (mean abl.) | KL (nats) | tokens/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    by_run = {r["name"]: r for r in runs}
    for row in rows:
        if row.get("status") != "ok":
            print(f"| {row['run']} | {row.get('status')} | | | | | | | | |")
            continue
        print(f"| {row['arch']} | {setting(row)} | {by_run[row['run']]['precision']} | {row['l0']:.1f} | "
              f"{row['explained_variance']:.3f} | {row['dead_fraction']:.3f} | {row['ce_recovered_zero']:.3f} | "
              f"{row['ce_recovered_mean']:.3f} | {row['kl']:.4f} | {row['tokens_per_s']:,.0f} |")
    if len(precisions) > 1:  # parity of each precision against the first one
        ok = {(by_run[r["run"]]["arch"], by_run[r["run"]]["precision"]): r for r in rows if r.get("status") == "ok"}
        ref = precisions[0]
        print(f"\n| architecture | precision | EV - EV({ref}) | L0 / L0({ref}) - 1 | speed / speed({ref}) |")
        print("| --- | --- | --- | --- | --- |")
        for (arch, prec), r in ok.items():
            base = ok.get((arch, ref))
            if prec != ref and base:
                print(f"| {arch} | {prec} | {r['explained_variance'] - base['explained_variance']:+.4f} | "
                      f"{r['l0'] / base['l0'] - 1:+.2%} | {r['tokens_per_s'] / base['tokens_per_s']:.2f}x |")


if __name__ == "__main__":
    main()
