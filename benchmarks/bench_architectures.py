"""Every architecture on the default cache at a comparable L0: quality, CE loss recovered, speed.

    .venv/bin/python benchmarks/bench_architectures.py --cache caches/default [--tokens 2000000] \\
        [--d-sae 1024] [--l0 32] [--contexts 64]

One `pipeline sweep` pass trains one run per architecture (k = the target L0 for the k-based
ones; for the penalty-based ones the coefficient in PENALTIES, chosen by a calibration sweep on
this cache to land near that L0 — pass `--penalty gated=2` to change one). Then each export is
evaluated on the cache's eval split (explained variance, L0, dead fraction) and spliced into the
cache's model (`pipeline eval`: CE loss recovered against zero and mean ablation, KL).
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from pipeline.malloc import tune_malloc
from trainer.evaluate_ce import EvalConfig, evaluate_ce
from trainer.registry import registered_architectures
from trainer.run import ARCH_FIELDS, arch_fields
from trainer.sweep import run_sweep

# Coefficients for L0 near 32 on the default cache (d_sae 1024, 2M tokens, lr 1e-3).
PENALTIES = {"standard": {"l1": 5.0}, "gated": {"l1": 2.0}, "jumprelu": {"l0": 0.05}}


def run_for(arch: str, l0: int, penalties: dict) -> dict:
    names = arch_fields(arch)
    if "k" in names:
        return {"arch": arch, "k": l0}
    if arch in penalties:
        return {"arch": arch, **penalties[arch]}
    knob = next((ours for ours, theirs in ARCH_FIELDS.items() if theirs in names and ours in ("l1", "l0")), None)
    if knob is None:
        raise SystemExit(f"don't know how to set the sparsity of {arch!r}; pass --penalty {arch}=VALUE")
    return {"arch": arch}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default="caches/default")
    ap.add_argument("--tokens", type=int, default=2_000_000)
    ap.add_argument("--d-sae", type=int, default=1024)
    ap.add_argument("--l0", type=int, default=32)
    ap.add_argument("--contexts", type=int, default=64)
    ap.add_argument("--arch", action="append", help="default: every registered architecture")
    ap.add_argument("--penalty", action="append", default=[], help="ARCH=VALUE for its l1 or l0 coefficient")
    ap.add_argument("--out", help="keep the runs here (default: a temporary directory)")
    args = ap.parse_args()
    tune_malloc()
    penalties = {k: dict(v) for k, v in PENALTIES.items()}
    for item in args.penalty:
        arch, value = item.split("=")
        knob = "l0" if "l0_coefficient" in arch_fields(arch) else "l1"
        penalties[arch] = {knob: float(value)}
    runs = [run_for(a, args.l0, penalties) for a in args.arch or registered_architectures()]
    for r in runs:
        r["name"] = r["arch"]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        spec = {"base": {"cache": args.cache, "out": str(out), "d_sae": args.d_sae, "tokens": args.tokens,
                         "batch_size": 4096, "lr": 1e-3, "log_every": 100, "wandb": False,
                         "checkpoint_every": 10**9},
                "runs": runs}
        rows = run_sweep(spec, {}, name="architectures")
        table = []
        for row in rows:
            ce = evaluate_ce(EvalConfig(sae=str(out / row["run"]), cache=args.cache, contexts=args.contexts))
            table.append((row, ce))
    print(f"\n{args.tokens:,} tokens per run, d_sae {args.d_sae}, target L0 {args.l0}, "
          f"CE on {args.contexts} eval contexts\n")
    print("| architecture | setting | eval L0 | eval explained variance | dead fraction | CE recovered (zero abl.) "
          "| CE recovered (mean abl.) | KL (nats) | tokens/s in the sweep |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row, ce in table:
        print(f"| {row['arch']} | {row['k_or_coefficient']:g} | {row['l0']:.1f} | {row['explained_variance']:.3f} | "
              f"{row['dead_fraction']:.3f} | {ce['ce_recovered_zero']:.3f} | {ce['ce_recovered_mean']:.3f} | "
              f"{ce['kl_spliced']:.3f} | {row['tokens_per_s']:,.0f} |")


if __name__ == "__main__":
    main()
