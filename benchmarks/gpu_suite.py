"""The prepared GPU benchmark: every GPU figure the project reports, measured in one command.

    python3 benchmarks/gpu_suite.py --out DIR          # on one H100/H200 (--budget-s 420: 7 minutes)
    python3 benchmarks/gpu_suite.py --smoke --out DIR  # the same code at tiny sizes on a CPU (CI)

On a GPU machine with nothing installed but its own Python and torch, run it through
`make bench-gpu` (installs the wheel folder made by `make gpu-wheels`, see BENCHMARKS.md). It writes
DIR/gpu_suite.json (every number, written after each item, so a run cut short keeps what it
measured) and DIR/gpu_suite.md (the tables), and prints the tables last. Scratch data (the loader's
~3 GB cache, the writer's output) goes to a temporary directory (`--scratch`), removed at the end.

Time: `--budget-s` (default 420 s: with the machine's start, the wheel install and the imports, one
10-minute device call) is shared among the sections, each given a share of what is left when it
starts; every item of every section estimates its own time first and is skipped, with the reason
recorded in its row, when that does not fit what is left. The estimates come from the cost model
(below) scaled by the median measured / modeled so far in this run, or from what was measured.

Sections, in this order:

- env: the GPU, torch, and which optional packages import.
- peak: the limits measured in this run: a large bf16 / tf32 / fp32 matmul (TFLOP/s), a
  device-to-device copy and a pinned host-to-device copy (GB/s).
- step: one training step (`StackTrainer.train_step`: forward, backward, clipping, Adam, decoder
  constraint, dead-latent bookkeeping) per architecture at d_in 768 / 2304, d_sae 16384 / 65536,
  batch 4096, k 32, R 1, in bf16 / tf32 / fp32, with the fused and the plain kernels, every model
  built on the device. The TopK family (TopK, BatchTopK, Matryoshka) is timed with AuxK at work:
  10% of its latents dead (`mark_dead`), and, on the path `kernels=auto` takes, also with none
  dead. Each row has: the step against its own dense matmuls alone in the same precision (ratio =
  dense / step; >= 0.9 is the goal for dense architectures, >= 1.0 for the sparse TopK family); its
  real matmul FLOPs (from the cost model's trace of the same step) per step time as a fraction of
  the large bf16 matmul's rate; and **the cost model's time for the same step** (benchmarks/
  gpu_model.py `model_step`, same shape, precision and dead fraction, the constants of the GPU this
  runs on: h100 or h200 by its name), with measured / modeled, so the first lent GPU calibrates
  the model. Also: the host syncs a bf16 step makes (torch.cuda.set_sync_debug_mode), Adam's time,
  and `torch.compile` of the plain path for standard and topk (a candidate for `auto` on CUDA).
- saelens: SAELens's `SAETrainer._train_step` (autocast on, the same shapes, data on the GPU) beside
  ours in bf16 with `kernels=auto` and no dead latent (a fresh SAELens SAE has none): tokens/s and
  ours / theirs (goal >= 2).
- loader: a bf16 cache on local disk, page cache warm: raw read GB/s of its files, a pinned
  host-to-device copy alone, and the streaming loader to the GPU (goal >= 0.7 of the smaller);
  end-to-end training tokens/s from the cache (streaming, bf16, topk, d_in 768, d_sae 16384)
  against the same step on batches already on the device (goal >= 0.9).
- sweep: 8 TopK runs of d_sae 16384 as one stack from a resident cache against the same 8 runs one
  after another, each streaming the cache (goal >= 3x).
- writer: `pipeline cache` against the forward pass alone, GPT-2-small shape with random weights,
  fp32 and bf16 (goal >= 0.9).
- tests: every `gpu`-marked test (`pytest -m gpu`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import inspect
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import gpu_model  # noqa: E402
from bench_trainer import REQUIRED_FIELDS, dense_matmuls  # noqa: E402
from pipeline.errors import PipelineError  # noqa: E402
from trainer.precision import compute_precision  # noqa: E402
from trainer.registry import get_architecture, registered_architectures  # noqa: E402
from trainer.train import LoopConfig, StackTrainer  # noqa: E402


def _stub_wandb() -> None:
    """sae_lens imports wandb at import time but nothing the suite runs logs to it; the GPU image lacks
    it (20 MB with its OpenTelemetry stack): without it, a module of no-ops stands in."""
    try:
        import wandb  # noqa: F401
    except ImportError:
        import importlib.machinery
        import types

        stub = types.ModuleType("wandb")
        stub.__spec__ = importlib.machinery.ModuleSpec("wandb", None)  # find_spec("wandb") must not fail
        stub.init = stub.log = stub.finish = stub.log_artifact = lambda *a, **k: None
        stub.Histogram = stub.Artifact = type("Unavailable", (), {"__init__": lambda self, *a, **k: None})
        sys.modules["wandb"] = stub


PRECISIONS = ("bf16", "tf32", "fp32")  # most important first: a budget cut drops fp32 first
OPTIONAL = ("zarr", "datasets", "transformer_lens", "sae_lens", "wandb", "pyarrow", "xxhash")
K = REQUIRED_FIELDS["k"]
"""k of the TopK family in every step row (bench_trainer's)."""
DEAD = 0.1
"""Fraction of the TopK family's latents dead in its step rows (issue 27: AuxK at work)."""
DEAD_WINDOW_STEPS = 32
"""dead_tokens_threshold of the step rows, in batches: small, as a run past its first dead window (the
latents `mark_dead` marks sit at it), yet far above the host's look-back on the dead counts (LAG_STEPS
batches in trainer.sae_topk), so that no live latent counts as near dead in a row's few steps."""
DEAD_BIAS = -10.0
"""b_enc of a latent marked dead: the step rows' pre-activations are ~N(0, 1) (unit-variance inputs,
unit-norm encoder columns), so it never reaches the top k and stays dead, as a dead latent does."""


@dataclasses.dataclass
class Sizes:
    """What a run measures: the full sizes on a GPU, tiny ones in --smoke (CPU, CI)."""

    device: str
    shapes: tuple[tuple[int, int], ...]
    batch: int
    steps: int
    warmup: int
    precisions: tuple[str, ...]
    peak_n: int
    loader_rows: int
    loader_d: int
    sweep_runs: int
    sweep_steps: int
    writer_model: str
    writer_tokens: int
    compile_shape: tuple[int, int] | None
    row_s: float
    """Fixed seconds of a step row besides its steps (building the model, the dense baseline)."""
    compile_s: float
    """Estimated seconds of one torch.compile."""
    writer_s: float
    """Estimated seconds of the first writer row (the second is estimated from it)."""
    disk_gbs: float
    """Estimated GB/s of writing the scratch cache (its item's time estimate)."""


FULL = Sizes("cuda", ((768, 16384), (768, 65536), (2304, 16384), (2304, 65536)), 4096, 8, 3, PRECISIONS, 8192,
             2_000_000, 768, 8, 60, "gpt2-small-random", 400_000, (768, 16384), 1.5, 60.0, 40.0, 0.3)
SMOKE = Sizes("cpu", ((16, 64),), 128, 2, 3, ("bf16", "fp32"), 256, 20_000, 16, 3, 4, "tiny", 4096, None,
              0.05, 60.0, 5.0, 0.01)


@contextlib.contextmanager
def _init_on_device():
    """trainer.init draws a stack's initial weights on the host (a seed gives the same SAE on every
    device): 151M values at 2304 x 65536, seconds per model. Inside this, the same init (random unit
    rows of norm dec_init_norm, the encoder tied to the decoder, b_enc 0) is drawn on the weights'
    own device."""
    import trainer.stack as stack

    def init_tied_weights_(W_enc, W_dec, b_enc, seeds, dec_init_norm, tied=True) -> None:
        for r, seed in enumerate(seeds):
            g = torch.Generator(device=W_dec.device).manual_seed(int(seed))
            w = torch.randn(W_dec.shape[1:], generator=g, device=W_dec.device)
            w = w / w.norm(dim=-1, keepdim=True) * float(dec_init_norm[r])
            W_dec[r].copy_(w)
            if W_enc.shape[1] != W_dec.shape[-1] or not tied:
                w = torch.randn(W_enc.shape[2], W_enc.shape[1], generator=g, device=W_dec.device)
                w = w / w.norm(dim=-1, keepdim=True) * float(dec_init_norm[r])
            W_enc[r].copy_(w.T)
        b_enc.zero_()

    original = stack.init_tied_weights_
    stack.init_tied_weights_ = init_tied_weights_
    try:
        yield
    finally:
        stack.init_tied_weights_ = original


def build_sae(arch: str, d_in: int, d_sae: int, device: str, runs: int = 1, **options) -> torch.nn.Module:
    """A stack of `runs` runs of `arch` (k = K where it has one; `options` its config has; seeds 0..),
    built on `device`: parameters and buffers made there, the random init drawn there."""
    cls = get_architecture(arch)
    fields = {f.name for f in dataclasses.fields(cls.config_class)}
    kw = {name: v for name, v in {"k": K, **options}.items() if name in fields}
    cfgs = [cls.config_class(d_in=d_in, d_sae=d_sae, **kw, **({"seed": r} if "seed" in fields else {}))
            for r in range(runs)]
    with torch.device(device), _init_on_device():
        return cls(cfgs)


def has_auxk(arch: str) -> bool:
    """Whether `arch` counts dead latents (the TopK family, with AuxK)."""
    return hasattr(get_architecture(arch), "dead_mask")


@torch.no_grad()
def mark_dead(model: torch.nn.Module, fraction: float, seed: int = 0) -> None:
    """Make `fraction` of each run's latents dead before a timed step, so that AuxK does its work
    (with the default 10M-token window it never would in a benchmark's few steps): a random
    `fraction` of the latents gets `tokens_since_fired` at the run's dead_tokens_threshold, and
    b_enc DEAD_BIAS so that none of them fires again (their count keeps growing, as a dead latent's).

    Only the device's state is set, as training would leave it: the host learns which latents may
    be dead from the counts the steps themselves read back (late, without a sync), so the caller
    runs a few warm-up steps before timing. (The cost model's replay on the meta device, where no
    count comes back, calls `assume_dead_for_replay` instead: benchmarks/gpu_model.py.)"""
    if not fraction:
        return
    R, S = model.tokens_since_fired.shape
    dev = model.tokens_since_fired.device
    idx = torch.randperm(S, generator=torch.Generator(device=dev).manual_seed(seed), device=dev)[: round(fraction * S)]
    model.tokens_since_fired[:, idx] = model.dead_tokens_threshold.unsqueeze(1)
    model.b_enc[:, idx] = DEAD_BIAS
    changed = getattr(model, "dead_counts_changed", None)  # the host's view of the counts, if it keeps one
    if changed is not None:
        changed()


def model_gpu(name: str | None) -> str:
    """The cost model's GPU (gpu_model.GPUS) for a device name: h200 or h100 (also for any other)."""
    return "h200" if name and "H200" in name.upper() else "h100"


class Suite:
    """Sections write into `results`; each measurement is guarded (an error is recorded, not fatal)."""

    def __init__(self, sizes: Sizes, out: Path, budget_s: float, smoke: bool, scratch: Path):
        self.sizes, self.out, self.smoke, self.scratch = sizes, out, smoke, scratch
        self.t0, self.budget_s = time.perf_counter(), budget_s
        self.deadline = self.t0 + budget_s
        self.section_deadline = self.deadline
        gpu_name = torch.cuda.get_device_name(0) if sizes.device.startswith("cuda") else None
        self.gpu = model_gpu(gpu_name)
        self.results: dict = {"meta": {"smoke": smoke, "date": time.strftime("%Y-%m-%d %H:%M"), "budget_s": budget_s,
                                       "sizes": dataclasses.asdict(sizes), "model_gpu": self.gpu,
                                       "model_gpu_from": gpu_name or "no GPU (smoke): H100 constants"}}
        self._models: dict = {}
        self._ratios: list[float] = []
        """measured / modeled of the steps so far: `_calib` scales the model into item estimates."""
        out.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def save(self) -> None:
        (self.out / "gpu_suite.json").write_text(json.dumps(self.results, indent=1, default=str))

    def sync(self) -> None:
        if self.sizes.device.startswith("cuda"):
            torch.cuda.synchronize()

    def seconds_per_call(self, fn: Callable[[], object], steps: int | None = None, warmup: int | None = None) -> float:
        """Wall seconds per call of `fn`, over `steps` calls after `warmup`, the device synchronized
        around them only (the loop's own pace: the host may run ahead of the GPU as in training)."""
        for _ in range(self.sizes.warmup if warmup is None else warmup):
            fn()
        self.sync()
        n = self.sizes.steps if steps is None else steps
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        self.sync()
        return (time.perf_counter() - t0) / n

    def run_section(self, name: str, fn: Callable[[], None], share: float) -> None:
        """Run a section with `share` of the time left; its errors are recorded, not raised. Its items
        check their own time (`fits`) and record why they were skipped."""
        start = time.perf_counter()
        self.section_deadline = start + max(0.0, self.left()) * share
        print(f"[{time.perf_counter() - self.t0:6.0f} s] {name} ...", flush=True)
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - a section that cannot run must not stop the others
            self.results.setdefault(name, {})["error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        self.results.setdefault("seconds", {})[name] = round(time.perf_counter() - start, 1)
        self.save()

    def section_left(self) -> float:
        return min(self.section_deadline, self.deadline) - time.perf_counter()

    @property
    def _calib(self) -> float:
        """How many times the model's step time an estimate takes: the median measured / modeled so
        far, at least 3 (an estimate covers warm-up steps and set-up the model does not see)."""
        return max(3.0, statistics.median(self._ratios)) if self._ratios else 3.0

    def fits(self, need_s: float) -> str | None:
        """None when an item estimated at `need_s` seconds fits in what its section has left; else why
        not (recorded in the item's place)."""
        left = self.section_left()
        if left <= 0:
            return "time budget: the section's share is spent"
        if need_s > left:
            return f"time budget: needs ~{need_s:.0f} s, {left:.0f} s left in the section"
        return None

    def skip(self, section: str, item: str, reason: str) -> None:
        """Record that `item` of a section with no rows was skipped, and why."""
        self.results.setdefault(section, {}).setdefault("skipped", {})[item] = reason
        self.save()

    # -- env, peak ---------------------------------------------------------------------------------

    def env(self) -> None:
        info = {"python": platform.python_version(), "torch": torch.__version__, "device": self.sizes.device,
                "cpus": os.cpu_count()}
        if self.sizes.device.startswith("cuda"):
            p = torch.cuda.get_device_properties(0)
            info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1),
                        sms=p.multi_processor_count, cuda=torch.version.cuda)
        for name in OPTIONAL:
            if name == "wandb" and name in sys.modules and not hasattr(sys.modules[name], "__version__"):
                info[name] = "stub"
                continue
            try:
                mod = importlib.import_module(name)
                info[name] = getattr(mod, "__version__", "yes")
            except Exception as e:  # noqa: BLE001 - recorded: which sections can run
                info[name] = f"missing ({type(e).__name__})"
        self.results["env"] = info

    def peak(self) -> None:
        n, dev = self.sizes.peak_n, self.sizes.device
        out = self.results.setdefault("peak", {})
        for prec, dtype in (("bf16", torch.bfloat16), ("tf32", torch.float32), ("fp32", torch.float32)):
            if reason := self.fits(2.0):
                self.skip("peak", f"matmul_{prec}", reason)
                continue
            g = torch.Generator(device=dev).manual_seed(0)
            a, b = (torch.randn(n, n, generator=g, device=dev).to(dtype) for _ in range(2))
            with compute_precision("tf32" if prec == "tf32" else "fp32", dev):
                s = self.seconds_per_call(lambda: a @ b, steps=10, warmup=3)
            out[f"matmul_{prec}_tflops"] = 2 * n ** 3 / s / 1e12
        if reason := self.fits(2.0):
            self.skip("peak", "copies", reason)
            return
        src = torch.empty(256 << 20 if not self.smoke else 1 << 20, dtype=torch.uint8, device=dev)
        dst = torch.empty_like(src)
        s = self.seconds_per_call(lambda: dst.copy_(src), steps=10, warmup=2)
        out["d2d_copy_gbs"] = 2 * src.numel() / s / 1e9  # bytes read + written
        if dev.startswith("cuda"):
            host = torch.empty(src.numel(), dtype=torch.uint8, pin_memory=True)
            s = self.seconds_per_call(lambda: dst.copy_(host, non_blocking=True), steps=10, warmup=2)
            out["h2d_pinned_gbs"] = src.numel() / s / 1e9

    # -- step ---------------------------------------------------------------------------------------

    def step(self) -> None:
        rows: list[dict] = []
        self.results["step"] = {"rows": rows, "model_gpu": self.gpu}
        dense_cache: dict = {}
        for prec in self.sizes.precisions:
            for d_in, d_sae in self.sizes.shapes:
                for arch in registered_architectures():
                    for kernels, dead in self._variants(arch, prec):
                        rows.append(self._step_row(arch, d_in, d_sae, prec, kernels, dead, dense_cache))
                        self.save()
        if self.sizes.compile_shape:
            d_in, d_sae = self.sizes.compile_shape
            for arch in ("standard", "topk"):
                dead = 0.0 if has_auxk(arch) else None
                rows.append(self._step_row(arch, d_in, d_sae, "bf16", "plain", dead, dense_cache, compiled=True))
                self.save()

    def _variants(self, arch: str, prec: str) -> list[tuple[str, float | None]]:
        """(kernels, dead fraction) of the step rows of `arch`: both kernels; the TopK family with DEAD
        of its latents dead, and the path `auto` takes also with none dead (AuxK's work apart)."""
        auto = self.auto_kernels(arch, prec)
        if not has_auxk(arch):
            return [(kernels, None) for kernels in ("fused", "plain")]
        return [(kernels, dead) for kernels in ("fused", "plain") for dead in ((DEAD, 0.0) if kernels == auto else (DEAD,))]

    def modeled(self, arch: str, d_in: int, d_sae: int, prec: str, dead: float | None, kernels: str) -> dict:
        """The cost model's row for this step (benchmarks/gpu_model.py `model_step`: same shape,
        precision and dead fraction, this GPU's constants). The model replays the path `auto` takes on
        CUDA unless `model_step` takes `kernels`; its row says which (`kernels`)."""
        takes_kernels = "kernels" in inspect.signature(gpu_model.model_step).parameters
        key = (arch, d_in, d_sae, prec, dead, kernels if takes_kernels else None)
        if key not in self._models:
            shape = gpu_model.Shape(d_in, d_sae, K, self.sizes.batch, 1)
            kw = {"kernels": kernels} if takes_kernels else {}
            try:
                self._models[key] = gpu_model.model_step(arch, shape, gpu_model.GPUS[self.gpu], prec, dead or 0.0,
                                                         **kw)[0]
            except Exception as e:  # noqa: BLE001 - a row without a model is still measured
                self._models[key] = {"error": f"{type(e).__name__}: {e}"}
        return self._models[key]

    def _step_row(self, arch: str, d_in: int, d_sae: int, prec: str, kernels: str, dead: float | None,
                  dense_cache: dict, compiled: bool = False) -> dict:
        dev, B = self.sizes.device, self.sizes.batch
        cls = get_architecture(arch)
        row = {"arch": arch, "d_in": d_in, "d_sae": d_sae, "precision": prec,
               "kernels": kernels + ("+compile" if compiled else ""), "dead": dead,
               "auto": self.auto_kernels(arch, prec) == kernels and not compiled}
        if self.section_left() <= 0:  # not even the model: the budget is spent
            return {**row, "skipped": "time budget: the section's share is spent"}
        m = self.modeled(arch, d_in, d_sae, prec, dead, kernels)
        same_path = m.get("kernels") == kernels  # measured / modeled only where the model replays this path
        row.update(modeled_ms=m.get("modeled_ms"), floor_ms=m.get("floor_ms"), modeled_kernels=m.get("kernels"))
        if "error" in m:
            row["modeled_error"] = m["error"]
        calls = self.sizes.warmup + self.sizes.steps + (7 if prec == "bf16" else 0)  # + Adam's 6, the sync check
        need = self.sizes.row_s + calls * (m.get("modeled_ms") or 10.0) / 1e3 * self._calib
        if reason := self.fits(need + (self.sizes.compile_s if compiled else 0)):
            return {**row, "skipped": reason}
        key = (d_in, d_sae, prec, cls.dense_matmuls)
        if key not in dense_cache:
            run = dense_matmuls(B, d_in, d_sae, cls.dense_matmuls, dev, torch.bfloat16 if prec == "bf16" else torch.float32)
            with compute_precision("tf32" if prec == "tf32" else "fp32", dev):
                dense_cache[key] = self.seconds_per_call(run)
        dense_s = dense_cache[key]
        row["dense_ms"] = dense_s * 1e3
        g = torch.Generator(device=dev).manual_seed(1)
        batches = [torch.randn(B, d_in, generator=g, device=dev) for _ in range(4)]
        # A small dead window, so that AuxK works in a few steps when latents are dead (mark_dead).
        model = build_sae(arch, d_in, d_sae, dev, dead_tokens_threshold=DEAD_WINDOW_STEPS * B)
        model.init_b_dec(batches[0], "mean")
        if dead:
            mark_dead(model, dead)
        try:
            trainer = StackTrainer(model, LoopConfig(lr=1e-4, precision=prec, kernels=kernels, log_every=10**9))
            if compiled:
                trainer.model = torch.compile(model)
            state = {"i": 0}

            def one() -> None:
                trainer.train_step(batches[state["i"] % len(batches)])
                state["i"] += 1

            if compiled:
                t = time.perf_counter()
                one()
                self.sync()
                row["compile_s"] = round(time.perf_counter() - t, 1)
            step_s = self.seconds_per_call(one)  # after `warmup` steps: the host's view of the dead caught up
        except PipelineError as e:  # a fused kernel that cannot compute in this precision
            return {**row, "n/a": str(e)}
        # The step's real matmul FLOPs: the model's trace of this same step where it replays this path,
        # else the architecture's dense matmuls.
        if same_path and m.get("tflop") is not None:
            flops, row["flops_from"] = m["tflop"] * 1e12, "model"
        else:
            flops, row["flops_from"] = cls.dense_matmuls * 2 * B * d_in * d_sae, f"{cls.dense_matmuls} dense matmuls"
        peak = self.results.get("peak", {}).get("matmul_bf16_tflops")
        row.update(step_ms=step_s * 1e3, ratio=dense_s / step_s, tokens_per_s=B / step_s, matmul_tflop=flops / 1e12,
                   frac_bf16_peak=flops / step_s / (peak * 1e12) if peak else None)
        if same_path and m.get("modeled_ms"):
            row["measured_over_modeled"] = row["step_ms"] / m["modeled_ms"]
        if m.get("modeled_ms"):
            self._ratios.append(row["step_ms"] / m["modeled_ms"])
        if prec == "bf16":
            row["adam_ms"] = self.seconds_per_call(trainer.opt.step, steps=5, warmup=1) * 1e3
            row["syncs"] = self._syncs(one)
        trainer = model = None  # free the GPU memory before the next row
        if dev.startswith("cuda"):
            torch.cuda.empty_cache()
        return row

    def _syncs(self, one: Callable[[], None]) -> int | None:
        """Host syncs one step makes on CUDA (torch's sync debug mode warns at each)."""
        if not self.sizes.device.startswith("cuda"):
            return None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                one()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    # -- SAELens ------------------------------------------------------------------------------------

    def saelens(self) -> None:
        dev, B = self.sizes.device, self.sizes.batch
        # Ours: bf16, kernels=auto, no latent dead (a fresh SAELens SAE has none, so no AuxK either).
        ours = {(r["arch"], r["d_in"], r["d_sae"]): r for r in self.results.get("step", {}).get("rows", [])
                if r.get("precision") == "bf16" and r.get("step_ms") and r.get("auto") and not r.get("dead")}
        rows: list[dict] = []
        self.results["saelens"] = {"rows": rows}
        archs = ("topk", "batchtopk", "standard", "jumprelu", "gated", "matryoshka")
        lib = None
        for d_in, d_sae in self.sizes.shapes:
            for arch in archs:
                row = {"arch": arch, "d_in": d_in, "d_sae": d_sae}
                mine = ours.get((arch, d_in, d_sae))

                def need() -> float:  # theirs at 3x ours (or the model's step, scaled as the step rows')
                    step_s = mine["step_ms"] / 1e3 if mine else (self.modeled(
                        arch, d_in, d_sae, "bf16", 0.0, self.auto_kernels(arch, "bf16")).get("modeled_ms") or 10.0
                    ) / 1e3 * self._calib
                    return self.sizes.row_s + 3 * step_s * (self.sizes.warmup + self.sizes.steps)

                if reason := self.fits(0) or self.fits(need()):
                    rows.append({**row, "skipped": reason})
                    self.save()
                    continue
                lib = lib or self._saelens_lib()
                cfg = lib["configs"][arch](d_in, d_sae)
                with torch.device(dev):
                    sae = lib["sae_lens"].TrainingSAE.from_dict({**cfg.to_dict(), "device": dev}).to(dev)
                trainer = lib["SAETrainer"](lib["SAETrainerConfig"](
                    total_training_samples=10**9, train_batch_size_samples=B, device=dev, autocast=True, lr=3e-4,
                    lr_end=3e-4), sae, data_provider=iter([]))
                x = torch.randn(B, d_in, device=dev)
                s = self.seconds_per_call(lambda: trainer._train_step(sae, x))
                row["saelens_tokens_per_s"] = B / s
                if mine:
                    row["ours_tokens_per_s"] = mine["tokens_per_s"]
                    row["ours_over_saelens"] = mine["tokens_per_s"] / row["saelens_tokens_per_s"]
                rows.append(row)
                sae = trainer = None
                self.save()

    @staticmethod
    def _saelens_lib() -> dict:
        import sae_lens
        from sae_lens.config import SAETrainerConfig
        from sae_lens.saes.matryoshka_batchtopk_sae import MatryoshkaBatchTopKTrainingSAEConfig
        from sae_lens.training.sae_trainer import SAETrainer

        configs = {
            "topk": lambda d_in, d_sae: sae_lens.TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=K),
            "batchtopk": lambda d_in, d_sae: sae_lens.BatchTopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=K),
            "standard": lambda d_in, d_sae: sae_lens.StandardTrainingSAEConfig(d_in=d_in, d_sae=d_sae),
            "jumprelu": lambda d_in, d_sae: sae_lens.JumpReLUTrainingSAEConfig(d_in=d_in, d_sae=d_sae),
            "gated": lambda d_in, d_sae: sae_lens.GatedTrainingSAEConfig(d_in=d_in, d_sae=d_sae),
            "matryoshka": lambda d_in, d_sae: MatryoshkaBatchTopKTrainingSAEConfig(
                d_in=d_in, d_sae=d_sae, k=K, matryoshka_widths=[d_sae // 16, d_sae // 8, d_sae // 4, d_sae // 2, d_sae]),
        }
        return {"sae_lens": sae_lens, "SAETrainerConfig": SAETrainerConfig, "SAETrainer": SAETrainer,
                "configs": configs}

    def auto_kernels(self, arch: str, precision: str) -> str:
        """The path `kernels=auto` takes for an SAE of `arch` on this device in `precision`."""
        cls = get_architecture(arch)
        fused = self.sizes.device.split(":")[0] in cls.fused_on and (precision != "bf16" or cls.fused_autocast)
        return "fused" if fused else "plain"

    # -- loader and sweep ---------------------------------------------------------------------------

    def _cache(self, section: str) -> Path | None:
        """A bf16 cache of `loader_rows` rows x `loader_d` in the scratch directory (written once per
        suite), or None when it is not there and writing it does not fit (recorded)."""
        path = self.scratch / "suite_cache"
        if (path / "manifest.json").exists():
            return path
        n, d = self.sizes.loader_rows, self.sizes.loader_d
        if reason := self.fits(2 * n * d / (self.sizes.disk_gbs * 1e9)):
            self.skip(section, "cache", reason)
            return None
        from pipeline.writer import ActivationBlock, CacheWriter, WriterConfig

        shutil.rmtree(path, ignore_errors=True)
        w = CacheWriter(path, {"x": d}, WriterConfig(dtype="bfloat16", shard_mb=256 if not self.smoke else 0.05))
        g = torch.Generator().manual_seed(0)
        chunk = 65536
        block = torch.randn(chunk, d, generator=g)
        for start in range(0, n, chunk):
            w.put(ActivationBlock({"x": block[: min(chunk, n - start)] + start % 7}))
        w.close()
        return path

    def _topk_step_s(self, d_in: int, d_sae: int) -> float:
        """Seconds of one bf16 topk step of this shape, for estimates: measured in the step section
        (no dead latent, as here), else the model's."""
        for r in self.results.get("step", {}).get("rows", []):
            if (r["arch"], r["d_in"], r["d_sae"], r["precision"]) == ("topk", d_in, d_sae, "bf16") \
                    and r.get("auto") and not r.get("dead") and r.get("step_ms"):
                return r["step_ms"] / 1e3
        m = self.modeled("topk", d_in, d_sae, "bf16", 0.0, self.auto_kernels("topk", "bf16"))
        return (m.get("modeled_ms") or 10.0) / 1e3 * self._calib

    def loader(self) -> None:
        from bench_loader import raw_read

        from pipeline.loader import ActivationLoader

        dev = self.sizes.device
        res = self.results.setdefault("loader", {})
        path = self._cache("loader")
        if path is None:
            for item in ("raw_read", "loader", "train"):
                self.skip("loader", item, "no scratch cache (skipped)")
            return
        files = [p for p in (path / "hooks").rglob("*") if p.is_file() and not p.name.endswith(".json")]
        size = sum(p.stat().st_size for p in files)
        if reason := self.fits(2 * size / 1e9 + 1):  # twice at >= 1 GB/s (the first warms the page cache)
            self.skip("loader", "raw_read", reason)
        else:
            raw_read(files)
            raw_s, raw_bytes = raw_read(files)
            res.update(cache_gib=raw_bytes / 2**30, raw_read_gbs=raw_bytes / raw_s / 1e9)
        h2d = self.results.get("peak", {}).get("h2d_pinned_gbs")
        if h2d:
            res["h2d_pinned_gbs"] = h2d
        if reason := self.fits(size / 0.5e9 + 1):
            self.skip("loader", "loader", reason)
        else:
            loader = ActivationLoader(path, hooks="x", batch_size=self.sizes.batch, device=dev, dtype=torch.bfloat16)
            t0, rows = time.perf_counter(), 0
            for b in loader:
                rows += b.shape[0]
            self.sync()
            s = time.perf_counter() - t0
            res["loader_gbs"] = rows * self.sizes.loader_d * 2 / s / 1e9  # stored bf16 bytes delivered
            limit = min(res.get("raw_read_gbs") or res["loader_gbs"], h2d or res.get("raw_read_gbs") or res["loader_gbs"])
            res["loader_over_limit"] = res["loader_gbs"] / limit
        self.save()
        # End to end: the training loop fed by the streaming loader against the same step on batches
        # already on the device.
        d_in, d_sae = self.sizes.loader_d, self.sizes.shapes[0][1]
        steps = self.sizes.sweep_steps * 2
        tokens = steps * self.sizes.batch
        # Two passes of `steps` (the streamed one at most ~3x slower), plus building the model.
        if reason := self.fits(0) or self.fits(self.sizes.row_s + 4 * steps * self._topk_step_s(d_in, d_sae)):
            self.skip("loader", "train", reason)
            return
        trainer = self._trainer("topk", d_in, d_sae, 1)
        on_device = [b.clone() for _, b in zip(range(4), ActivationLoader(path, hooks="x", batch_size=self.sizes.batch,
                                                                           device=dev))]
        trainer.init_from_data(on_device[0])
        state = {"i": 0}

        def from_memory() -> None:
            trainer.train_step(on_device[state["i"] % 4])
            state["i"] += 1

        mem_s = self.seconds_per_call(from_memory, steps=steps)
        feed = ActivationLoader(path, hooks="x", batch_size=self.sizes.batch, device=dev, tokens=tokens, resident="no")
        self.sync()
        t0, n = time.perf_counter(), 0
        for b in feed:
            trainer.train_step(b)
            n += 1
        self.sync()
        e2e_s = (time.perf_counter() - t0) / n
        res.update(train_from_memory_tokens_per_s=self.sizes.batch / mem_s,
                   train_from_cache_tokens_per_s=self.sizes.batch / e2e_s, train_cache_over_memory=mem_s / e2e_s)

    def _trainer(self, arch: str, d_in: int, d_sae: int, runs: int) -> StackTrainer:
        lrs = [1e-4 * (1 + r) for r in range(runs)]
        model = build_sae(arch, d_in, d_sae, self.sizes.device, runs)
        return StackTrainer(model, LoopConfig(lr=lrs, precision="auto", init_scale_search=False, b_dec_init="mean",
                                              log_every=10**9))

    def sweep(self) -> None:
        """8 TopK runs as one stack on a resident cache, against the 8 run one by one, streamed."""
        from pipeline.loader import ActivationLoader

        self.results["sweep"] = res = {}
        dev, B = self.sizes.device, self.sizes.batch
        d_in, d_sae, R = self.sizes.loader_d, self.sizes.shapes[0][1], self.sizes.sweep_runs
        tokens = self.sizes.sweep_steps * B
        path = self._cache("sweep")
        if path is None:
            for item in ("warmup", "stacked", "one_by_one"):
                self.skip("sweep", item, "no scratch cache (skipped)")
            return

        def train(runs: int, resident: str) -> float:
            loader = ActivationLoader(path, hooks="x", batch_size=B, device=dev, tokens=tokens, resident=resident)
            t0 = time.perf_counter()
            trainer = self._trainer("topk", d_in, d_sae, runs)
            first = True
            for b in loader:
                if first:
                    trainer.init_from_data(b)
                    first = False
                trainer.train_step(b)
            self.sync()
            return time.perf_counter() - t0

        # A run streamed, at most ~3x its steps on the device, plus its set-up; later items are
        # estimated from the warm-up run measured here (kernels, allocator, page cache).
        if reason := self.fits(0) or self.fits(self.sizes.row_s + 3 * self.sizes.sweep_steps
                                                * self._topk_step_s(d_in, d_sae)):
            for item in ("warmup", "stacked", "one_by_one"):
                self.skip("sweep", item, reason)
            return
        one_s = res["warmup_s"] = train(1, "no")
        res.update(runs=R, tokens_per_run=tokens)
        if reason := self.fits(R * one_s):  # R runs' steps at once, at most the time of R runs
            self.skip("sweep", "stacked", reason)
        else:
            res["stacked_resident_s"] = train(R, "yes")
        self.save()
        if reason := self.fits(1.2 * R * one_s):
            self.skip("sweep", "one_by_one", reason)
        else:
            res["one_by_one_streamed_s"] = sum(train(1, "no") for _ in range(R))
        if "stacked_resident_s" in res and "one_by_one_streamed_s" in res:
            res["speedup"] = res["one_by_one_streamed_s"] / res["stacked_resident_s"]

    # -- writer, tests ------------------------------------------------------------------------------

    def writer(self) -> None:
        from bench_writer import measure_writer

        rows: list[dict] = []
        self.results["writer"] = {"rows": rows}
        need = self.sizes.writer_s
        for model_dtype, dtype in (("float32", "float32"), ("bfloat16", "bfloat16")):
            if reason := self.fits(need):
                rows.append({"model_dtype": model_dtype, "skipped": reason})
                self.save()
                continue
            t0 = time.perf_counter()
            r = measure_writer(self.sizes.writer_model, self.sizes.device, self.sizes.writer_tokens, 32, 128,
                               None, "zarr", dtype, model_dtype, str(self.scratch / f"writer_{model_dtype}"))
            need = 1.2 * (time.perf_counter() - t0)
            shutil.rmtree(self.scratch / f"writer_{model_dtype}", ignore_errors=True)
            rows.append({k: v for k, v in r.items() if k != "stages"} | {"stages": r["stages"]})
            self.save()

    def tests(self) -> None:
        if reason := self.fits(30):
            self.skip("tests", "pytest -m gpu", reason)
            return
        timeout = int(self.section_left())
        # Only the files holding gpu-marked tests are collected: the others may import what the GPU
        # image lacks (wandb) and would fail to collect.
        files = sorted(str(p) for p in (ROOT / "tests").glob("test_*.py") if "mark.gpu" in p.read_text())
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                               "--timeout", str(timeout), *files], capture_output=True, text=True,
                              cwd=ROOT, timeout=timeout + 30, env={**os.environ, "WANDB_MODE": "disabled",
                                                                  "HF_HUB_OFFLINE": "1"})
        tail = (done.stdout + done.stderr).strip().splitlines()
        self.results["tests"] = {"returncode": done.returncode, "summary": tail[-1] if tail else "",
                                 "failures": [line for line in tail if line.startswith(("FAILED", "ERROR"))][:20]}


# -- the report -----------------------------------------------------------------------------------

def _fmt(v, spec: str = ".2f") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def markdown(results: dict) -> str:
    lines = [f"GPU suite, {results['meta']['date']}" + (" (smoke: tiny sizes on CPU)" if results["meta"]["smoke"] else "")]
    env = results.get("env", {})
    lines.append(", ".join(f"{k} {v}" for k, v in env.items()))
    peak = {k: v for k, v in results.get("peak", {}).items() if k not in ("skipped", "error")}
    if peak:
        lines += ["", "| limit | measured |", "| --- | ---: |"]
        lines += [f"| {k} | {_fmt(v, '.1f')} |" for k, v in peak.items()]
    step = results.get("step", {}).get("rows", [])
    if step:
        lines += ["", f"Training step (R=1, batch {results['meta']['sizes']['batch']}, k {K}): dead = the TopK family's "
                  "latents dead (AuxK at work); ratio = its dense matmuls alone / the step; peak = the step's matmul "
                  "FLOPs (the model's trace of it) per step time / the bf16 matmul peak; modeled = benchmarks/"
                  f"gpu_model.py's time for the same step with {results['meta']['model_gpu']} constants (- where the "
                  "model replays the other kernels)",
                  "", "| arch | d_in | d_sae | precision | kernels | dead | auto | step ms | modeled ms | measured / modeled "
                  "| floor ms | dense ms | ratio | peak | tokens/s | Adam ms | syncs |",
                  "| --- | ---: | ---: | --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
                  "| ---: | ---: |"]
        for r in step:
            dead = "" if r.get("dead") is None else f"{r['dead']:.0%}"
            head = f"| {r['arch']} | {r['d_in']} | {r['d_sae']} | {r['precision']} | {r.get('kernels', '-')} | {dead} "
            same = r.get("modeled_kernels") == r.get("kernels", "").removesuffix("+compile")
            modeled = _fmt(r.get("modeled_ms")) if same else "-"
            if "skipped" in r or "n/a" in r:
                why = f"skipped: {r['skipped']}" if "skipped" in r else "n/a"
                lines.append(head + f"| | {why} | {modeled} | | {_fmt(r.get('floor_ms')) if same else '-'} "
                             "| | | | | | |")
                continue
            lines.append(head + f"| {_fmt(r.get('auto'))} | {_fmt(r['step_ms'])} | {modeled} | "
                         f"{_fmt(r.get('measured_over_modeled'))} | {_fmt(r.get('floor_ms')) if same else '-'} | "
                         f"{_fmt(r['dense_ms'])} | {_fmt(r['ratio'])} | {_fmt(r.get('frac_bf16_peak'))} | "
                         f"{r['tokens_per_s']:,.0f} | {_fmt(r.get('adam_ms'))} | {_fmt(r.get('syncs'))} |")
    sl = results.get("saelens", {}).get("rows", [])
    if sl:
        lines += ["", "Against SAELens's SAETrainer (autocast, data on the device); ours: bf16, kernels=auto, no latent "
                  "dead", "", "| arch | d_in | d_sae | SAELens tokens/s | ours tokens/s | ours / SAELens |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for r in sl:
            if "skipped" in r:
                lines.append(f"| {r['arch']} | {r['d_in']} | {r['d_sae']} | skipped: {r['skipped']} | | |")
                continue
            lines.append(f"| {r['arch']} | {r['d_in']} | {r['d_sae']} | {_fmt(r.get('saelens_tokens_per_s'), ',.0f')} | "
                         f"{_fmt(r.get('ours_tokens_per_s'), ',.0f')} | {_fmt(r.get('ours_over_saelens'))} |")
    for name in ("peak", "loader", "sweep", "tests"):
        for item, why in results.get(name, {}).get("skipped", {}).items():
            lines.append(f"{name}: {item} skipped: {why}")
    for name in ("loader", "sweep"):
        sec = {k: v for k, v in results.get(name, {}).items() if k not in ("skipped", "error")}
        if sec:
            lines += ["", f"{name}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in sec.items())]
    wr = results.get("writer", {}).get("rows", [])
    if wr:
        lines += ["", "| writer | model dtype | tokens | forward tok/s | writer tok/s | writer / forward |",
                  "| --- | --- | ---: | ---: | ---: | ---: |"]
        for r in wr:
            if "skipped" in r:
                lines.append(f"| {results['meta']['sizes']['writer_model']} | {r['model_dtype']} | skipped: "
                             f"{r['skipped']} | | | |")
                continue
            lines.append(f"| {r['model']} | {r['model_dtype']} | {r['tokens']:,} | {r['tokens'] / r['forward_s']:,.0f} | "
                         f"{r['tokens'] / r['writer_s']:,.0f} | {r['ratio']:.2f} |")
    if "summary" in results.get("tests", {}):
        lines += ["", f"gpu tests: {results['tests']['summary']}"]
    errors = {k: v["error"] for k, v in results.items() if isinstance(v, dict) and "error" in v}
    if errors:
        lines += [""] + [f"error in {k}: {v}" for k, v in errors.items()]
    lines += ["", "seconds per section: " + ", ".join(f"{k} {v}" for k, v in results.get("seconds", {}).items())]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (CI keeps the suite runnable)")
    ap.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu_suite", help="folder for the JSON and tables")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="seconds for all sections (default 420: one 10-minute device call with the machine's start, "
                         "the wheel install and the imports; smoke 300)")
    ap.add_argument("--sections", default="env,peak,step,loader,sweep,saelens,writer,tests")
    ap.add_argument("--scratch", default=None,
                    help="where the temporary scratch directory goes (the ~3 GB cache; default: the system's)")
    args = ap.parse_args()
    sizes = SMOKE if args.smoke else FULL
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --smoke for the CPU version")
    _stub_wandb()
    budget = args.budget_s if args.budget_s is not None else 300 if args.smoke else 420
    # Shares of the time left when each section starts (the last ones get what is left).
    shares = {"env": 1.0, "peak": 0.1, "step": 0.5, "loader": 0.3, "sweep": 0.4, "saelens": 0.4, "writer": 0.6,
              "tests": 1.0}
    wanted = [s for s in args.sections.split(",") if s]
    if args.smoke:
        wanted = [s for s in wanted if s != "tests"]  # CI runs the test suite itself
    with tempfile.TemporaryDirectory(prefix="gpu_suite_", dir=args.scratch) as scratch:
        suite = Suite(sizes, Path(args.out), budget, args.smoke, Path(scratch))
        for name in wanted:
            suite.run_section(name, getattr(suite, name), shares.get(name, 0.5))
    text = markdown(suite.results)
    (suite.out / "gpu_suite.md").write_text(text)
    suite.save()
    print(text)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
