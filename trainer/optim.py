"""Per-run Adam over stacked parameters, and the decoder-norm constraints.

Every parameter carries the run dimension first, `(R, ...)`. Adam's update is elementwise, so a
per-run learning rate broadcast over that dimension gives each run exactly the update it would get
alone; gradient clipping is the one step that mixes elements, and it is done per run (the norm of
run r's gradient over all parameters). State is plain tensors (`state_dict()`), ready for
safetensors.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from pipeline.errors import PipelineError
from trainer.kernels import adam_tail
from trainer.kernels.triton_check import use_triton

TAILS = ("auto", "triton", "torch")


def _per_run(value: float | Sequence[float] | torch.Tensor, R: int, name: str, like: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.float32).to(like.device).flatten()
    if t.numel() == 1:
        t = t.expand(R)
    if t.numel() != R:
        raise PipelineError(f"{name} has {t.numel()} values for a stack of {R} runs; give 1 or {R}")
    return t.clone()


def _runs_view(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(R,) -> (R, 1, ..., 1) to broadcast over a parameter of `like`'s shape."""
    return t.view(-1, *([1] * (like.dim() - 1))).to(like.dtype)


class StackedAdam:
    """Adam (Kingma & Ba, with bias correction, no weight decay) for a stack of R runs.

    `params`: the parameters (a mapping name -> parameter, e.g. `dict(model.named_parameters())`,
    gives readable state names), each shaped (R, ...). `lr` and `max_grad_norm` are per run: a
    number (every run) or R numbers; `max_grad_norm=None` (or inf for a run) means no clipping.
    Change `self.lr` in place for a schedule (it is an (R,) tensor).

    `unit_rows`: the name of a decoder (R, d_sae, d_in) whose rows are kept at unit norm: its gradient's
    component along each row is removed before the step (and from the clipping norm), and the rows are
    renormalized after it. `tail`: how the step runs: `torch` (torch's fused Adam and the constraint's
    passes, trainer.optim), `triton` (trainer.kernels.adam_tail: one pass per parameter), or `auto`
    (triton where trainer.kernels.triton_check allows: a GPU where the kernels pass their check, and the
    meta device, where a replay takes CUDA's path)."""

    def __init__(self, params: Mapping[str, nn.Parameter] | Iterable[nn.Parameter],
                 lr: float | Sequence[float] | torch.Tensor,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 max_grad_norm: float | Sequence[float] | torch.Tensor | None = None,
                 unit_rows: str | None = None, tail: str = "auto"):
        named = dict(params) if isinstance(params, Mapping) else {str(i): p for i, p in enumerate(params)}
        if not named:
            raise PipelineError("StackedAdam got no parameters")
        self.params = named
        first = next(iter(named.values()))
        self.n_runs = R = first.shape[0]
        for name, p in named.items():
            if p.dim() == 0 or p.shape[0] != R:
                raise PipelineError(f"parameter {name} has shape {tuple(p.shape)}; every parameter of a "
                                    f"stack must have the run dimension ({R}) first")
        if unit_rows is not None and (unit_rows not in named or named[unit_rows].dim() != 3):
            raise PipelineError(f"unit_rows {unit_rows!r} names no (R, d_sae, d_in) parameter of this stack")
        if tail not in TAILS:
            raise PipelineError(f"unknown optimizer tail {tail!r}; use one of {', '.join(TAILS)}")
        self.unit_rows = unit_rows
        if tail == "auto":
            tail = "triton" if use_triton(first.device) else "torch"
        self.tail = tail
        self.lr = _per_run(lr, R, "lr", first)
        self.max_grad_norm = None if max_grad_norm is None else _per_run(max_grad_norm, R, "max_grad_norm", first)
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.step_count = torch.zeros((), dtype=torch.long)
        self._t = 0  # step_count on the host: the bias corrections need it without a device read
        # ... and on the device, as the fused kernel reads it (float32, as torch.optim's fused Adam)
        self._steps = torch.zeros((), dtype=torch.float32, device=first.device)
        self.exp_avg = {n: torch.zeros_like(p, memory_format=torch.preserve_format) for n, p in named.items()}
        self.exp_avg_sq = {n: torch.zeros_like(p, memory_format=torch.preserve_format) for n, p in named.items()}

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None

    @torch.no_grad()
    def grad_norm(self) -> torch.Tensor:
        """Per-run gradient norm (R,) over all parameters (missing gradients count as 0): one
        reduction pass per parameter, no squared copy."""
        squares = [_run_norm(p.grad).square() for p in self.params.values() if p.grad is not None]
        return _total_norm(squares, self.lr)

    @torch.no_grad()
    def step(self, skip: torch.Tensor | None = None) -> torch.Tensor:
        """Clip each run's gradient to its max_grad_norm, then take one Adam step (with the decoder
        constraint of `unit_rows`); runs where `skip` (R,) bool is True are left exactly as they are
        (parameters and moments; their gradients may hold NaNs). Returns the per-run gradient norm (R,)
        before clipping (after the constraint's projection), for logging. No host sync either way."""
        self.step_count += 1
        self._t += 1
        if self.tail == "triton":
            return self._triton_step(skip)
        unit = self.params[self.unit_rows] if self.unit_rows is not None else None
        if unit is not None:
            remove_parallel_grad(unit)
        norm = self.grad_norm()
        scale = self._clip_scale(norm)
        self._steps.fill_(self._t)
        named = [(n, p) for n, p in self.params.items() if p.grad is not None]
        skipped = None if skip is None else skip.to(torch.float32)  # the kernel's found_inf: 1 skips the call
        for r in range(self.n_runs):
            # One fused pass per run over its slices of every parameter (`torch._fused_adam_`: reads
            # parameter, gradient and moments once, writes them once), with the run's lr and its clipping
            # as the kernel's gradient scale, both device tensors. The kernel walks memory linearly: every
            # tensor as its dense view (a latent-major W_enc's run is a transposed view; its gradient and
            # moments share its strides).
            def run(t: torch.Tensor) -> torch.Tensor:
                return _dense(t[r])
            torch._fused_adam_([run(p) for _, p in named], [run(p.grad) for _, p in named],
                               [run(self.exp_avg[n]) for n, _ in named], [run(self.exp_avg_sq[n]) for n, _ in named],
                               [], [self._steps] * len(named), lr=self.lr[r], beta1=self.beta1, beta2=self.beta2,
                               weight_decay=0.0, eps=self.eps, amsgrad=False, maximize=False,
                               grad_scale=None if scale is None else scale[r],
                               found_inf=None if skipped is None else skipped[r])
        if unit is not None:
            normalize_decoder(unit)
        return norm

    def _clip_scale(self, norm: torch.Tensor) -> torch.Tensor | None:
        """What each run's gradient is divided by (None: no clipping): as torch.nn.utils.clip_grad_norm_,
        the gradient times coef = max_norm / (norm + 1e-6) when above, so 1 / coef."""
        if self.max_grad_norm is None:
            return None
        return (1 / (self.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)).float()

    def _triton_step(self, skip: torch.Tensor | None) -> torch.Tensor:
        """`step` as trainer.kernels.adam_tail's passes: the decoder's row statistics (its share of the
        norm, without writing the projected gradient), the other gradients' norms, then one pass per
        parameter."""
        # Each gradient in its parameter's dense order (a view where autograd made it in that layout).
        grads = {n: _dense_like(p.grad, p) for n, p in self.params.items() if p.grad is not None}
        named = [(n, self.params[n]) for n in grads]
        squares, coef = [], None
        for name, p in named:
            if name == self.unit_rows:
                coef, sq = adam_tail.decoder_row_stats(_dense(p.detach()), grads[name], adam_tail.NORM_EPS)
                squares.append(sq.sum(dim=1))
            else:
                squares.append(_run_norm(p.grad).square())
        norm = _total_norm(squares, self.lr)
        scale = self._clip_scale(norm)
        scale = torch.ones_like(self.lr) if scale is None else scale
        skipped = torch.zeros_like(self.lr) if skip is None else skip.to(torch.float32)
        t = self._t
        bc1, bc2_sqrt = 1 - self.beta1 ** t, math.sqrt(1 - self.beta2 ** t)
        for name, p in named:
            adam_tail.adam_(_dense(p.detach()), grads[name], _dense(self.exp_avg[name]),
                            _dense(self.exp_avg_sq[name]), self.lr, scale, skipped,
                            coef if name == self.unit_rows else None, self.beta1, self.beta2, self.eps, bc1, bc2_sqrt)
        return norm

    def state_dict(self) -> dict[str, torch.Tensor]:
        """All state as plain tensors (safetensors-ready); names follow the parameters'."""
        sd = {"step": self.step_count.clone(), "lr": self.lr.clone(),
              "betas": torch.tensor([self.beta1, self.beta2], dtype=torch.float64),
              "eps": torch.tensor(self.eps, dtype=torch.float64)}
        if self.max_grad_norm is not None:
            sd["max_grad_norm"] = self.max_grad_norm.clone()
        for name in self.params:
            sd[f"exp_avg.{name}"] = self.exp_avg[name].detach().clone()
            sd[f"exp_avg_sq.{name}"] = self.exp_avg_sq[name].detach().clone()
        return sd

    def load_state_dict(self, sd: Mapping[str, torch.Tensor]) -> None:
        """Restore what `state_dict` returned (same parameter names and shapes)."""
        missing = [k for k in ("step", "lr", "betas", "eps") if k not in sd]
        missing += [f"{kind}.{n}" for n in self.params for kind in ("exp_avg", "exp_avg_sq")
                    if f"{kind}.{n}" not in sd]
        if missing:
            raise PipelineError(f"optimizer state lacks {', '.join(missing)}")
        self.step_count = sd["step"].clone().to(torch.long)
        self._t = int(self.step_count)  # one read at load time, none per step
        self._steps = torch.zeros((), dtype=torch.float32, device=self.lr.device)
        self.lr = sd["lr"].clone().to(self.lr.device)
        self.beta1, self.beta2 = (float(b) for b in sd["betas"])
        self.eps = float(sd["eps"])
        self.max_grad_norm = sd["max_grad_norm"].clone().to(self.lr.device) if "max_grad_norm" in sd else None
        with torch.no_grad():
            for name in self.params:
                self.exp_avg[name].copy_(sd[f"exp_avg.{name}"])
                self.exp_avg_sq[name].copy_(sd[f"exp_avg_sq.{name}"])


def _run_norm(grad: torch.Tensor) -> torch.Tensor:
    """(R,) norms of each run's slice: one reduction pass, no squared copy, at least float32."""
    return torch.linalg.vector_norm(grad, dim=tuple(range(1, grad.dim())),
                                    dtype=torch.promote_types(grad.dtype, torch.float32))


def _total_norm(squares: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Per run, the norm over every parameter from their squared norms (none: zeros)."""
    if not squares:
        return torch.zeros_like(like)
    return torch.stack(torch.broadcast_tensors(*squares)).sum(dim=0).sqrt()


def _dense(t: torch.Tensor) -> torch.Tensor:
    """`t` with its dimensions ordered by stride, largest first: contiguous when `t` is a permuted
    view of contiguous memory (an elementwise kernel then sees its elements in memory order)."""
    return t.permute(_stride_order(t))


def _stride_order(t: torch.Tensor) -> list[int]:
    # The run dimension stays first (stable sort): each run's slice is then one contiguous block.
    return sorted(range(t.dim()), key=lambda i: -t.stride(i))


def _dense_like(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`t` (shaped as `like`) in `like`'s dense order, contiguous: a view when its strides match (a
    gradient autograd made in the parameter's layout), else a copy."""
    return t.permute(_stride_order(like)).contiguous()


@torch.no_grad()
def remove_parallel_grad(W_dec: torch.Tensor, eps: float = adam_tail.NORM_EPS) -> None:
    """Project out of W_dec.grad the component parallel to each decoder row, in place.

    W_dec is (R, d_sae, d_in) (rows are the last dimension, so each run is handled on its own).
    With unit-norm rows, that component only changes a row's norm, which `normalize_decoder` undoes
    after the step anyway; removing it keeps Adam's moments free of it (Gao et al. 2024, sparsify)."""
    if W_dec.grad is None:
        return
    # g - (g . W) / |W|^2 W, the same as with unit rows: two reductions (the dot products as a
    # batched matmul: `vecdot` would multiply into a full-size temporary first) and one in-place pass.
    R, S, d = W_dec.shape
    sq = torch.linalg.vector_norm(W_dec, dim=-1).square_().clamp_min_(eps * eps)
    dots = torch.bmm(W_dec.grad.reshape(R * S, 1, d), W_dec.reshape(R * S, d, 1)).view(R, S)
    W_dec.grad.addcmul_(W_dec, (dots / sq).unsqueeze(-1), value=-1)


@torch.no_grad()
def normalize_decoder(W_dec: torch.Tensor, eps: float = adam_tail.NORM_EPS) -> None:
    """Scale every decoder row of W_dec (R, d_sae, d_in) to unit norm, in place."""
    W_dec.div_(W_dec.norm(dim=-1, keepdim=True).clamp_min(eps))
