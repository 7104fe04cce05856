"""Does an exported BatchTopK / Matryoshka SAE keep the training k? Its L0 as SAELens runs it.

    .venv/bin/python benchmarks/bench_export_l0.py --cache caches/default \\
        --cache caches/transcoder:blocks.0.hook_mlp_out [--tokens 200000 2000000] [--k 32] [--d-sae 1024]

For each cache (`DIR` or `DIR:HOOK`), architecture and run length, `pipeline train` trains one SAE
(k fixed; its export is a JumpReLU whose threshold `calibrate` sets on train rows), then SAELens 6.x
loads the export from disk and encodes the cache's whole eval split, raw activations as stored.
Prints a markdown table: the eval L0 SAELens measures, against k (the goal: within 5%).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from pipeline.loader import ActivationLoader
from pipeline.malloc import tune_malloc
from trainer.run import TrainConfig, run_train


@torch.no_grad()
def saelens_l0(run_dir: Path, cache: str, hook: str | None) -> float:
    """Mean L0 of the export at `run_dir`, loaded by SAELens, over the cache's eval split."""
    import sae_lens

    sae = sae_lens.SAE.load_from_disk(str(run_dir), device="cpu")
    loader = ActivationLoader(cache, hooks=hook, batch_size=4096, split="eval", drop_last=False)
    fired = rows = 0
    for x in loader:
        fired += int((sae.encode(x.float()) > 0).sum())
        rows += len(x)
    return fired / rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", action="append", help="DIR or DIR:HOOK (repeatable; default caches/default)")
    ap.add_argument("--tokens", type=int, nargs="+", default=[200_000, 2_000_000])
    ap.add_argument("--arch", action="append", help="default: batchtopk, matryoshka")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--d-sae", type=int, default=1024)
    args = ap.parse_args()
    tune_malloc()
    print("| cache | architecture | tokens | k | eval L0 (SAELens) | L0 / k - 1 | eval explained variance |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.cache or ["caches/default"]:
            cache, _, hook = spec.partition(":")
            for arch in args.arch or ["batchtopk", "matryoshka"]:
                for tokens in args.tokens:
                    out = Path(tmp) / f"{Path(cache).name}-{tokens}"
                    m = run_train(TrainConfig(cache=cache, hook=hook or None, out=str(out), arch=arch, k=args.k,
                                              d_sae=args.d_sae, tokens=tokens, wandb=False, checkpoint_every=0,
                                              log_every=10_000))
                    l0 = saelens_l0(Path(m["run_dir"]), cache, hook or None)
                    print(f"| {spec} | {arch} | {tokens:,} | {args.k} | {l0:.2f} | {l0 / args.k - 1:+.1%} | "
                          f"{m['eval_explained_variance'][0]:.3f} |", flush=True)


if __name__ == "__main__":
    main()
