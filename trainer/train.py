"""The training loop: one stack of R runs stepped on every batch of any `(batch, d_in)` iterator.

Per-run Adam with warm-up and decay, b_dec and the initial scale from the data, decoder
constraints, the architecture's schedules and dead-latent bookkeeping, per-run metrics (every
(R,) term the forward returns) to any logger, an evaluator every N steps, checkpoints with exact
resume, and per-run divergence handling: a run whose loss turns NaN/Inf is frozen at its last good
weights while the others go on.
"""

from __future__ import annotations

import inspect
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

import torch

from pipeline import distributed
from pipeline.errors import PipelineError
from trainer.checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint, truncate_metrics
from trainer.init import search_init_scale_
from trainer.interrupt import StopOnSignal
from trainer.optim import StackedAdam
from trainer.precision import compute_precision, resolve_precision
from trainer.stack import KERNELS, StackedSAE
from trainer.target_l0 import make_controller

if TYPE_CHECKING:
    from trainer.distributed import DataParallel


@dataclass
class LoopConfig:
    """How a stack is trained (the architecture's own config holds its shape and sparsity)."""

    lr: float | list[float | None] | None = None
    """Adam learning rate, one per run or one for all (None: `default_lr(d_sae)`)."""
    lr_warmup_steps: int | None = None
    """Linear warm-up from 0 (None: 5% of total_steps; none when the length is unknown)."""
    lr_decay: str = "linear"
    """After the warm-up: 'linear' (constant, then to 0 over the last 20% of steps), 'cosine' (to 10%
    of lr) or 'constant'."""
    max_grad_norm: float | list[float] = 1.0
    """Per-run gradient clipping (inf: none)."""
    b_dec_init: str = "geometric_median"
    """'mean', 'geometric_median' or 'zeros': b_dec from the first batch (SAELens's zeros train
    poorly on activations with a large mean)."""
    init_scale_search: bool = True
    """Grid-search the initial weight scale on the first batch (trainer.init.search_init_scale_)."""
    dense_threshold: float = 0.1
    """A latent firing on more than this fraction of a logging window's tokens counts as dense."""
    log_every: int = 50
    """Steps between metric lines."""
    total_steps: int | None = None
    """For the schedule; None = as many steps as the iterator gives (then decay is off)."""
    metrics_path: str | None = None
    """JSONL file the metric lines go to."""
    precision: str = "auto"
    """fp32, tf32 or bf16 (autocast matmuls, float32 weights and losses); auto: bf16 on CUDA, else fp32
    (trainer.precision)."""
    kernels: str = "auto"
    """plain (autograd through each architecture's formulas), fused (its hand-written kernel) or auto
    (per device, the one measured faster)."""
    target_l0: float | list[float | None] | None = None
    """Per run (or one for all): the L0 a controller steers the sparsity coefficient to
    (trainer.target_l0; penalty-based architectures); None: the coefficient stays as configured."""


def lr_factors(step: torch.Tensor, cfg: LoopConfig, totals: torch.Tensor) -> torch.Tensor:
    """The schedule's multiplier of lr at `step` (a 0-d tensor) for runs of `totals` steps (R,),
    NaN or 0 where a run's length is unknown (then no decay). Computed where the tensors live: on a
    GPU the loop then needs no host-to-device copy a step (a blocking copy waits for the GPU)."""
    if cfg.lr_decay not in ("constant", "cosine", "linear"):
        raise ValueError(f"unknown lr_decay {cfg.lr_decay!r}; use constant, cosine or linear")
    s = step.to(totals.dtype)
    factors = torch.ones_like(totals)
    if cfg.lr_decay != "constant":
        progress = (s / totals).clamp(max=1.0)
        decayed = (0.1 + 0.9 * 0.5 * (1 + torch.cos(math.pi * progress)) if cfg.lr_decay == "cosine"
                   else ((1 - progress) / 0.2).clamp(max=1.0))
        factors = torch.where(totals.isnan() | (totals == 0), factors, decayed)
    warmup = warmup_steps(cfg)
    if warmup:
        factors = torch.where(s < warmup, (s + 1) / warmup, factors)
    return factors


def default_lr(d_sae: int) -> float:
    """The default Adam lr: 3e-3 at d_sae 2048, scaled by 1/sqrt(d_sae) (the loss-optimal lr of Gao
    et al. 2024 falls as n_latents^-0.5; 1.1e-3 at 16k). Measured (BENCHMARKS.md, "Ours with defaults
    against a tuned SAELens"): at d_sae 2048 it beats SAELens tuned over lr {3e-4, 1e-3, 3e-3}, where
    1e-3 lost 0.009 explained variance in 1M-token runs; at a fixed lr, wider SAEs leave more latents
    dead, which the scaling offsets."""
    return 3e-3 * math.sqrt(2048 / d_sae)


WARMUP_FRACTION = 0.05
"""The default lr warm-up as a fraction of the run: a fixed 100 steps was 40% of a 1M-token run
(BENCHMARKS.md, "Training defaults")."""


def warmup_steps(cfg: LoopConfig) -> int:
    """The lr warm-up's length in steps: as configured, or 5% of the run (the stack's longest)."""
    if cfg.lr_warmup_steps is not None:
        return cfg.lr_warmup_steps
    return round(WARMUP_FRACTION * cfg.total_steps) if cfg.total_steps else 0


def run_lengths(steps: Sequence[int | None], device: torch.device | str = "cpu") -> torch.Tensor:
    """Runs' step budgets as `lr_factors` takes them: float64 (R,), NaN for an unknown length."""
    return torch.tensor([math.nan if n is None else float(n) for n in steps], dtype=torch.float64, device=device)


@torch.no_grad()
def explained_variance(x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """(R,) 1 - residual variance / total variance over the batch."""
    target = x if x.dim() == 3 else x.unsqueeze(0)
    total = (target - target.mean(dim=1, keepdim=True)).pow(2).sum(dim=(-1, -2))
    return 1 - (target - recon).pow(2).sum(dim=(-1, -2)) / total


class RunDiverged(PipelineError):
    """Every run of a stack stopped on a NaN/Inf loss; the last checkpoint holds their last good state."""


class StackTrainer:
    """The training state of one stack: its optimizer, schedule position, per-run stops, windows.

    `train_stack` drives one; a sweep drives several on the same batches. `run_steps[r]` is run r's
    own step budget (its lr schedule's length; the run is frozen once it has taken them), None for
    as many as the batches give. With `ddp` (trainer.distributed.DataParallel) every rank steps on
    its part of each global batch and the stack trains as one process would on the whole batch."""

    def __init__(self, model: StackedSAE, cfg: LoopConfig, run_steps: Sequence[int | None] | None = None,
                 ddp: "DataParallel | None" = None):
        self.model, self.cfg, self.ddp = model, cfg, ddp
        R, d_sae = model.W_dec.shape[0], model.W_dec.shape[1]
        lr = default_lr(d_sae) if cfg.lr is None else cfg.lr
        if isinstance(lr, (list, tuple)):
            lr = [default_lr(d_sae) if v is None else v for v in lr]
        self.unit_norm = getattr(model, "unit_norm_decoder", False)
        self.opt = StackedAdam(dict(model.named_parameters()), lr=lr, max_grad_norm=cfg.max_grad_norm,
                               unit_rows="W_dec" if self.unit_norm else None)
        self.base_lr = self.opt.lr.clone()
        device = model.W_dec.device
        self.run_steps = list(run_steps) if run_steps is not None else [cfg.total_steps] * R
        self.step = 0
        # The step and the runs' lengths on the device too: the schedule and the frozen runs are
        # computed there, with no host round trip a step.
        self.step_t = torch.zeros((), dtype=torch.float64, device=device)
        self.totals = run_lengths(self.run_steps, device)
        self.failed = torch.zeros(R, dtype=torch.bool, device=device)
        self.fired = torch.zeros(R, d_sae, device=device)
        self.window_tokens = 0
        self.on_step, self.after_step = getattr(model, "on_step", None), getattr(model, "after_step", None)
        if cfg.kernels not in KERNELS:
            raise PipelineError(f"unknown kernels {cfg.kernels!r}; use one of {', '.join(KERNELS)}")
        model.kernels = cfg.kernels
        self.precision = resolve_precision(cfg.precision, device)
        # Held through the lr warm-up: the SAE cannot follow the coefficient yet (trainer.target_l0).
        self.controller = make_controller(model, cfg.target_l0, hold_steps=warmup_steps(cfg), totals=self.totals,
                                          lrs=self.base_lr)

    def init_from_data(self, first: torch.Tensor, target: torch.Tensor | None = None) -> None:
        """b_dec and the initial scale from the first batch (a fresh run only); `target` is a
        transcoder's output batch (b_dec lives in its space)."""
        gather = (lambda t: t.float()) if self.ddp is None else (lambda t: self.ddp.gather_rows(t.float()))
        sample = gather(first)
        target = gather(target) if target is not None else None
        if hasattr(self.model, "init_b_dec"):
            if target is not None:
                self.model.init_b_dec(sample, self.cfg.b_dec_init, target=target)
            elif len(inspect.signature(self.model.init_b_dec).parameters) >= 2:
                self.model.init_b_dec(sample, self.cfg.b_dec_init)
            else:  # a user architecture whose init_b_dec takes the sample only
                self.model.init_b_dec(sample)
        # Not for transcoders: random untied directions reconstruct nothing at any scale, and the
        # search then picks a tiny one that slows the start (measured).
        has_weights = hasattr(self.model, "W_enc") and hasattr(self.model, "W_dec")
        if self.cfg.init_scale_search and target is None and has_weights:
            search_init_scale_(self.model, sample)
        if self.ddp is not None:
            self.ddp.broadcast_module(self.model)  # every rank starts from rank 0's weights

    def done(self) -> list[bool]:
        """Per run: has it taken its step budget (host values, no device sync)."""
        return [n is not None and self.step >= n for n in self.run_steps]

    def train_step(self, batch: torch.Tensor, target: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One step of every run that is neither done nor failed; returns the forward's output.
        `target`: what a transcoder reconstructs (None: the batch itself)."""
        model, opt = self.model, self.opt
        if self.on_step is not None:
            self.on_step(self.step, self.cfg.total_steps)
        args = (batch,) if target is None else (batch, target)
        with compute_precision(self.precision, batch.device):
            out = model(*args) if self.ddp is None else self.ddp.forward(model, *args)
        bad = ~torch.isfinite(out["loss"].detach())
        self.failed |= bad if self.ddp is None else self.ddp.any(bad)
        done = self.step_t >= self.totals  # a run of unknown length (NaN) is never done
        frozen = self.failed | done
        # Frozen runs get lr 0 (logged) and are skipped by the optimizer: their weights stay as they were.
        factors = lr_factors(self.step_t, self.cfg, self.totals).masked_fill_(frozen, 0.0)
        opt.lr.copy_(self.base_lr * factors.to(self.base_lr.dtype))
        opt.zero_grad()
        torch.where(frozen, torch.zeros_like(out["loss"]), out["loss"]).sum().backward()
        if self.ddp is not None:
            self.ddp.average_grads(opt.params.values())  # before clipping: the global batch's gradient
        # Frozen runs are skipped inside the optimizer's pass (their gradients may be NaN: a zero loss
        # through NaN weights), so no pass zeroes their gradients first. A unit-norm decoder's constraint
        # is part of the step (its gradient's parallel part removed, its rows renormalized).
        opt.step(skip=frozen)
        seen, rows = (out, batch.shape[0]) if self.ddp is None else self.ddp.global_out(out, batch.shape[0])
        if self.after_step is not None:
            self.after_step(seen, rows)
        if "fired" not in seen:
            raise PipelineError(f"the forward of {type(model).__name__} returned no `fired` (R, d_sae): every "
                                "architecture's forward returns its firing counts (trainer.stack.StepOutput)")
        self.fired += seen["fired"]
        if self.controller is not None:
            out.update(self.controller.update(seen, rows, factors))
        self.step += 1
        self.step_t += 1
        self.window_tokens += rows
        return out

    def metrics(self, out: dict[str, torch.Tensor], batch: torch.Tensor, target: torch.Tensor | None = None) -> dict:
        """Every (R,) term of the forward output, explained variance, lr, and the dead / dense
        fractions over the window since the last call (which this starts anew)."""
        with torch.no_grad():
            m = {name: v.tolist() for name, v in out.items() if v.dim() == 1}
            m["explained_variance"] = explained_variance(batch if target is None else target, out["recon"]).tolist()
            density = self.fired / max(self.window_tokens, 1)
            m["dead_fraction"] = (self.fired == 0).float().mean(dim=1).tolist()
            m["dense_fraction"] = (density > self.cfg.dense_threshold).float().mean(dim=1).tolist()
        m["lr"] = self.opt.lr.tolist()
        m["failed"] = self.failed.nonzero().flatten().tolist()
        if self.ddp is not None:
            m = self.ddp.mean_metrics(m)
        self.fired.zero_()
        self.window_tokens = 0
        return m

    def state(self) -> dict:
        """JSON part of a checkpoint (the tensors are the model's and optimizer's state dicts)."""
        state = {"step": self.step, "failed": self.failed.nonzero().flatten().tolist(),
                 "window_tokens": self.window_tokens}
        if self.controller is not None:
            state["target_l0"] = self.controller.state_dict()
        return state

    def tensors(self) -> dict[str, torch.Tensor]:
        """Tensor part of a checkpoint: the firing counts of the logging window under way, so that a
        run resumed off the logging grid logs the dead and dense fractions an unbroken run does."""
        return {"fired": self.fired}

    def load_state(self, state: dict, tensors: dict[str, torch.Tensor] | None = None) -> None:
        self.step = state["step"]
        self.window_tokens = state.get("window_tokens", 0)
        if tensors and "fired" in tensors:
            self.fired.copy_(tensors["fired"])
        self.step_t.fill_(float(self.step))
        self.failed.zero_()
        if state.get("failed"):
            self.failed[torch.tensor(state["failed"], dtype=torch.long)] = True
        if self.controller is not None and "target_l0" in state:
            self.controller.load_state_dict(state["target_l0"])


@dataclass
class Stack:
    """A stack in a fit: its trainer, how it reads its input (and target) from a batch, and what it
    last logged. `read(batch) -> (x, target or None)`: a transcoder's (x, target) pair, or one hook of
    a sweep's dict of hooks."""

    trainer: StackTrainer
    read: Callable[[Any], tuple[torch.Tensor, torch.Tensor | None]] = None  # type: ignore[assignment]
    last: dict = field(default_factory=dict)
    seconds: float = 0.0
    """Host seconds in its steps (its tokens/s in a sweep's summary)."""

    def __post_init__(self) -> None:
        if self.read is None:
            self.read = _pair


def fit(stacks: Sequence[Stack], batches: Iterable, *, log_every: int, on_log: Callable[[int, int, float], None],
        evaluator: Callable[[Stack], dict] | None = None, eval_every: int = 0, init: bool = True, tokens: int = 0,
        checkpoint: Callable[[int, int], None] | None = None, checkpoint_every: int = 0,
        checkpoint_path: Path | None = None, after: Callable[[int, int], None] | None = None,
        max_steps: int | None = None, world: int = 1, signals: bool = True) -> int:
    """The one training driver: step every stack that has steps left on each batch; returns the
    tokens seen (`tokens` when it started, the checkpoint's on a resume).

    The first batch initialises each stack from the data (`init`, a fresh run). After a step of a
    stack at a logging step (every `log_every`, and the last step of each of its runs) its metrics go
    to `stack.last` (with `evaluator(stack)` every `eval_every` steps), and once per batch with any,
    `on_log(step, tokens, tokens_per_s)` fans them out (console, JSONL, W&B; tokens/s over the steps
    since the previous line). When every run of every
    stack has diverged (checked at those steps only: a read-back makes the host wait for the GPU),
    `RunDiverged`. `checkpoint(step, tokens)` every `checkpoint_every` steps and at the end (at
    `checkpoint_path`, which Ctrl-C's message names), `after(step, tokens)` after each batch
    (snapshots), `max_steps` stops early. SIGINT/SIGTERM finish the step, checkpoint and stop
    (`signals=False`: data-parallel ranks, which must stop together, leave signals alone)."""
    step = 0
    window = (time.perf_counter(), tokens)  # since the last line: its tokens/s is the current speed, not an average
    stop = StopOnSignal(enabled=signals)
    try:
        for batch in stop.until(batches):
            logged, rows = False, 0
            for st in stacks:
                tr = st.trainer
                if all(tr.done()):
                    continue
                x, target = st.read(batch)
                if init:
                    tr.init_from_data(x, target)
                t = time.perf_counter()
                out = tr.train_step(x, target)
                st.seconds += time.perf_counter() - t
                if tr.step % log_every == 0 or tr.step in tr.run_steps:  # a run's last step is always logged
                    st.last = {**tr.metrics(out, x, target), "step": tr.step}
                    if evaluator is not None and eval_every and tr.step % eval_every == 0:
                        st.last.update(evaluator(st))
                    logged = True
                rows = x.shape[-2]
            if not rows:  # every run has taken its steps
                break
            init = False
            tokens += rows * world
            step = max(st.trainer.step for st in stacks)
            if logged:
                now = time.perf_counter()
                on_log(step, tokens, (tokens - window[1]) / (now - window[0]))
                window = (now, tokens)
                if all(bool(st.trainer.failed.all()) for st in stacks):
                    raise RunDiverged(f"every run's loss became NaN/Inf by step {step} (lower --lr or check the "
                                      "data); " + (f"the last good checkpoint is in {checkpoint_path.parent}"
                                                   if checkpoint_path else "no checkpoint was kept"))
            if checkpoint is not None and checkpoint_every and step % checkpoint_every == 0:
                checkpoint(step, tokens)
            if after is not None:
                after(step, tokens)
            if max_steps is not None and step >= max_steps:
                break
        if all(bool(st.trainer.failed.all()) for st in stacks):
            raise RunDiverged("every run's loss became NaN/Inf (lower --lr or check the data)")
        if checkpoint is not None and step:
            checkpoint(step, tokens)
        stop.end(step, checkpoint_path, max((n or 0) for st in stacks for n in st.trainer.run_steps) or None)
    finally:
        stop.restore()
    return tokens


def train_stack(model: StackedSAE, batches: Iterable[torch.Tensor], cfg: LoopConfig,
                evaluator: Callable[[StackedSAE], dict] | None = None, eval_every: int = 0,
                log: Callable[[dict], None] | None = print, run_dir: str | Path | None = None,
                checkpoint_every: int = 0, max_steps: int | None = None, config: dict | None = None,
                snapshot_steps: Sequence[int] = (), snapshot: Callable[[StackedSAE, int, int], None] | None = None,
                ddp: "DataParallel | None" = None, progress: Callable[[int, int], None] | None = None) -> dict:
    """Train every run of `model` on each batch (`fit` with one stack); returns the last metrics
    (lists per run).

    `batches` is any iterable of `(batch, d_in)` tensors, or of `(x, target)` pairs for a
    transcoder. With `run_dir`, a checkpoint is written
    every `checkpoint_every` steps and at the end, and an existing one is resumed: `batches` must
    then have `state_dict`/`load_state_dict` (as `ActivationLoader`) and training continues exactly
    where it stopped. `max_steps` stops early. `evaluator(model)` runs every `eval_every` steps
    (at a logging step) and its dict joins that line. `snapshot(model, step, tokens)` is called
    after each step in `snapshot_steps` (exports kept along the way). `progress(step, tokens)` hears
    where the loop is, before the first step (a resume's) and after every step. With `ddp`, every rank calls
    this on its part of each global batch (trainer.distributed); rank 0 alone writes the checkpoints,
    and the caller gives the other ranks no log, metrics file, evaluator or snapshot.

    A run whose loss is NaN/Inf is frozen (no update from that step on) and reported in the
    `failed` list of each line; when every run has failed, `RunDiverged` is raised without writing
    another checkpoint, so the last one holds the last good weights.
    """
    trainer = StackTrainer(model, cfg, ddp=ddp)
    stack = Stack(trainer)
    config = config or {}
    resumed = load_checkpoint(run_dir, {"": (model, trainer.opt)}, config) if run_dir else None
    tokens = 0
    if resumed:
        if "loader" in resumed:
            batches.load_state_dict(resumed["loader"])
        trainer.load_state(resumed, resumed["tensors"].get(""))
        tokens = resumed["tokens"]
    if progress is not None:
        progress(trainer.step, tokens)
    if cfg.metrics_path:  # lines logged after the checkpoint (a kill) are logged again from it
        truncate_metrics(cfg.metrics_path, tokens)
    metrics_file = open(cfg.metrics_path, "a") if cfg.metrics_path else None

    def on_log(step: int, seen: int, tokens_per_s: float) -> None:
        stack.last.update(step=step, tokens=seen, tokens_per_s=tokens_per_s)
        if log:
            log(stack.last)
        if metrics_file:
            metrics_file.write(json.dumps(stack.last) + "\n")
            metrics_file.flush()

    def checkpoint(step: int, seen: int) -> None:
        state = {**trainer.state(), "tokens": seen, "config": config}
        if hasattr(batches, "state_dict"):
            state["loader"] = batches.state_dict()  # with ddp, a collective: every rank comes here
        if ddp is None or ddp.rank == 0:
            save_checkpoint(run_dir, {"": (model, trainer.opt)}, state, {"": trainer.tensors()})
        if ddp is not None:
            # Nobody reads the run folder (a resume, the next command) before rank 0 has written it.
            distributed.barrier()

    snapshot_steps = set(snapshot_steps)

    def after(step: int, seen: int) -> None:
        if progress is not None:
            progress(step, seen)
        if snapshot is not None and step in snapshot_steps:
            snapshot(model, step, seen)

    try:
        tokens = fit([stack], batches, log_every=cfg.log_every, on_log=on_log, init=not resumed, tokens=tokens,
                     evaluator=(lambda st: evaluator(st.trainer.model)) if evaluator else None, eval_every=eval_every,
                     checkpoint=checkpoint if run_dir else None, checkpoint_every=checkpoint_every,
                     checkpoint_path=Path(run_dir) / CHECKPOINT if run_dir else None, after=after,
                     max_steps=max_steps, world=ddp.world if ddp else 1, signals=ddp is None)
    finally:
        if metrics_file:
            metrics_file.close()
    if not stack.last:  # fewer steps than log_every: report the final step anyway
        return {"step": trainer.step, "tokens": tokens, "failed": trainer.state()["failed"]}
    return stack.last


@torch.no_grad()
def _pair(item) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(input, target) of a batch: a transcoder's batches are pairs, an SAE's are its input alone."""
    return (item[0], item[1]) if isinstance(item, (tuple, list)) else (item, None)


def mixing_buffer(batches: Iterable[torch.Tensor], buffer_size: int, batch_size: int,
                  seed: int = 0) -> Iterator[torch.Tensor]:
    """Shuffle a stream of `(n, d)` tensors through a buffer of `buffer_size` rows, yielding
    `(batch_size, d)` batches (as SAELens's `mixing_buffer`): whenever the buffer is full it is
    permuted and the first half is served, so rows from far apart in the stream meet in a batch.
    The remainder is served, permuted, at the end (a last batch may be short)."""
    if buffer_size < 2 * batch_size:
        raise PipelineError(f"buffer_size {buffer_size} must be at least twice batch_size {batch_size}")
    g = torch.Generator().manual_seed(seed)
    buf: torch.Tensor | None = None
    for x in batches:
        buf = x if buf is None else torch.cat([buf, x])
        if len(buf) >= buffer_size:
            buf = buf[torch.randperm(len(buf), generator=g).to(buf.device)]
            serve = (len(buf) // 2) // batch_size * batch_size
            for i in range(0, serve, batch_size):
                yield buf[i:i + batch_size]
            buf = buf[serve:]
    if buf is not None and len(buf):
        buf = buf[torch.randperm(len(buf), generator=g).to(buf.device)]
        for i in range(0, len(buf), batch_size):
            yield buf[i:i + batch_size]
