"""A cost model of the GPU training step at real sizes, on any machine (no GPU needed).

    python benchmarks/gpu_model.py                       # every architecture, both shapes, H100, bf16
    python benchmarks/gpu_model.py --gpu h200 --precision fp32 --arch topk --top 8
    python benchmarks/gpu_model.py --shape small         # tiny sizes (what CI runs)

Each architecture's stack is built on the meta device and one real `StackTrainer.train_step`
(forward, backward, clipping, Adam, the decoder constraint, `after_step`, AuxK with `--dead` of the
latents dead) is replayed with CUDA's code path and dtypes (trainer.step_trace). Every op is
counted: FLOPs, bytes read and written, kernel launches; and the live memory over the step.

    modeled = sum over ops of max(FLOPs / peak of its dtype, bytes / HBM bandwidth) + launches x launch cost

where a gather whose table fits in L2 reads the table from HBM once. The **floor** of a step is what
no implementation can avoid: the architecture's matmuls at peak (one for the TopK family's sparse
step, five for a dense SAE, seven for a gated one), each weight read once in its compute dtype,
each gradient written once and Adam's state traffic (28 bytes a parameter: read parameter, gradient
and two moments, write parameter and moments). floor/modeled is how close the step is to it.

The constants are the lent GPUs' (shared/REFERENCE.md); `benchmarks/gpu_suite.py` prints measured /
modeled per step, which is how a lent GPU calibrates them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from trainer.registry import get_architecture, registered_architectures  # noqa: E402
from trainer.stack import StackedSAE  # noqa: E402
from trainer.step_trace import Trace, assume_dead, replay_step, resolved_kernels  # noqa: E402
from trainer.train import LoopConfig  # noqa: E402


@dataclasses.dataclass(frozen=True)
class GPU:
    """What the time model needs of a GPU."""

    name: str
    bf16_flops: float
    """Dense bf16 matmul rate, FLOP/s (measured on a large square matmul)."""
    tf32_flops: float
    fp32_flops: float
    """Plain fp32 (no tensor cores)."""
    hbm_bytes_s: float
    """Device memory bandwidth, bytes/s (a device-to-device copy's rate)."""
    l2_bytes: int
    launch_s: float
    """Seconds a kernel launch adds (the GPU's share: launch latency and tail)."""


GPUS = {
    "h100": GPU("H100 80GB", 798e12, 378e12, 67e12, 3.0e12, 50 << 20, 2.5e-6),
    "h200": GPU("H200 141GB", 790e12, 378e12, 67e12, 4.3e12, 50 << 20, 2.5e-6),
}
"""bf16 and copy rates measured on the lent machines (shared/REFERENCE.md); tf32 is ~half of bf16's
datasheet dense rate, unmeasured; the launch cost is an estimate until a GPU run calibrates it."""


@dataclasses.dataclass(frozen=True)
class Shape:
    d_in: int
    d_sae: int
    k: int
    batch: int
    runs: int


SHAPES = {
    "big": Shape(2304, 65536, 64, 4096, 1),      # Gemma-2-2B's width, a 64k dictionary
    "sweep": Shape(768, 16384, 64, 4096, 8),     # GPT-2 small, 8 runs in one stack
    "small": Shape(64, 512, 8, 256, 2),          # what CI runs
}


def op_seconds(op, gpu: GPU, precision: str) -> float:
    """The modeled seconds of one op record: the slower of its compute and its memory traffic."""
    rate = gpu.bf16_flops if op.dtype in (torch.bfloat16, torch.float16) else \
        gpu.tf32_flops if precision == "tf32" else gpu.fp32_flops
    return max(op.flops / rate if op.flops else 0.0, moved_bytes(op, gpu) / gpu.hbm_bytes_s) + op.launches * gpu.launch_s


def moved_bytes(op, gpu: GPU) -> int:
    """HBM bytes of an op: what it streams, plus its gathered rows (a table, or each part of one used
    in turn, that fits in L2 is read from HBM at most once)."""
    fits = op.table and op.table // op.table_parts <= gpu.l2_bytes
    gathered = min(op.gathered, op.table) if fits else op.gathered
    return op.read + op.written + gathered


def floor_seconds(model: torch.nn.Module, kernels: str, shape: Shape, gpu: GPU, precision: str) -> float:
    """The step's floor (module docstring)."""
    fused = getattr(model, "fused_matmuls", None)
    matmuls = fused if kernels == "fused" and fused is not None else model.dense_matmuls
    flops = matmuls * 2 * shape.batch * shape.d_in * shape.d_sae * shape.runs
    rate = gpu.bf16_flops if precision == "bf16" else gpu.tf32_flops if precision == "tf32" else gpu.fp32_flops
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    compute_bytes = 2 if precision == "bf16" else 4
    weights = sum(p.numel() * (compute_bytes if p.dim() == 3 else 4) for p in params)
    batch_bytes = 4 * shape.batch * (shape.d_in + model.W_dec.shape[-1])
    return flops / rate + (weights + 4 * n + 28 * n + batch_bytes) / gpu.hbm_bytes_s


def build(arch: str, shape: Shape) -> torch.nn.Module:
    """A stack of `shape.runs` runs of `arch` with its defaults on the meta device (the TopK family
    with k = shape.k; per-run seeds)."""
    cls = get_architecture(arch)
    fields = {f.name for f in dataclasses.fields(cls.config_class)}
    cfgs = []
    for r in range(shape.runs):
        kw = {"d_in": shape.d_in, "d_sae": shape.d_sae}
        kw.update({name: value for name, value in (("seed", r), ("k", shape.k)) if name in fields})
        cfgs.append(cls.config_class(**kw))
    with torch.device("meta"):
        return cls(cfgs)


def model_step(arch: str, shape: Shape, gpu: GPU, precision: str, dead: float,
               kernels: str = "auto") -> tuple[dict, Trace]:
    """One architecture's modeled step (`kernels` as on CUDA: auto, fused or plain): a row of the
    table, and the trace it came from."""
    model = build(arch, shape)
    kernels = resolved_kernels(model, precision, "cuda", kernels)
    trace = replay_step(model, LoopConfig(lr=1e-3, total_steps=1000, kernels=kernels), shape.batch, precision,
                        assume_dead(dead))
    seconds = sum(op_seconds(op, gpu, precision) for op in trace.ops)
    floor = floor_seconds(model, kernels, shape, gpu, precision)
    row = {"arch": arch, "kernels": kernels, "dead": dead if hasattr(model, "dead_mask") else None,
           "modeled_ms": seconds * 1e3, "floor_ms": floor * 1e3, "floor_over_modeled": floor / seconds,
           "modeled_over_floor": seconds / floor, "gb": sum(moved_bytes(o, gpu) for o in trace.ops) / 1e9,
           "tflop": trace.total("flops") / 1e12, "launches": int(trace.total("launches")), "ops": len(trace.ops),
           "peak_gb": trace.peak / 1e9, "syncs": len(trace.syncs),
           "phases_ms": {p: sum(op_seconds(o, gpu, precision) for o in trace.ops if o.phase == p) * 1e3
                         for p in ("forward", "backward", "update")}}
    return row, trace


def top_ops(trace: Trace, gpu: GPU, precision: str, n: int) -> list[dict]:
    """The `n` costliest op kinds by modeled time (grouped by name and phase)."""
    groups: dict[tuple[str, str], list] = defaultdict(lambda: [0, 0.0, 0])
    for op in trace.ops:
        g = groups[(op.name, op.phase)]
        g[0] += 1
        g[1] += op_seconds(op, gpu, precision)
        g[2] += moved_bytes(op, gpu)
    rows = [{"op": name, "phase": phase, "count": c, "ms": s * 1e3, "gb": b / 1e9}
            for (name, phase), (c, s, b) in groups.items()]
    return sorted(rows, key=lambda r: -r["ms"])[:n]


def modeled_architectures() -> list[str]:
    """Every registered architecture built on the shared stack (W_enc, W_dec: `StackedSAE`); a user's
    architecture of another shape has no floor to compare with."""
    return [a for a in registered_architectures() if issubclass(get_architecture(a), StackedSAE)]


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", choices=sorted(GPUS), default="h100")
    ap.add_argument("--precision", choices=("bf16", "tf32", "fp32"), default="bf16")
    ap.add_argument("--shape", choices=sorted(SHAPES), action="append", help="repeatable; default: big and sweep")
    ap.add_argument("--arch", action="append", help="repeatable; default: every registered architecture")
    ap.add_argument("--dead", type=float, nargs="+", default=[0.1, 0.0],
                    help="fractions of dead latents to model for architectures with AuxK")
    ap.add_argument("--top", type=int, default=5, help="costliest ops listed per step")
    ap.add_argument("--json", type=Path, help="also write every row (and its top ops) to this file")
    args = ap.parse_args(argv)
    gpu = GPUS[args.gpu]
    rows = []
    for shape_name in args.shape or ["big", "sweep"]:
        shape = SHAPES[shape_name]
        print(f"\n### {shape_name}: d_in {shape.d_in}, d_sae {shape.d_sae}, k {shape.k}, batch {shape.batch}, "
              f"R {shape.runs}; {gpu.name}, {args.precision}\n")
        print("| arch | kernels | dead | modeled ms | floor ms | modeled/floor | fwd / bwd / update ms | GB moved "
              "| TFLOP | launches | peak GB | syncs |")
        print("| --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
        tops = []
        for arch in args.arch or modeled_architectures():
            deads = args.dead if hasattr(build(arch, SHAPES["small"]), "dead_mask") else [None]
            for dead in deads:
                row, trace = model_step(arch, shape, gpu, args.precision, dead or 0.0)
                row.update(shape=shape_name, gpu=args.gpu, precision=args.precision,
                           top=top_ops(trace, gpu, args.precision, args.top))
                rows.append(row)
                ph = row["phases_ms"]
                print(f"| {arch} | {row['kernels']} | {'' if dead is None else f'{dead:.0%}'} | {row['modeled_ms']:.2f} "
                      f"| {row['floor_ms']:.2f} | {row['modeled_over_floor']:.2f} | {ph['forward']:.2f} / "
                      f"{ph['backward']:.2f} / {ph['update']:.2f} | {row['gb']:.1f} | {row['tflop']:.2f} "
                      f"| {row['launches']} | {row['peak_gb']:.1f} | {row['syncs']} |")
                tops.append((arch, dead, row["top"]))
        if args.top:
            print(f"\nCostliest ops ({shape_name}): name (phase) x count: modeled ms, GB\n")
            for arch, dead, top in tops:
                label = arch if dead is None else f"{arch} ({dead:.0%} dead)"
                print(f"- {label}: " + "; ".join(f"{t['op']} ({t['phase']}) x{t['count']}: {t['ms']:.2f} ms, "
                                                 f"{t['gb']:.1f} GB" for t in top))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
