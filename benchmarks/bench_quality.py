"""Measured SAE quality: how well each registered architecture recovers known features.

Writes a synthetic cache with a known ground truth (benchmarks/synthetic.py: `--n-features` unit
directions in `--d` dimensions, power-law firing frequencies, `--mean-l0` active features per row
on average, non-negative magnitudes, a mean offset and a little noise), trains every registered
architecture on it through the real pipeline (ActivationLoader -> train_stack), and prints, per
architecture: L0 (last training batch, and on the eval split), explained variance on the eval
split, feature recovery (mean over the true features of the best cosine with a decoder row), the
fraction of true features recovered with cosine > 0.9, the dead fraction (latents that never fire
on the eval split) and training tokens/s.

Each architecture is pointed at the same sparsity: topk-like ones (a `k` field) get k = mean L0;
penalty-based ones get the per-architecture coefficient in PENALTIES, chosen so that they land at a
comparable L0 on the default data (`--penalty ARCH=VALUE` overrides one). Penalty warm-ups last
the first 10% of steps, and AuxK counts a latent dead after a tenth of the rows without firing.
Training uses one torch thread by default (`--threads`): on a shared 2-core CPU, two threads made
a step ~20x slower. tokens/s is rows trained per second of `train_stack` (data loading included).

    .venv/bin/python benchmarks/bench_quality.py                    # every registered architecture
    .venv/bin/python benchmarks/bench_quality.py --arch topk --arch jumprelu --rows 200000 --out q.md
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks.synthetic` as a script too

from benchmarks.synthetic import SyntheticSpec, max_cosines, write_synthetic_cache  # noqa: E402
from pipeline.loader import ActivationLoader  # noqa: E402
from pipeline.malloc import tune_malloc  # noqa: E402
from trainer.registry import get_architecture, registered_architectures  # noqa: E402
from trainer.run import evaluate  # noqa: E402
from trainer.train import LoopConfig, train_stack  # noqa: E402

# The sparsity knob of penalty-based architectures (by config field), tuned by hand on the default
# data (d 64, 512 features, mean L0 5, 300k rows, d_sae 1024, batch 256, lr 1e-2) to land near the
# true L0 of 5 (measured: standard 0.5 -> L0 10.7, 1.0 -> 5.3; gated 0.5 -> 258, 2 -> 4.1, 5 -> 0;
# jumprelu 0.05 -> 22, 0.15 -> 4.2, 0.3 -> 2.8).
PENALTIES: dict[str, dict[str, float]] = {
    "standard": {"l1_coefficient": 1.0},
    "gated": {"l1_coefficient": 2.0},
    "jumprelu": {"l0_coefficient": 0.15},
}
# Fields that set the sparsity of an architecture not listed above, tried in this order.
PENALTY_FIELDS = ("l1_coefficient", "l0_coefficient", "sparsity_coefficient")
RECOVERED = 0.9


def build(arch: str, d_in: int, d_sae: int, target_l0: float, rows: int, steps: int, seed: int,
          penalty: dict[str, dict[str, float]]) -> tuple[torch.nn.Module, str]:
    """One run of `arch` aimed at `target_l0` latents per row, and a label of its sparsity knob."""
    cls = get_architecture(arch)
    names = set(cls.config_class.__dataclass_fields__)
    fields: dict = {"d_in": d_in, "d_sae": d_sae, "seed": seed}
    if "k" in names:
        fields["k"] = max(1, round(target_l0))
        knob = f"k={fields['k']}"
    else:
        chosen = penalty.get(arch) or PENALTIES.get(arch) or {}
        if not chosen:
            field = next((f for f in PENALTY_FIELDS if f in names), None)
            chosen = {field: 0.5} if field else {}
        fields.update(chosen)
        knob = ", ".join(f"{k.split('_')[0]}={v:g}" for k, v in chosen.items()) or "defaults"
    for name in names:  # sparsity-penalty warm-ups over the first 10% of steps
        if name.endswith("_warmup_steps"):
            fields[name] = max(1, steps // 10)
    if "dead_tokens_threshold" in names:  # AuxK within a short run: "dead" after ~1/10 of it
        fields["dead_tokens_threshold"] = max(1, rows // 10)
    return cls([cls.config_class(**fields)]), knob


def parse_penalties(items: list[str]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for item in items:
        arch, _, value = item.partition("=")
        if not value:
            raise SystemExit(f"--penalty takes ARCH=VALUE, got {item!r}")
        cls = get_architecture(arch)
        names = cls.config_class.__dataclass_fields__
        field = next((f for f in PENALTY_FIELDS if f in names), None)
        if field is None:
            raise SystemExit(f"{arch} has none of the penalty fields {', '.join(PENALTY_FIELDS)}")
        out[arch] = {field: float(value)}
    return out


def run_one(arch: str, data, args, penalty: dict) -> dict:
    steps = math.ceil(args.rows / args.batch_size)
    model, knob = build(arch, args.d, args.d_sae, args.mean_l0, args.rows, steps, args.seed, penalty)
    loader = ActivationLoader(data.path, hooks="x", batch_size=args.batch_size, seed=args.seed, tokens=args.rows)
    loop = LoopConfig(lr=args.lr, lr_warmup_steps=max(1, steps // 20), lr_decay="cosine", total_steps=steps,
                      log_every=steps)
    t0 = time.perf_counter()
    last = train_stack(model, loader, loop, log=None)
    seconds = time.perf_counter() - t0
    loader.close()
    held = list(ActivationLoader(data.path, hooks="x", batch_size=4096, split="eval"))
    metrics, _ = evaluate(model, held)
    cos = max_cosines(data.directions, model.W_dec)[0]
    return {
        "arch": arch, "knob": knob, "d_sae": args.d_sae, "l0_train": last["l0"][0], "l0_eval": metrics["eval_l0"][0],
        "ev_eval": metrics["eval_explained_variance"][0], "recovery": float(cos.mean()),
        "recovered": float((cos > RECOVERED).float().mean()), "dead": metrics["eval_dead_fraction"][0],
        "tokens_per_s": args.rows / seconds, "seconds": seconds, "failed": bool(last.get("failed")),
    }


COLUMNS = ("architecture", "sparsity", "d_sae", "L0 train", "L0 eval", "eval EV", "recovery (mean max cos)",
           f"recovered (cos > {RECOVERED})", "dead", "tokens/s")


def table(results: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join(" --- " for _ in COLUMNS) + "|"]
    for r in results:
        cells = (r["arch"] + (" (diverged)" if r["failed"] else ""), r["knob"], str(r["d_sae"]), f"{r['l0_train']:.2f}",
                 f"{r['l0_eval']:.2f}", f"{r['ev_eval']:.3f}", f"{r['recovery']:.3f}", f"{r['recovered']:.3f}",
                 f"{r['dead']:.3f}", f"{r['tokens_per_s']:,.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", action="append", default=None, help="architecture (repeatable; default: all registered)")
    ap.add_argument("--rows", type=int, default=300_000, help="train rows (written and trained on, one epoch)")
    ap.add_argument("--eval-rows", type=int, default=20_000)
    ap.add_argument("--d", type=int, default=64, help="width of the activations")
    ap.add_argument("--n-features", type=int, default=512, help="true features (superposition: > d)")
    ap.add_argument("--mean-l0", type=float, default=5.0, help="true active features per row, on average")
    ap.add_argument("--alpha", type=float, default=0.5, help="power-law exponent of the feature frequencies")
    ap.add_argument("--d-sae", type=int, default=None, help="latents (default 2 x n_features)")
    ap.add_argument("--batch-size", type=int, default=256, help="small batches: more steps for the same rows")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared 2-core CPU, 2 threads ran a step ~20x slower)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--penalty", action="append", default=[], metavar="ARCH=VALUE",
                    help="sparsity coefficient of a penalty-based architecture (repeatable)")
    ap.add_argument("--cache", default=None, help="write the synthetic cache here (default: a temporary folder)")
    ap.add_argument("--out", default=None, help="also write the markdown table to this file")
    args = ap.parse_args(argv)
    args.d_sae = args.d_sae or 2 * args.n_features
    tune_malloc()
    torch.set_num_threads(args.threads)
    archs = args.arch or registered_architectures()
    for a in archs:
        get_architecture(a)  # an unknown name fails now, listing the registered ones
    penalty = parse_penalties(args.penalty)
    spec = SyntheticSpec(d=args.d, n_features=args.n_features, mean_l0=args.mean_l0, alpha=args.alpha, seed=args.seed)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        data = write_synthetic_cache(Path(args.cache) if args.cache else Path(tmp) / "synthetic", spec,
                                     rows=args.rows, eval_rows=args.eval_rows, overwrite=bool(args.cache))
        print(f"synthetic cache: {args.rows:,} train + {args.eval_rows:,} eval rows, d {args.d}, "
              f"{args.n_features} features (alpha {args.alpha}), mean L0 {data.mean_l0():.2f}, "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
        for arch in archs:
            try:
                r = run_one(arch, data, args, penalty)
            except Exception as e:  # noqa: BLE001 - report and go on to the next architecture
                print(f"{arch}: failed: {type(e).__name__}: {e}", flush=True)
                continue
            results.append(r)
            print(f"{arch:11s} {r['knob']:10s} L0 {r['l0_train']:.2f}/{r['l0_eval']:.2f}  EV {r['ev_eval']:.3f}  "
                  f"recovery {r['recovery']:.3f}  recovered {r['recovered']:.3f}  dead {r['dead']:.3f}  "
                  f"{r['tokens_per_s']:,.0f} tok/s ({r['seconds']:.0f} s)", flush=True)
    text = table(results)
    header = (f"Synthetic data: d {args.d}, {args.n_features} features, power law alpha {args.alpha}, mean L0 "
              f"{args.mean_l0:g}, {args.rows:,} train rows (one epoch, batch {args.batch_size}, lr {args.lr:g}), "
              f"{args.eval_rows:,} eval rows, seed {args.seed}; torch threads {torch.get_num_threads()}.\n")
    print("\n" + header + "\n" + text)
    if args.out:
        Path(args.out).write_text(header + "\n" + text + "\n")
    return results


if __name__ == "__main__":
    main()
