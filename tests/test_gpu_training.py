"""The trainer on a CUDA device against the same work on the CPU (skipped without a GPU).

CI has no GPU; these run where one is lent. The fused kernels (ReLU, JumpReLU, gated) must give the
CPU's outputs and gradients on CUDA (their chunked passes take other chunk sizes there), and every
registered architecture must train on CUDA to the CPU run's quality. Training is compared by its
outcome, not weight for weight: a batch-wide top-k or a JumpReLU threshold may keep a different
entry when two values differ by float rounding, and a few steps then drift apart.
"""

from __future__ import annotations

import pytest
import torch

from trainer.kernels.relu import relu_sae
from trainer.kernels.gated import gated_sae
from trainer.kernels.jumprelu import jumprelu_sae
from trainer.registry import get_architecture, registered_architectures
from trainer.train import LoopConfig, explained_variance, train_stack
from tests.builders import ARCHS, sparse_batches, stack_configs, trainer_for

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def kernel_inputs(kind: str, R: int = 2, B: int = 512, S: int = 96, d: int = 16) -> list[torch.Tensor]:
    """Float32 inputs of one fused kernel, seeded on the CPU."""
    g = torch.Generator().manual_seed(7)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    x = randn(B, d)
    if kind == "gated":  # x, W_enc, b_gate, r_mag, b_mag, b_dec, W_dec
        return [x, randn(R, d, S, scale=0.5), randn(R, S, scale=0.5), randn(R, S, scale=0.3), randn(R, S, scale=0.5),
                randn(R, d, scale=0.3), randn(R, S, d, scale=0.5)]
    base = [x, randn(R, d, S, scale=d ** -0.5), randn(R, S, scale=0.3), randn(R, d, scale=0.1), randn(R, S, d)]
    if kind == "jumprelu":  # + threshold (positive), bandwidth
        return base + [0.3 + torch.rand(R, S, generator=g), torch.full((R,), 0.5)]
    return base


def kernel_step(kind: str, inputs: list[torch.Tensor], device: str) -> list[torch.Tensor]:
    """One forward and backward of a kernel on `device`: its float outputs, then every input's gradient."""
    fn = {"relu": relu_sae, "jumprelu": jumprelu_sae, "gated": gated_sae}[kind]
    n_diff = {"relu": 5, "jumprelu": 6, "gated": 7}[kind]  # the bandwidth gets no gradient
    args = [t.detach().to(device, copy=True).requires_grad_(i < n_diff) for i, t in enumerate(inputs)]
    out = fn(*args)
    g = torch.Generator().manual_seed(8)
    # A fixed random weighting of every differentiable output (latents, reconstructions, penalties).
    loss = sum((o * torch.randn(o.shape, generator=g).to(device)).sum() for o in out if o.requires_grad)
    loss.backward()
    return [o.detach().cpu() for o in out if o.is_floating_point()] + [a.grad.cpu() for a in args[:n_diff]]


def train_quality(arch: str, device: str, steps: int = 60) -> tuple[float, float]:
    """(explained variance, L0) on held-out rows after `steps` steps of `train_stack` on `device`."""
    cls = get_architecture(arch)
    cfgs = stack_configs(arch, 32, 128) if arch in ARCHS else \
        [cls.config_class(d_in=32, d_sae=128, **({"k": 4} if arch == "topk" else {"l1_coefficient": 1.0}))]
    model = cls(cfgs[:1]).to(device)
    batches = [b.to(device) for b in sparse_batches(steps, 256)]
    train_stack(model, batches, LoopConfig(lr=3e-3, lr_warmup_steps=5, log_every=steps), log=None)
    held_out = sparse_batches(1, 1024, seed=1)[0].to(device)
    with torch.no_grad():
        latents = model.encode(held_out)
        ev = explained_variance(held_out, model.decode(latents))
    return float(ev[0]), float((latents > 0).float().sum(-1).mean())


@pytest.mark.parametrize("kind", ["relu", "jumprelu", "gated"])
def test_fused_kernels_on_cuda_match_the_cpu(kind):
    inputs = kernel_inputs(kind)
    for got, want in zip(kernel_step(kind, inputs, "cuda"), kernel_step(kind, inputs, "cpu")):
        # float32 sums over 512 rows in another order (TF32 is off for float32 matmuls by default).
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", registered_architectures())
def test_every_architecture_trains_on_cuda_as_on_the_cpu(arch):
    ev_gpu, l0_gpu = train_quality(arch, "cuda")
    ev_cpu, l0_cpu = train_quality(arch, "cpu")
    assert ev_gpu == pytest.approx(ev_cpu, abs=0.02) and ev_gpu > 0.3, (ev_gpu, ev_cpu)  # it learnt
    assert l0_gpu == pytest.approx(l0_cpu, rel=0.15, abs=0.5), (l0_gpu, l0_cpu)


@pytest.mark.parametrize("arch", registered_architectures())
def test_a_cuda_training_step_never_waits_for_the_host(arch):
    """kernels=auto, bf16 on CUDA: after warm-up, a step runs under torch's sync debug mode set to
    raise at the first host synchronization (the CPU test counts them through dispatch modes)."""

    tr, data = trainer_for(arch, "auto")
    tr.model.to("cuda")
    tr = type(tr)(tr.model, tr.cfg)  # optimizer state on the device
    data = [b.to("cuda") for b in data]
    tr.init_from_data(data[0])
    for x in data[:4]:
        tr.train_step(x)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x in data[4:]:
            tr.train_step(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
