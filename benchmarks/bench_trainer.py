"""Training-step throughput against the step's dense matmuls alone, measured in the same run.

    python benchmarks/bench_trainer.py [--arch topk --arch standard] [--d-sae 2048 4096 ...]
        [--d-in 128] [--batch-size 4096] [--steps 10] [--threads N] [--malloc-d-sae 8192]

For each architecture (default: every registered one) and d_sae, one run (R=1):
- step: one step of the training loop itself (`StackTrainer.train_step`): forward, backward of
  the summed loss, per-run clipping and Adam (`StackedAdam`), the decoder-norm constraint (where
  the architecture has `unit_norm_decoder`), `after_step`, the dead-latent firing counts;
- dense: the dense matmuls of an SAE step of that shape, the limit a dense implementation meets:
  encoder forward (B x d_in @ d_in x d_sae), decoder forward (B x d_sae @ d_sae x d_in), grad W_dec
  (d_sae x B @ B x d_in), grad latents (B x d_in @ d_in x d_sae), grad W_enc (d_in x B @ B x d_sae),
  with the same torch threads; plus, for an architecture whose `dense_matmuls` says so, its extra
  ones (a gated SAE's second decoder forward and its gradient: 7).
The two are interleaved step by step after a warm-up, and the medians are compared:
ratio = dense / step (>= 0.9 is the goal; a TopK step with a sparse decoder can exceed 1).

The glibc malloc fix (`pipeline.malloc.tune_malloc`) is applied in
this process; its effect is shown by running `--malloc-d-sae` again in a subprocess without it
(PIPELINE_NO_MALLOC_TUNING=1, no MALLOC_* variables), since mallopt cannot be undone in-process.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.malloc import tune_malloc  # noqa: E402
from trainer.train import LoopConfig, StackTrainer  # noqa: E402
from trainer.registry import get_architecture, registered_architectures  # noqa: E402

# Values for config fields without a default (the sparsity of TopK-like architectures).
REQUIRED_FIELDS = {"k": 32}


def make_model(arch: str, d_in: int, d_sae: int) -> torch.nn.Module:
    """One run of `arch` with its config's defaults, d_in, d_sae and REQUIRED_FIELDS."""
    cls = get_architecture(arch)
    kwargs = {"d_in": d_in, "d_sae": d_sae}
    for f in dataclasses.fields(cls.config_class):
        if f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            if f.name not in REQUIRED_FIELDS:
                raise SystemExit(f"architecture {arch!r}: no benchmark value for required field {f.name!r}")
            kwargs[f.name] = REQUIRED_FIELDS[f.name]
    return cls([cls.config_class(**kwargs)])


def training_step(model: torch.nn.Module, batches: list[torch.Tensor]) -> Callable[[], None]:
    """A closure taking one step of the training loop itself (`StackTrainer.train_step`): forward,
    the per-run NaN checks and lr schedule, backward, clipping, Adam, the decoder-norm constraint,
    `after_step` and the firing counts. The forward's output is kept until the next step, as there."""
    trainer = StackTrainer(model, LoopConfig(lr=1e-4, max_grad_norm=1.0))
    state = {"step": 0, "out": None}

    def step() -> None:
        state["out"] = trainer.train_step(batches[state["step"] % len(batches)])
        state["step"] += 1

    return step


def dense_matmuls(B: int, d_in: int, d_sae: int, n: int = 5, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> Callable[[], None]:
    """A closure running the dense matmuls of one SAE step of this shape: the five every SAE has,
    then pairs of a second decoder forward and its gradient to the latents (a gated SAE's
    auxiliary reconstruction: n = 7), on `device` in `dtype`. Drawn on `device` itself (on a GPU, a
    d_in x d_sae of 151M values drawn on the host takes seconds)."""
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=device).to(dtype)

    x, go = randn(B, d_in), randn(B, d_in)
    W_enc, W_dec = randn(d_in, d_sae), randn(d_sae, d_in)
    if n < 5 or (n - 5) % 2:
        raise SystemExit(f"dense_matmuls {n}: expected 5 plus pairs (5, 7, ...)")

    def run() -> None:
        latents = x @ W_enc                    # encoder forward
        latents @ W_dec                        # decoder forward
        latents.t() @ go                       # grad W_dec
        grad_latents = go @ W_dec.t()          # grad latents
        x.t() @ grad_latents                   # grad W_enc
        for _ in range((n - 5) // 2):
            latents @ W_dec                    # another decoder forward
            go @ W_dec.t()                     # its gradient to the latents

    return run


def measure(arch: str, d_in: int, d_sae: int, B: int, steps: int, warmup: int) -> dict:
    model = make_model(arch, d_in, d_sae)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(B, d_in, generator=g) for _ in range(4)]
    model.init_b_dec(batches[0], "mean")
    step, bound = training_step(model, batches), dense_matmuls(B, d_in, d_sae, model.dense_matmuls)
    for _ in range(warmup):
        step()
        bound()
    t_step, t_bound = [], []
    for _ in range(steps):  # interleaved, so load from others sharing the cores hits both alike
        t0 = time.perf_counter()
        step()
        t1 = time.perf_counter()
        bound()
        t2 = time.perf_counter()
        t_step.append(t1 - t0)
        t_bound.append(t2 - t1)
    step_s, bound_s = statistics.median(t_step), statistics.median(t_bound)
    return {"arch": arch, "d_sae": d_sae, "matmuls": model.dense_matmuls, "step_ms": step_s * 1e3, "dense_ms": bound_s * 1e3,
            "ratio": bound_s / step_s, "tokens_per_s": B / step_s}


def without_malloc_fix(args: argparse.Namespace, arch: str, d_sae: int) -> dict:
    """The same measurement in a fresh interpreter whose glibc malloc is left as it comes."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["PIPELINE_NO_MALLOC_TUNING"] = "1"
    cmd = [sys.executable, __file__, "--arch", arch, "--d-sae", str(d_sae), "--d-in", str(args.d_in),
           "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--threads", str(args.threads), "--json"]
    done = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", action="append", help="repeatable; default: every registered architecture")
    ap.add_argument("--d-sae", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768])
    ap.add_argument("--d-in", type=int, default=128, help="128: the default cache's width (GPT-2: 768)")
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=10, help="timed steps (medians are reported)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--malloc-d-sae", type=int, nargs="*", default=[8192],
                    help="sizes also run without the malloc fix (in a subprocess); none to skip")
    ap.add_argument("--json", action="store_true", help="print the rows as one JSON line (for the subprocess)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    tuned = tune_malloc()
    archs = args.arch or registered_architectures()
    rows = [measure(a, args.d_in, s, args.batch_size, args.steps, args.warmup) for a in archs for s in args.d_sae]
    if args.json:
        print(json.dumps(rows))
        return

    env_fix = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    malloc = (f"MALLOC_MMAP_THRESHOLD_={env_fix} (environment)" if env_fix
              else "tune_malloc (mallopt)" if tuned else "none (not glibc, or disabled)")
    print(f"torch {torch.__version__}, {args.threads} threads, {platform.processor() or platform.machine()}, "
          f"malloc fix: {malloc}; batch {args.batch_size}, d_in {args.d_in}, R=1, "
          f"median of {args.steps} interleaved steps after {args.warmup} warm-up\n")
    print("| arch | d_sae | step ms | dense matmuls | dense-matmul ms | ratio dense/step | tokens/s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['arch']} | {r['d_sae']} | {r['step_ms']:.1f} | {r['matmuls']} | {r['dense_ms']:.1f} | {r['ratio']:.2f} "
              f"| {r['tokens_per_s']:,.0f} |")

    sizes = [s for s in args.malloc_d_sae if s in args.d_sae]
    if not sizes:
        return
    print("\nglibc malloc fix: the same step in a subprocess without it (PIPELINE_NO_MALLOC_TUNING=1, "
          "no MALLOC_* variables)\n")
    print("| arch | d_sae | step ms, fix | step ms, no fix | ratio, fix | ratio, no fix | speed-up |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        if r["d_sae"] in sizes:
            n = without_malloc_fix(args, r["arch"], r["d_sae"])
            print(f"| {r['arch']} | {r['d_sae']} | {r['step_ms']:.1f} | {n['step_ms']:.1f} | {r['ratio']:.2f} "
                  f"| {n['ratio']:.2f} | {n['step_ms'] / r['step_ms']:.2f}x |")


if __name__ == "__main__":
    main()
