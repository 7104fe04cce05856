"""The prepared GPU benchmark: every GPU figure the project reports, measured in one command.

    python3 benchmarks/gpu_suite.py --out DIR          # on one H100/H200 (about 7 minutes)
    python3 benchmarks/gpu_suite.py --smoke --out DIR  # the same code at tiny sizes on a CPU (CI)

On a GPU machine with nothing installed but its own Python and torch, run it through
`make bench-gpu` (installs the wheel folder made by `make gpu-wheels`, see BENCHMARKS.md). It writes
DIR/gpu_suite.json (every number, written after each section, so a run cut short keeps what it
measured) and DIR/gpu_suite.md (the tables), and prints the tables last. Sections, in this order
(each skips what would not fit in its share of `--budget-s`, and says so):

- env: the GPU, torch, and which optional packages import.
- peak: the limits measured in this run: a large bf16 / tf32 / fp32 matmul (TFLOP/s), a
  device-to-device copy and a pinned host-to-device copy (GB/s).
- step: one training step (`StackTrainer.train_step`: forward, backward, clipping, Adam, decoder
  constraint, dead-latent bookkeeping) per architecture at d_in 768 / 2304, d_sae 16384 / 65536,
  batch 4096, in bf16 / tf32 / fp32, with the fused and the plain kernels (`--kernels`), against
  the step's own dense matmuls alone in the same precision (ratio = dense / step; >= 0.9 is the
  goal for dense architectures, >= 1.0 for the sparse TopK family), and as a fraction of the
  large bf16 matmul's rate (the step's dense-matmul FLOPs / step time / peak). Also: the host syncs
  a step of `kernels=auto` makes (torch.cuda.set_sync_debug_mode), Adam's share of the step, and
  `torch.compile` of the plain path for standard and topk (a candidate for `auto` on CUDA).
- saelens: SAELens's `SAETrainer._train_step` (autocast on, the same shapes, data on the GPU) beside
  ours in bf16 with `kernels=auto`: tokens/s and ours / theirs (goal >= 2).
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
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from bench_trainer import dense_matmuls, make_model  # noqa: E402
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


FULL = Sizes("cuda", ((768, 16384), (768, 65536), (2304, 16384), (2304, 65536)), 4096, 8, 3, PRECISIONS, 8192,
             2_000_000, 768, 8, 60, "gpt2-small-random", 400_000, (768, 16384))
SMOKE = Sizes("cpu", ((16, 64),), 128, 2, 1, ("bf16", "fp32"), 256, 20_000, 16, 3, 4, "tiny", 4096, None)


class Suite:
    """Sections write into `results`; each measurement is guarded (an error is recorded, not fatal)."""

    def __init__(self, sizes: Sizes, out: Path, budget_s: float, smoke: bool):
        self.sizes, self.out, self.smoke = sizes, out, smoke
        self.t0, self.budget_s = time.perf_counter(), budget_s
        self.results: dict = {"meta": {"smoke": smoke, "date": time.strftime("%Y-%m-%d %H:%M"), "sizes":
                                       dataclasses.asdict(sizes)}}
        self.deadline = self.t0 + budget_s
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
        """Run a section with `share` of the time left; its errors are recorded, not raised."""
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
        out = {}
        for prec, dtype in (("bf16", torch.bfloat16), ("tf32", torch.float32), ("fp32", torch.float32)):
            a, b = (torch.randn(n, n, device=dev).to(dtype) for _ in range(2))
            with compute_precision("tf32" if prec == "tf32" else "fp32", dev):
                s = self.seconds_per_call(lambda: a @ b, steps=10, warmup=3)
            out[f"matmul_{prec}_tflops"] = 2 * n ** 3 / s / 1e12
        src = torch.empty(256 << 20 if not self.smoke else 1 << 20, dtype=torch.uint8, device=dev)
        dst = torch.empty_like(src)
        s = self.seconds_per_call(lambda: dst.copy_(src), steps=10, warmup=2)
        out["d2d_copy_gbs"] = 2 * src.numel() / s / 1e9  # bytes read + written
        if dev.startswith("cuda"):
            host = torch.empty(src.numel(), dtype=torch.uint8, pin_memory=True)
            s = self.seconds_per_call(lambda: dst.copy_(host, non_blocking=True), steps=10, warmup=2)
            out["h2d_pinned_gbs"] = src.numel() / s / 1e9
        self.results["peak"] = out

    # -- step ---------------------------------------------------------------------------------------

    def step(self) -> None:
        rows, B = [], self.sizes.batch
        peak = self.results.get("peak", {}).get("matmul_bf16_tflops")
        dense_cache: dict = {}
        for prec in self.sizes.precisions:
            for d_in, d_sae in self.sizes.shapes:
                for arch in registered_architectures():
                    if self.section_left() <= 0:
                        rows.append({"arch": arch, "d_in": d_in, "d_sae": d_sae, "precision": prec,
                                     "skipped": "time budget"})
                        continue
                    rows += self._step_rows(arch, d_in, d_sae, B, prec, dense_cache, peak)
                    self.results["step"] = {"rows": rows}
                    self.save()
        if self.sizes.compile_shape and self.section_left() > 60:
            d_in, d_sae = self.sizes.compile_shape
            for arch in ("standard", "topk"):
                rows += self._step_rows(arch, d_in, d_sae, B, "bf16", dense_cache, peak, kernels=("plain",),
                                        compiled=True)
        self.results["step"] = {"rows": rows}

    def _step_rows(self, arch: str, d_in: int, d_sae: int, B: int, prec: str, dense_cache: dict,
                   peak: float | None, kernels: tuple[str, ...] = ("fused", "plain"), compiled: bool = False
                   ) -> list[dict]:
        dev = self.sizes.device
        cls = get_architecture(arch)
        key = (d_in, d_sae, prec, cls.dense_matmuls)
        if key not in dense_cache:
            run = dense_matmuls(B, d_in, d_sae, cls.dense_matmuls, dev, torch.bfloat16 if prec == "bf16" else torch.float32)
            with compute_precision("tf32" if prec == "tf32" else "fp32", dev):
                dense_cache[key] = self.seconds_per_call(run)
        dense_s = dense_cache[key]
        out = []
        g = torch.Generator().manual_seed(1)
        batches = [torch.randn(B, d_in, generator=g).to(dev) for _ in range(4)]
        for kernels_ in kernels:
            row = {"arch": arch, "d_in": d_in, "d_sae": d_sae, "precision": prec,
                   "kernels": kernels_ + ("+compile" if compiled else ""), "dense_ms": dense_s * 1e3}
            model = make_model(arch, d_in, d_sae).to(dev)
            model.init_b_dec(batches[0], "mean")
            row["auto"] = self.auto_kernels(arch, prec) == kernels_
            try:
                trainer = StackTrainer(model, LoopConfig(lr=1e-4, precision=prec, kernels=kernels_, log_every=10**9))
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
                step_s = self.seconds_per_call(one)
            except PipelineError as e:  # a fused kernel that cannot compute in this precision
                row["n/a"] = str(e)
                out.append(row)
                continue
            flops = cls.dense_matmuls * 2 * B * d_in * d_sae
            row.update(step_ms=step_s * 1e3, ratio=dense_s / step_s, tokens_per_s=B / step_s,
                       frac_bf16_peak=flops / step_s / (peak * 1e12) if peak else None)
            if prec == "bf16":
                row["adam_ms"] = self.seconds_per_call(trainer.opt.step, steps=5, warmup=1) * 1e3
                row["syncs"] = self._syncs(one)
            out.append(row)
            trainer = model = None  # free the GPU memory before the next shape
            if dev.startswith("cuda"):
                torch.cuda.empty_cache()
        return out

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
        import sae_lens
        from sae_lens.config import SAETrainerConfig
        from sae_lens.saes.matryoshka_batchtopk_sae import MatryoshkaBatchTopKTrainingSAEConfig
        from sae_lens.training.sae_trainer import SAETrainer

        dev, B = self.sizes.device, self.sizes.batch
        ours = {(r["arch"], r["d_in"], r["d_sae"]): r for r in self.results.get("step", {}).get("rows", [])
                if r.get("precision") == "bf16" and r.get("step_ms") and r.get("auto")}
        rows = []
        for d_in, d_sae in self.sizes.shapes:
            configs = {
                "topk": sae_lens.TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=32),
                "batchtopk": sae_lens.BatchTopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=32),
                "standard": sae_lens.StandardTrainingSAEConfig(d_in=d_in, d_sae=d_sae),
                "jumprelu": sae_lens.JumpReLUTrainingSAEConfig(d_in=d_in, d_sae=d_sae),
                "gated": sae_lens.GatedTrainingSAEConfig(d_in=d_in, d_sae=d_sae),
                "matryoshka": MatryoshkaBatchTopKTrainingSAEConfig(
                    d_in=d_in, d_sae=d_sae, k=32, matryoshka_widths=[d_sae // 16, d_sae // 8, d_sae // 4, d_sae // 2,
                                                                     d_sae]),
            }
            for arch, cfg in configs.items():
                row = {"arch": arch, "d_in": d_in, "d_sae": d_sae}
                if self.section_left() <= 0:
                    rows.append({**row, "skipped": "time budget"})
                    continue
                sae = sae_lens.TrainingSAE.from_dict({**cfg.to_dict(), "device": dev}).to(dev)
                trainer = SAETrainer(SAETrainerConfig(total_training_samples=10**9, train_batch_size_samples=B,
                                                      device=dev, autocast=True, lr=3e-4, lr_end=3e-4), sae,
                                     data_provider=iter([]))
                x = torch.randn(B, d_in, device=dev)
                s = self.seconds_per_call(lambda: trainer._train_step(sae, x))
                row["saelens_tokens_per_s"] = B / s
                mine = ours.get((arch, d_in, d_sae))
                if mine:
                    row["ours_tokens_per_s"] = mine["tokens_per_s"]
                    row["ours_over_saelens"] = mine["tokens_per_s"] / row["saelens_tokens_per_s"]
                rows.append(row)
                sae = trainer = None
                self.results["saelens"] = {"rows": rows}
                self.save()

    def auto_kernels(self, arch: str, precision: str) -> str:
        """The path `kernels=auto` takes for an SAE of `arch` on this device in `precision`."""
        cls = get_architecture(arch)
        fused = self.sizes.device.split(":")[0] in cls.fused_on and (precision != "bf16" or cls.fused_autocast)
        return "fused" if fused else "plain"

    # -- loader and sweep ---------------------------------------------------------------------------

    def _cache(self) -> Path:
        """A bf16 cache of `loader_rows` rows x `loader_d` on local disk (written once per suite)."""
        path = self.out / "suite_cache"
        if (path / "manifest.json").exists():
            return path
        from pipeline.writer import ActivationBlock, CacheWriter, WriterConfig

        shutil.rmtree(path, ignore_errors=True)
        n, d = self.sizes.loader_rows, self.sizes.loader_d
        w = CacheWriter(path, {"x": d}, WriterConfig(dtype="bfloat16", shard_mb=256 if not self.smoke else 0.05))
        g = torch.Generator().manual_seed(0)
        chunk = 65536
        block = torch.randn(chunk, d, generator=g)
        for start in range(0, n, chunk):
            w.put(ActivationBlock({"x": block[: min(chunk, n - start)] + start % 7}))
        w.close()
        return path

    def loader(self) -> None:
        from bench_loader import raw_read

        from pipeline.loader import ActivationLoader

        dev = self.sizes.device
        path = self._cache()
        files = [p for p in (path / "hooks").rglob("*") if p.is_file() and not p.name.endswith(".json")]
        raw_read(files)  # warm the page cache
        raw_s, raw_bytes = raw_read(files)
        res = {"cache_gib": raw_bytes / 2**30, "raw_read_gbs": raw_bytes / raw_s / 1e9}
        h2d = self.results.get("peak", {}).get("h2d_pinned_gbs")
        if h2d:
            res["h2d_pinned_gbs"] = h2d
        loader = ActivationLoader(path, hooks="x", batch_size=self.sizes.batch, device=dev, dtype=torch.bfloat16)
        t0, rows = time.perf_counter(), 0
        for b in loader:
            rows += b.shape[0]
        self.sync()
        s = time.perf_counter() - t0
        res["loader_gbs"] = rows * self.sizes.loader_d * 2 / s / 1e9  # stored bf16 bytes delivered
        res["loader_over_limit"] = res["loader_gbs"] / min(res["raw_read_gbs"], h2d or res["raw_read_gbs"])
        self.results["loader"] = res
        self.save()
        # End to end: the training loop fed by the streaming loader against the same step on batches
        # already on the device.
        d_in, d_sae = self.sizes.shapes[0]
        d_in = self.sizes.loader_d
        steps = self.sizes.sweep_steps * 2
        tokens = steps * self.sizes.batch
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
        self.results["loader"] = res

    def _trainer(self, arch: str, d_in: int, d_sae: int, runs: int) -> StackTrainer:
        cls = get_architecture(arch)
        cfgs = [cls.config_class(d_in=d_in, d_sae=d_sae, k=32, seed=r) for r in range(runs)]
        lrs = [1e-4 * (1 + r) for r in range(runs)]
        model = cls(cfgs).to(self.sizes.device)
        return StackTrainer(model, LoopConfig(lr=lrs, precision="auto", init_scale_search=False, b_dec_init="mean",
                                              log_every=10**9))

    def sweep(self) -> None:
        """8 TopK runs as one stack on a resident cache, against the 8 run one by one, streamed."""
        from pipeline.loader import ActivationLoader

        path, dev, B = self._cache(), self.sizes.device, self.sizes.batch
        d_in, d_sae, R = self.sizes.loader_d, self.sizes.shapes[0][1], self.sizes.sweep_runs
        tokens = self.sizes.sweep_steps * B

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

        train(1, "no")  # warm-up: kernels, allocator, page cache
        stacked = train(R, "yes")
        one_by_one = sum(train(1, "no") for _ in range(R))
        self.results["sweep"] = {"runs": R, "tokens_per_run": tokens, "stacked_resident_s": stacked,
                                 "one_by_one_streamed_s": one_by_one, "speedup": one_by_one / stacked}

    # -- writer, tests ------------------------------------------------------------------------------

    def writer(self) -> None:
        from bench_writer import measure_writer

        rows = []
        for model_dtype, dtype in (("float32", "float32"), ("bfloat16", "bfloat16")):
            if self.section_left() <= 0:
                rows.append({"model_dtype": model_dtype, "skipped": "time budget"})
                continue
            r = measure_writer(self.sizes.writer_model, self.sizes.device, self.sizes.writer_tokens, 32, 128,
                               None, "zarr", dtype, model_dtype, str(self.out / "writer"))
            rows.append({k: v for k, v in r.items() if k != "stages"} | {"stages": r["stages"]})
            self.results["writer"] = {"rows": rows}
            self.save()

    def tests(self) -> None:
        timeout = max(30, int(self.section_left()))
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
    peak = results.get("peak", {})
    if peak:
        lines += ["", "| limit | measured |", "| --- | ---: |"]
        lines += [f"| {k} | {_fmt(v, '.1f')} |" for k, v in peak.items()]
    step = results.get("step", {}).get("rows", [])
    if step:
        lines += ["", "Training step (R=1, batch " + str(results["meta"]["sizes"]["batch"]) + "): ratio = its dense "
                  "matmuls alone / the step; peak = dense-matmul FLOPs per step time / the bf16 matmul peak",
                  "", "| arch | d_in | d_sae | precision | kernels | auto | step ms | dense ms | ratio | peak | tokens/s "
                  "| Adam ms | syncs |", "| --- | ---: | ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in step:
            if "skipped" in r or "n/a" in r:
                lines.append(f"| {r['arch']} | {r['d_in']} | {r['d_sae']} | {r['precision']} | {r.get('kernels', '-')} "
                             f"| | {r.get('skipped') or 'n/a'} | | | | | | |")
                continue
            lines.append(f"| {r['arch']} | {r['d_in']} | {r['d_sae']} | {r['precision']} | {r['kernels']} | "
                         f"{_fmt(r.get('auto'))} | {_fmt(r['step_ms'])} | {_fmt(r['dense_ms'])} | {_fmt(r['ratio'])} | "
                         f"{_fmt(r.get('frac_bf16_peak'))} | {r['tokens_per_s']:,.0f} | {_fmt(r.get('adam_ms'))} | "
                         f"{_fmt(r.get('syncs'))} |")
    sl = results.get("saelens", {}).get("rows", [])
    if sl:
        lines += ["", "Against SAELens's SAETrainer (autocast, data on the device); ours: bf16, kernels=auto", "",
                  "| arch | d_in | d_sae | SAELens tokens/s | ours tokens/s | ours / SAELens |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for r in sl:
            lines.append(f"| {r['arch']} | {r['d_in']} | {r['d_sae']} | {_fmt(r.get('saelens_tokens_per_s'), ',.0f')} | "
                         f"{_fmt(r.get('ours_tokens_per_s'), ',.0f')} | {_fmt(r.get('ours_over_saelens'))} |")
    for name in ("loader", "sweep"):
        sec = results.get(name, {})
        if sec:
            lines += ["", f"{name}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in sec.items())]
    wr = results.get("writer", {}).get("rows", [])
    if wr:
        lines += ["", "| writer | model dtype | tokens | forward tok/s | writer tok/s | writer / forward |",
                  "| --- | --- | ---: | ---: | ---: | ---: |"]
        for r in wr:
            if "skipped" in r:
                continue
            lines.append(f"| {r['model']} | {r['model_dtype']} | {r['tokens']:,} | {r['tokens'] / r['forward_s']:,.0f} | "
                         f"{r['tokens'] / r['writer_s']:,.0f} | {r['ratio']:.2f} |")
    if "tests" in results:
        lines += ["", f"gpu tests: {results['tests'].get('summary')}"]
    errors = {k: v["error"] for k, v in results.items() if isinstance(v, dict) and "error" in v}
    if errors:
        lines += [""] + [f"error in {k}: {v}" for k, v in errors.items()]
    lines += ["", "seconds per section: " + ", ".join(f"{k} {v}" for k, v in results.get("seconds", {}).items())]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (CI keeps the suite runnable)")
    ap.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu_suite", help="folder for the JSON and tables")
    ap.add_argument("--budget-s", type=float, default=None, help="time for all sections (default 420; smoke 300)")
    ap.add_argument("--sections", default="env,peak,step,loader,sweep,saelens,writer,tests")
    args = ap.parse_args()
    sizes = SMOKE if args.smoke else FULL
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --smoke for the CPU version")
    _stub_wandb()
    suite = Suite(sizes, Path(args.out), args.budget_s or (300 if args.smoke else 420), args.smoke)
    # Shares of the time left when each section starts (the last ones get what is left).
    shares = {"env": 1.0, "peak": 0.1, "step": 0.5, "loader": 0.3, "sweep": 0.4, "saelens": 0.4, "writer": 0.6,
              "tests": 1.0}
    wanted = [s for s in args.sections.split(",") if s]
    if args.smoke:
        wanted = [s for s in wanted if s != "tests"]  # CI runs the test suite itself
    for name in wanted:
        suite.run_section(name, getattr(suite, name), shares.get(name, 0.5))
    scratch = suite.out / "suite_cache"
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.rmtree(suite.out / "writer", ignore_errors=True)
    text = markdown(suite.results)
    (suite.out / "gpu_suite.md").write_text(text)
    suite.save()
    print(text)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
