"""Whether the Triton kernels run on a device: a check against the plain path before the first step.

The kernels (adam_tail, gather_dot, elementwise_gpu) are tested in Triton's interpreter on a CPU;
a GPU compiles them for its own architecture and Triton version. So before a CUDA device takes them,
each runs once on small inputs there and is compared with the PyTorch path it replaces. If one fails
to compile, raises or disagrees, the step keeps the PyTorch path on that device and says so in one
line (training is never lost to a kernel). `SAE_TRITON=0` turns them off; on the meta device (a
replay of CUDA's step, trainer/step_trace.py) they are always taken.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

from trainer.kernels.adam_tail import available


def use_triton(device: torch.device) -> bool:
    """Whether the step takes the Triton kernels on `device`."""
    if device.type == "meta":
        return True
    if device.type != "cuda" or not available() or os.environ.get("SAE_TRITON", "1") == "0":
        return False
    return _works(torch.device(device.type, torch.cuda.current_device() if device.index is None else device.index))


@functools.cache
def _works(device: torch.device) -> bool:
    try:
        _check(device)
    except Exception as e:  # noqa: BLE001 - any failure means the PyTorch path, said once
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        warnings.warn(f"Triton kernels disabled on {device} ({type(e).__name__}: {first}); training takes the "
                      "PyTorch path (slower, same results). SAE_TRITON=0 skips this check.", stacklevel=2)
        return False
    return True


def _close(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    if not torch.allclose(got.float(), want.float(), rtol=1e-4, atol=1e-5):
        raise RuntimeError(f"{name} differs from the PyTorch path by {(got.float() - want.float()).abs().max():.3g}")


def _check(device: torch.device) -> None:
    """Each kernel once on small float32 inputs against its reference (raises on a difference)."""
    from torch import nn

    from trainer.kernels import elementwise_gpu, gather_dot
    from trainer.optim import StackedAdam
    from trainer.sae_gated import GatedSAE
    from trainer.sae_jumprelu import JumpReLUFunction, StepFunction

    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device)

    # The optimizer's tail, with a unit-row decoder, clipping and a skipped run.
    W, b = randn(2, 8, 40), randn(2, 40)
    params = {tail: {"W_dec": nn.Parameter(W / W.norm(dim=-1, keepdim=True)), "b": nn.Parameter(b.clone())}
              for tail in ("torch", "triton")}
    opts = {t: StackedAdam(p, lr=1e-2, max_grad_norm=0.5, unit_rows="W_dec", tail=t) for t, p in params.items()}
    grads = {n: randn(*p.shape) for n, p in params["torch"].items()}
    for tail, opt in opts.items():
        for n, p in params[tail].items():
            p.grad = grads[n].clone()
        opt.step(skip=torch.tensor([False, True], device=device))
    for n in grads:
        _close(f"adam_tail ({n})", params["triton"][n].detach(), params["torch"][n].detach())
    # The gather-dot.
    table, rows = randn(16, 40), randn(6, 40)
    codes = torch.randint(0, 16, (6, 3), generator=g).to(device)
    _close("gather_dot", gather_dot.gather_dot(table, codes.reshape(-1), rows, None, 3, 1).view(6, 3),
           (table[codes] * rows.unsqueeze(1)).sum(-1))
    # The dense steps' elementwise passes, forward and backward.
    pre, g_lat = randn(2, 9, 150), randn(2, 9, 150)
    threshold, eps = randn(2, 150).abs() * 0.5, torch.tensor([0.3, 0.8], device=device)
    outs = []
    for fused in (True, False):
        p, t = pre.clone().requires_grad_(), threshold.clone().requires_grad_()
        if fused:
            lat, l0, _ = elementwise_gpu.JumpReLUStep.apply(p, t, eps)
        else:
            lat = JumpReLUFunction.apply(p, t.unsqueeze(1), eps.view(-1, 1, 1))
            l0 = StepFunction.apply(p, t.unsqueeze(1), eps.view(-1, 1, 1)).sum(-1).mean(-1)
        ((lat * g_lat).sum() + l0.sum()).backward()
        outs.append((lat.detach(), p.grad, t.grad))
    for got, want in zip(*outs):
        _close("jumprelu", got, want)
    p, q = pre.clone().requires_grad_(), pre.clone().requires_grad_()
    lat, sums, _ = elementwise_gpu.ReLUStep.apply(p)
    ((lat * g_lat).sum() + sums.sum()).backward()
    ref = q.relu()
    ((ref * g_lat).sum() + ref.sum(dim=1).sum()).backward()
    _close("relu", lat.detach(), ref.detach())
    _close("relu (gradient)", p.grad, q.grad)
    # The gated SAE's gate and magnitudes from one product, with its L1 sums and three bias-like vectors.
    vecs, g_gate = [randn(2, 150) * 0.5 for _ in range(3)], randn(2, 9, 150)
    outs = []
    for fused in (True, False):
        leaves = [t.clone().requires_grad_() for t in (pre, *vecs)]
        p, b_gate, r_mag, b_mag = leaves
        if fused:
            lat, gate, sums, _ = elementwise_gpu.GatedStep.apply(p, b_gate, r_mag.exp(), b_mag)
        else:
            pi_gate = p + b_gate.unsqueeze(1)
            lat = GatedSAE.gate(pi_gate, p * r_mag.exp().unsqueeze(1) + b_mag.unsqueeze(1))
            gate = pi_gate.relu()
            sums = gate.sum(dim=1)
        ((lat * g_lat).sum() + (gate * g_gate).sum() + sums.sum()).backward()
        outs.append((lat.detach(), gate.detach(), sums.detach(), *(t.grad for t in leaves)))
    for got, want in zip(*outs):
        _close("gated", got, want)
