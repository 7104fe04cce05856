"""Ours with defaults against a tuned SAELens, on the same rows, judged by the same held-out code.

    .venv/bin/python benchmarks/bench_vs_saelens.py --cache caches/default [--cache DIR:HOOK] \\
        [--tokens 1000000 8000000] [--arch topk --arch batchtopk --arch jumprelu --arch standard] \\
        [--d-sae 2048] [--k 32] [--lr 3e-4 1e-3 3e-3] [--b-dec zero mean] [--tune-all] [--fix ARCH=LR:BDEC] [--out DIR]

For each cache (`DIR` or `DIR:HOOK`), run length and architecture:

- **SAELens** (6.x, `SAETrainer` with constant lr) trains on the batches our loader yields for a run
  with the same seed and batch size (the two-level shuffle of `pipeline.loader`, the same rows in
  the same order as ours), once per lr in `--lr` and b_dec in `--b-dec` (`zero`: SAELens's init,
  `mean`: the first batch's mean), at the first run length; a longer run reuses the setting that won
  there (`--tune-all`: the whole grid at every length; `--fix ARCH=LR:BDEC` skips it; on 2 CPU
  cores an 8M-token SAELens run takes about 4 minutes). Its sparsity: k for topk/batchtopk, its
  default coefficients otherwise (l1 5 for standard, l0 1 for jumprelu). The one with the best eval
  explained variance is kept (for jumprelu and standard, among the grid points with L0 <= `--max-l0`:
  their L0 moves with lr and b_dec, and a denser code always reconstructs better); it is saved with
  `save_inference_model` and loaded back with `SAE.load_from_disk`.
- **Ours**: `pipeline train` with its defaults (`TrainConfig()`), k for topk/batchtopk (the k
  nearest SAELens's measured L0 where that is more than 1% off k: its BatchTopK export can be), and
  for jumprelu and standard `--target-l0` set to the L0 the kept SAELens run measured.
- **Both** exports are loaded by SAELens and evaluated by one function on the cache's whole eval
  split: explained variance (against the split's mean) and L0.

Prints a markdown table per (cache, tokens) and the EV difference at (near) equal L0.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch

from pipeline.loader import ActivationLoader
from pipeline.malloc import tune_malloc
from trainer.run import TrainConfig, run_train


@torch.no_grad()
def held_out(sae, cache: str, hook: str | None) -> dict:
    """Explained variance, L0 and dead fraction (latents that never fire) of a SAELens SAE over the
    cache's eval split (float64 sums)."""
    loader = ActivationLoader(cache, hooks=hook, batch_size=4096, split="eval", drop_last=False)
    sq = fired = rows = 0
    y_sum = y_sq = ever = None
    for x in loader:
        x = x.float()
        acts = sae.encode(x)
        sq += float((sae.decode(acts) - x).double().pow(2).sum())
        fired += int((acts > 0).sum())
        ever = (acts > 0).any(0) if ever is None else ever | (acts > 0).any(0)
        rows += len(x)
        s, q = x.double().sum(0), x.double().pow(2).sum()
        y_sum, y_sq = (s, q) if y_sum is None else (y_sum + s, y_sq + q)
    total = float(y_sq - y_sum.pow(2).sum() / rows)
    return {"ev": 1 - sq / total, "l0": fired / rows, "dead": 1 - float(ever.float().mean())}


def saelens_sae(arch: str, d_in: int, d_sae: int, k: int):
    """A fresh SAELens training SAE of `arch` (its defaults but for k)."""
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    common = {"d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu"}
    if arch == "topk":
        return TopKTrainingSAE(TopKTrainingSAEConfig(k=k, **common))
    if arch == "batchtopk":
        return BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(k=k, **common))
    if arch == "jumprelu":
        return JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(**common))
    if arch == "standard":
        return StandardTrainingSAE(StandardTrainingSAEConfig(l1_coefficient=5.0, **common))
    raise SystemExit(f"no SAELens counterpart for {arch!r}")


def train_saelens(arch: str, cache: str, hook: str | None, tokens: int, d_sae: int, k: int, lr: float,
                  b_dec: str, out: Path, batch_size: int = 4096, seed: int = 0):
    """Train one SAELens SAE on our loader's batches; returns it loaded back from its inference save."""
    import sae_lens
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(seed)
    loader = ActivationLoader(cache, hooks=hook, batch_size=batch_size, seed=seed, tokens=tokens)
    d_in = loader.source.hooks[loader.hooks[0]]
    sae = saelens_sae(arch, d_in, d_sae, k)
    batches = (b.float() for b in loader)
    first = next(batches)
    if b_dec == "mean":
        with torch.no_grad():
            sae.b_dec.copy_(first.mean(0))

    def provider():
        yield first
        yield from batches

    cfg = SAETrainerConfig(total_training_samples=tokens // batch_size * batch_size,
                           train_batch_size_samples=batch_size, lr=lr, lr_end=lr, lr_scheduler_name="constant",
                           device="cpu")
    SAETrainer(cfg, sae, provider()).fit()
    sae.save_inference_model(out)
    return sae_lens.SAE.load_from_disk(str(out), device="cpu")


def best_of(grid: list[tuple[float, str, dict]], max_l0: float | None) -> tuple[float, str, dict]:
    """The grid point with the best explained variance; with `max_l0` (a penalty's L0 moves with
    lr and b_dec, and a denser code always reconstructs better) among those at most that dense, or
    the sparsest when none is."""
    finite = [g for g in grid if math.isfinite(g[2]["ev"])]
    if max_l0 is not None:
        sparse = [g for g in finite if g[2]["l0"] <= max_l0]
        if not sparse:
            return min(finite, key=lambda g: g[2]["l0"])
        finite = sparse
    return max(finite, key=lambda g: g[2]["ev"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", action="append", help="DIR or DIR:HOOK (repeatable; default caches/default)")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1_000_000, 8_000_000])
    ap.add_argument("--arch", action="append", help="default: topk, batchtopk, jumprelu, standard")
    ap.add_argument("--d-sae", type=int, default=2048)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--lr", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3])
    ap.add_argument("--b-dec", nargs="+", default=["zero", "mean"], choices=["zero", "mean"])
    ap.add_argument("--tune-all", action="store_true", help="search SAELens's grid at every run length")
    ap.add_argument("--max-l0", type=float, default=128, help="jumprelu, standard: SAELens's best is chosen among "
                    "the grid points at most this dense (its default coefficients give L0 in the thousands at a low lr)")
    ap.add_argument("--fix", action="append", default=[], metavar="ARCH=LR:BDEC",
                    help="skip SAELens's grid for ARCH: train it at this setting (e.g. one a shorter run chose)")
    ap.add_argument("--out", help="keep the runs here (default: a temporary directory)")
    args = ap.parse_args()
    tune_malloc()
    import sae_lens

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        tuned: dict[tuple[str, str], tuple[float, str]] = {}  # (cache, arch) -> the grid's winner
        for fix in args.fix:
            arch, _, setting = fix.partition("=")
            lr, _, b_dec = setting.partition(":")
            for spec in args.cache or ["caches/default"]:
                tuned[spec, arch] = (float(lr), b_dec)
        for spec in args.cache or ["caches/default"]:
            cache, _, hook = spec.partition(":")
            hook = hook or None
            for tokens in args.tokens:
                print(f"\n{spec}, {tokens:,} tokens, d_sae {args.d_sae}, batch 4096\n")
                print("| architecture | SAELens lr, b_dec (best of the grid) | SAELens L0 | SAELens EV | SAELens dead | "
                      "ours L0 | ours EV | ours dead | EV ours - SAELens | L0 ours / SAELens - 1 | "
                      "SAELens grid (lr b_dec: L0 EV dead) |")
                print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
                for arch in args.arch or ["topk", "batchtopk", "jumprelu", "standard"]:
                    grid, t0 = [], time.perf_counter()
                    settings = ([(lr, b_dec) for lr in args.lr for b_dec in args.b_dec]
                                if args.tune_all or (spec, arch) not in tuned else [tuned[spec, arch]])
                    for lr, b_dec in settings:
                        where = root / f"{Path(cache).name}-{tokens}" / f"saelens-{arch}-{lr:g}-{b_dec}"
                        sae = train_saelens(arch, cache, hook, tokens, args.d_sae, args.k, lr, b_dec, where)
                        grid.append((lr, b_dec, held_out(sae, cache, hook)))
                    lr, b_dec, theirs = best_of(grid, None if arch in ("topk", "batchtopk") else args.max_l0)
                    tuned.setdefault((spec, arch), (lr, b_dec))
                    # Equal L0: SAELens's BatchTopK export can end off its k (its threshold); then ours
                    # trains at the k nearest the L0 SAELens measured.
                    target = (round(theirs["l0"], 2) if arch not in ("topk", "batchtopk")
                              else args.k if abs(theirs["l0"] / args.k - 1) <= 0.01 else round(theirs["l0"]))
                    m = run_train(TrainConfig(cache=cache, hook=hook, out=str(root / f"{Path(cache).name}-{tokens}"),
                                              name=f"ours-{arch}", arch=arch, d_sae=args.d_sae, tokens=tokens,
                                              target_l0=target, wandb=False, checkpoint_every=0, log_every=10_000))
                    ours = held_out(sae_lens.SAE.load_from_disk(m["run_dir"], device="cpu"), cache, hook)
                    cells = "; ".join(f"{g[0]:g} {g[1]}: {g[2]['l0']:.1f} {g[2]['ev']:.3f} {g[2]['dead']:.1%}"
                                      for g in grid)
                    print(f"| {arch} | {lr:g}, {b_dec} | {theirs['l0']:.2f} | {theirs['ev']:.4f} | {theirs['dead']:.1%} | "
                          f"{ours['l0']:.2f} | {ours['ev']:.4f} | {ours['dead']:.1%} | {ours['ev'] - theirs['ev']:+.4f} | "
                          f"{ours['l0'] / theirs['l0'] - 1:+.1%} | "
                          f"{cells} |", flush=True)
                    print(f"<!-- {arch}: {time.perf_counter() - t0:.0f} s -->", flush=True)


if __name__ == "__main__":
    main()
