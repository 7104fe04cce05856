"""Closed-loop control of a penalty-based SAE's sparsity coefficient toward a target L0.

Architectures whose sparsity is set by a penalty (standard and gated: `l1_coefficient`; JumpReLU:
`l0_coefficient`; their transcoders too) keep the coefficient as an (R,) buffer that the forward
reads every step. After each optimizer step the controller moves run r's coefficient c_r in log
space (L0 ~ c^-a over a wide range, so a multiplicative step has the same loop gain at any c):

    l_r      = log ema_r(L0)                              a few steps' smoothing of the batch L0
    s_r(t)   = log target_r + excess_r (1 - p_r(t))^2     the setpoint
    ahead_r  = clamp(l_r + D_r (l_r - l_r[t-1]) - s_r(t + D_r), +-max_error)
    drift_r += drift_gain f_r ahead_r    (only while |l_r - s_r(t)| < drift_band; |drift_r| <= max_drift)
    log c_r += f_r^lr_power (gain ahead_r + drift_r)

- **Hold.** Nothing moves during the lr warm-up (and a penalty warm-up): L0 starts at about half
  the latents and falls by itself at any coefficient while the SAE cannot yet follow one;
  integrating then only winds the coefficient up (measured: a standard SAE collapsed to L0 3 for a
  target of 16 and recovered slowly).
- **Setpoint.** L0 comes down from where the hold left it (`excess_r`, 0 if already below) to the
  target over [hold, `approach` x run length], as an SAE's L0 does at a fixed coefficient; a run
  held at its target from the start spends most of its steps at a larger penalty and ends worse
  (a standard transcoder at L0 32: explained variance 0.66 against 0.72 with the setpoint).
- **Look ahead.** The error is judged `D` steps ahead at L0's current rate, so the controller stops
  pushing while L0 is on its way (the SAE follows a new coefficient with a lag). For JumpReLU that
  lag is inversely proportional to how fast its thresholds move (lr x threshold_rate), and so is
  its D (`reference_speed`).
- **Drift.** At a fixed coefficient L0 keeps creeping down as an SAE trains; an integral step
  alone then trails its target by a few percent. `drift_r` learns that trend (a second integrator),
  near the setpoint only, where it is the trend and not a transient.
- **Schedule.** `f_r` is the run's lr factor (0 once it is done or failed): the SAE follows at a
  speed proportional to its lr. The steps scale with its square root, so the controller slows with
  the decay (settling) yet keeps enough gain to hold the target while the lr is small.

Everything is (R,) tensor arithmetic on the device: no host sync a step. The state (EMA, drift,
excess; the coefficient is a model buffer) goes into checkpoints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from pipeline.errors import PipelineError

COEFFICIENTS = ("l1_coefficient", "l0_coefficient")
"""The (R,) buffers a penalty-based architecture scales its sparsity penalty by."""


@dataclass
class ControllerConfig:
    """How fast and how smoothly the coefficient follows the measured L0."""

    gain: float = 0.02
    """Change of log(coefficient) per step for a log-error of 1 at full lr."""
    max_error: float = 1.0
    """Bound on the predicted log error used in one update (the largest step is gain x this)."""
    ema: float = 0.9
    """Smoothing of the batch L0 (weight of the previous average)."""
    drift_gain: float = 0.003
    """How fast the learnt drift of log(coefficient) per step follows the error."""
    lr_power: float = 0.5
    """The steps scale with the lr schedule's factor to this power."""
    approach: float = 0.75
    """Fraction of the run by which the setpoint has come down to the target (the rest settles)."""
    drift_band: float = 0.25
    """The drift is learnt only while |log(L0 / setpoint)| is below this."""
    max_drift: float = 0.01
    """Bound on the learnt drift of log(coefficient) per step."""
    damping: float = 40.0
    """D: steps ahead at which the error is predicted from L0's current rate of change."""
    reference_speed: float | None = None
    """The speed `damping` was tuned at, lr x the model's `threshold_rate` (1 if it has none): a run
    at speed v looks damping x reference_speed / v steps ahead (its L0 follows the coefficient at a
    speed proportional to v); None: damping steps at any speed."""


# The defaults by coefficient. An L1 penalty acts on every active latent's magnitude at once, so L0
# follows its coefficient within a few steps: a strong proportional term (gain x damping) would
# oscillate (a standard transcoder on the default cache: L0 swinging 10-30 with a period of 20 steps,
# 18% of latents dead). JumpReLU's L0 penalty moves only the thresholds, through a straight-through
# estimator at Adam's pace: L0 follows with a lag of ~50 steps and the coefficient must travel
# 10-100x, which needs a faster integral and a longer look ahead; and since that lag is set by how
# far Adam moves a log threshold per step (lr x threshold_rate, trainer/sae_jumprelu.py), the look
# ahead shrinks as that grows (tuned at lr 1e-3 x rate 20; 50 steps oscillated at lr 3e-3, L0
# swinging 52-110 with a period of ~40 steps, BENCHMARKS.md).
CONTROLLERS = {"l1_coefficient": ControllerConfig(gain=0.02, damping=40.0, max_error=3.0),
               "l0_coefficient": ControllerConfig(gain=0.1, damping=50.0, reference_speed=1e-3 * 20)}


def coefficient_name(model: torch.nn.Module) -> str | None:
    """The model's sparsity coefficient buffer, or None (a k-based architecture)."""
    return next((n for n in COEFFICIENTS if isinstance(getattr(model, n, None), torch.Tensor)), None)


class TargetL0:
    """Per-run control of `model`'s coefficient toward `targets` (NaN: that run is left alone)."""

    def __init__(self, model: torch.nn.Module, targets: Sequence[float | None], cfg: ControllerConfig | None = None,
                 hold_steps: int = 0, totals: torch.Tensor | None = None, lrs: torch.Tensor | None = None):
        name = coefficient_name(model)
        if name is None:
            raise PipelineError(f"architecture {getattr(model, 'architecture_name', type(model).__name__)!r} has no "
                                f"sparsity coefficient ({' or '.join(COEFFICIENTS)}) to steer to a target L0; "
                                "set its k instead")
        self.cfg = cfg or CONTROLLERS[name]
        self.coefficient: torch.Tensor = getattr(model, name)
        self.name = name
        device = self.coefficient.device
        values = [math.nan if t is None else float(t) for t in targets]
        if len(values) != self.coefficient.shape[0]:
            raise PipelineError(f"{len(values)} target L0s for a stack of {self.coefficient.shape[0]} runs")
        for t in values:
            if not math.isnan(t) and t <= 0:
                raise PipelineError(f"target_l0 must be positive, got {t:g}")
        self.targets = torch.tensor(values, dtype=torch.float32, device=device)
        self.active = ~self.targets.isnan()
        self.log_target = self.targets.nan_to_num(1.0).log()
        self.ema = torch.zeros_like(self.targets)
        self.drift = torch.zeros_like(self.targets)
        # log(L0 / target) when the hold ends (0 if already below): the setpoint comes down from there.
        self.excess = torch.zeros_like(self.targets)
        # The step by which each run's setpoint reaches its target (a run of unknown length aims at
        # its target as soon as the hold ends).
        ends = (totals.to(device, torch.float32) * self.cfg.approach if totals is not None
                else torch.full_like(self.targets, math.nan))
        self.approach_end = ends.nan_to_num(0.0).clamp_min(hold_steps + 1)
        self.hold_steps = hold_steps  # the lr warm-up and the penalty's own (module docstring)
        # (R,) look-ahead in steps: `damping`, or scaled by each run's speed (cfg.reference_speed).
        damping = torch.full_like(self.targets, self.cfg.damping)
        if self.cfg.reference_speed is not None and lrs is not None:
            speed = lrs.to(device, torch.float32) * getattr(model, "threshold_rate", 1.0)
            damping = (damping * self.cfg.reference_speed / speed.clamp_min(1e-12)).clamp_(
                self.cfg.damping / 10, self.cfg.damping * 10)
        self.damping = damping
        self.steps = 0

    @torch.no_grad()
    def update(self, out: dict[str, torch.Tensor], rows: int, factors: torch.Tensor) -> dict[str, torch.Tensor]:
        """After an optimizer step: `out` is the step's forward output over `rows` rows (with data
        parallelism, the global one: its `fired` counts summed over the ranks), `factors` the lr
        schedule's (R,) multipliers of that step (0 for a frozen run). Returns the coefficient as a
        term to log with the step's other (R,) terms."""
        l0 = out["fired"].float().sum(dim=-1) / rows if "fired" in out else out["l0"].detach().float()
        if self.steps == 0:
            self.ema.copy_(l0)
        prev = self.ema.clamp_min(1e-3).log()
        self.ema.lerp_(l0, 1 - self.cfg.ema)
        self.steps += 1
        log_l0 = self.ema.clamp_min(1e-3).log()
        if self.steps == max(self.hold_steps, 1):
            self.excess.copy_((log_l0 - self.log_target).clamp_min(0.0))
        if self.steps > self.hold_steps:
            error = log_l0 - self.setpoint(self.steps)
            # L0 predicted `damping` steps ahead at its current rate, against the setpoint then: no
            # push while L0 is already on its way (the SAE follows a new coefficient with a lag).
            ahead = log_l0 + self.damping * (log_l0 - prev) - self.setpoint(self.steps + self.damping)
            ahead.clamp_(-self.cfg.max_error, self.cfg.max_error)
            f = factors.to(error.dtype).pow(self.cfg.lr_power)
            # The drift is learnt near the target only: far from it, the error is the transient's
            # (integrating it winds the coefficient past where it settles).
            near = error.abs() < self.cfg.drift_band
            self.drift.add_(torch.where(near, self.cfg.drift_gain * f * ahead, 0.0))
            self.drift.clamp_(-self.cfg.max_drift, self.cfg.max_drift)
            step = f * (ahead * self.cfg.gain + self.drift)
            self.coefficient.mul_(torch.where(self.active, step, 0.0).exp_().to(self.coefficient.dtype))
        return {self.name: self.coefficient}

    def setpoint(self, step: float | torch.Tensor) -> torch.Tensor:
        """(R,) log L0 aimed at, at `step`: from the L0 the hold ended at down to the target, by
        (1 - progress)^2 over [hold, approach x run length], as an SAE's L0 falls at a fixed
        coefficient. Reaching the target early costs reconstruction: the run then spends most of
        its steps at a larger penalty than one that gets there at the end."""
        progress = ((step - self.hold_steps) / (self.approach_end - self.hold_steps)).clamp_(0.0, 1.0)
        return self.log_target + self.excess * (1 - progress).square_()

    def state_dict(self) -> dict:
        """JSON part of a checkpoint (the coefficient itself is a model buffer, saved with it)."""
        return {"ema": self.ema.tolist(), "drift": self.drift.tolist(), "excess": self.excess.tolist(),
                "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.ema.copy_(torch.tensor(state["ema"], dtype=self.ema.dtype))
        self.drift.copy_(torch.tensor(state["drift"], dtype=self.drift.dtype))
        self.excess.copy_(torch.tensor(state["excess"], dtype=self.excess.dtype))
        self.steps = int(state["steps"])


def make_controller(model: torch.nn.Module, targets: float | Sequence[float | None] | None,
                    cfg: ControllerConfig | None = None, hold_steps: int = 0,
                    totals: torch.Tensor | None = None, lrs: torch.Tensor | None = None) -> TargetL0 | None:
    """A controller for the runs of `model` that have a target (one for all, or one per run), else
    None. `totals`: the runs' step budgets; `lrs`: their base lrs (R,)."""
    if targets is None:
        return None
    n = getattr(model, "n_runs", None) or model.W_dec.shape[0]
    values = list(targets) if isinstance(targets, (list, tuple)) else [targets] * n
    if all(v is None or (isinstance(v, float) and math.isnan(v)) for v in values):
        return None
    hold = max(hold_steps, getattr(model, "l1_warmup_steps", 0) or 0, getattr(model, "l0_warmup_steps", 0) or 0)
    return TargetL0(model, values, cfg, hold_steps=hold, totals=totals, lrs=lrs)


def final_coefficients(model: torch.nn.Module, run: int) -> dict[str, float]:
    """Run `run`'s sparsity coefficient as it ended ({} for a k-based architecture), for its records."""
    name = coefficient_name(model)
    return {} if name is None else {name: float(getattr(model, name)[run])}
