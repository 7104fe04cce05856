"""Closed-loop control of a penalty-based SAE's sparsity coefficient toward a target L0.

Architectures whose sparsity is set by a penalty (standard and gated: `l1_coefficient`; JumpReLU:
`l0_coefficient`; their transcoders too) keep the coefficient as an (R,) buffer that the forward
reads every step. After each optimizer step the controller moves run r's coefficient in log space:

    e_r     = clamp(log(ema_r(L0) / target_r), -max_error, max_error)
    log c_r += gain * f_r * e_r

an integral controller on the log error (L0 ~ c^-a over a wide range, so a multiplicative update
has the same loop gain at any coefficient). `ema_r` smooths the batch L0 over a few steps. `f_r`
is the lr schedule's factor for the run (0 once it is done or failed): the SAE follows a change of
the coefficient at a speed proportional to its lr, so scaling the gain with it keeps the loop
equally damped through the warm-up and the decay, and the coefficient settles as the lr decays to
the end of the run. The clamp bounds the wind-up of the first steps, where L0 starts at hundreds
and falls by itself whatever the coefficient. Everything stays on the device: no host sync a step.
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

    gain: float = 0.1
    """Change of log(coefficient) per step for a log-error of 1 at full lr."""
    max_error: float = 1.0
    """Bound on |log(L0 / target)| used in one update (limits the early wind-up)."""
    ema: float = 0.9
    """Smoothing of the batch L0 (weight of the previous average)."""
    drift_gain: float = 0.003
    """How fast the learnt drift of log(coefficient) per step follows the error."""
    max_drift: float = 0.01
    """Bound on the learnt drift of log(coefficient) per step."""
    damping: float = 50.0
    """Steps ahead at which the error is predicted from L0's current rate of change (damping)."""


def coefficient_name(model: torch.nn.Module) -> str | None:
    """The model's sparsity coefficient buffer, or None (a k-based architecture)."""
    return next((n for n in COEFFICIENTS if isinstance(getattr(model, n, None), torch.Tensor)), None)


class TargetL0:
    """Per-run control of `model`'s coefficient toward `targets` (NaN: that run is left alone)."""

    def __init__(self, model: torch.nn.Module, targets: Sequence[float | None], cfg: ControllerConfig | None = None,
                 hold_steps: int = 0):
        name = coefficient_name(model)
        if name is None:
            raise PipelineError(f"architecture {getattr(model, 'architecture_name', type(model).__name__)!r} has no "
                                f"sparsity coefficient ({' or '.join(COEFFICIENTS)}) to steer to a target L0; "
                                "set its k instead")
        self.cfg = cfg or ControllerConfig()
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
        # The penalty's own warm-up (l1/l0_warmup_steps): L0 is high because the penalty is not yet
        # on; integrating then would only wind up.
        self.hold_steps = hold_steps
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
        if self.steps > self.hold_steps:
            log_l0 = self.ema.clamp_min(1e-3).log()
            error = log_l0 - self.log_target
            # What the error will be `damping` steps ahead at the current rate: no push while L0
            # is already on its way (the SAE follows a new coefficient with a lag).
            ahead = (error + self.cfg.damping * (log_l0 - prev)).clamp_(-self.cfg.max_error, self.cfg.max_error)
            f = factors.to(error.dtype)
            self.drift.add_(self.cfg.drift_gain * f * ahead)
            self.drift.clamp_(-self.cfg.max_drift, self.cfg.max_drift)
            step = f * (ahead * self.cfg.gain + self.drift)
            self.coefficient.mul_(torch.where(self.active, step, 0.0).exp_().to(self.coefficient.dtype))
        return {self.name: self.coefficient}

    def state_dict(self) -> dict:
        """JSON part of a checkpoint (the coefficient itself is a model buffer, saved with it)."""
        return {"ema": self.ema.tolist(), "drift": self.drift.tolist(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.ema.copy_(torch.tensor(state["ema"], dtype=self.ema.dtype))
        self.drift.copy_(torch.tensor(state["drift"], dtype=self.drift.dtype))
        self.steps = int(state["steps"])


def make_controller(model: torch.nn.Module, targets: float | Sequence[float | None] | None,
                    cfg: ControllerConfig | None = None, hold_steps: int = 0) -> TargetL0 | None:
    """A controller for the runs of `model` that have a target (one for all, or one per run), else None."""
    if targets is None:
        return None
    n = getattr(model, "n_runs", None) or model.W_dec.shape[0]
    values = list(targets) if isinstance(targets, (list, tuple)) else [targets] * n
    if all(v is None or (isinstance(v, float) and math.isnan(v)) for v in values):
        return None
    hold = max(hold_steps, getattr(model, "l1_warmup_steps", 0) or 0, getattr(model, "l0_warmup_steps", 0) or 0)
    return TargetL0(model, values, cfg, hold_steps=hold)


def final_coefficients(model: torch.nn.Module, run: int) -> dict[str, float]:
    """Run `run`'s sparsity coefficient as it ended ({} for a k-based architecture), for its records."""
    name = coefficient_name(model)
    return {} if name is None else {name: float(getattr(model, name)[run])}
