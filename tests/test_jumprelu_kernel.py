"""trainer.kernels_jumprelu against the plain autograd step it replaces (JumpReLUFunction and
StepFunction of trainer.sae_jumprelu): outputs and every gradient, theta's straight-through one
included, float32 and float64, one run and a stack of three, x with and without a gradient; a
float64 gradcheck of the true derivatives away from the kinks; and the model's forward."""

from __future__ import annotations

import pytest
import torch

from trainer.kernels.chunks import CHUNKS, Chunks
from trainer.kernels.jumprelu import jumprelu_sae
from trainer.sae_jumprelu import JumpReLUConfig, JumpReLUFunction, JumpReLUSAE, StepFunction


def _reference(x, W_enc, b_enc, b_dec, W_dec, theta, eps):
    """The model's former forward: plain autograd through the straight-through Functions."""
    pre = torch.einsum("rbi,ris->rbs", (x - b_dec.unsqueeze(1)).expand(W_enc.shape[0], -1, -1), W_enc) \
        + b_enc.unsqueeze(1)
    th, bw = theta.unsqueeze(1), eps.view(-1, 1, 1).to(pre.dtype)
    latents = JumpReLUFunction.apply(pre, th, bw)
    recon = torch.einsum("rbs,rsi->rbi", latents, W_dec) + b_dec.unsqueeze(1)
    step = StepFunction.apply(pre, th, bw)
    return latents, recon, step.sum(dim=-1).mean(dim=-1), (pre > th).sum(dim=1).to(pre.dtype), pre.detach()


def _case(R: int, dtype: torch.dtype, seed: int, B: int = 700, S: int = 40, d: int = 9):
    """Inputs whose pre-activations spread around the thresholds: many inside the band (both sides
    of theta), many active, many far below."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d, generator=g, dtype=dtype)
    W_enc = torch.randn(R, d, S, generator=g, dtype=dtype) / d ** 0.5
    b_enc = torch.randn(R, S, generator=g, dtype=dtype) * 0.3
    b_dec = torch.randn(R, d, generator=g, dtype=dtype) * 0.1
    W_dec = torch.randn(R, S, d, generator=g, dtype=dtype)
    theta = 0.3 + torch.rand(R, S, generator=g, dtype=dtype)  # positive, as exp(...) gives
    eps = torch.tensor([0.5, 0.2, 1.0][:R], dtype=torch.float32)  # per run; float32 as the buffer
    return [x, W_enc, b_enc, b_dec, W_dec, theta], eps


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("R", [1, 3])
@pytest.mark.parametrize("need_x", [False, True])
@pytest.mark.parametrize("small_chunks", [False, True])
def test_matches_autograd_reference(dtype, R, need_x, small_chunks):
    inputs, eps = _case(R, dtype, seed=R + 10 * need_x)
    B, S, d = inputs[0].shape[0], inputs[1].shape[2], inputs[1].shape[1]
    # 7 latents a chunk: the chunked passes' loops (the last chunk short); else one chunk
    chunks = Chunks(cpu_bytes=7 * B * inputs[0].element_size()) if small_chunks else CHUNKS
    g = torch.Generator().manual_seed(99)
    g_lat, g_rec, g_l0 = (torch.randn(R, B, S, generator=g, dtype=dtype), torch.randn(R, B, d, generator=g, dtype=dtype),
                          torch.randn(R, generator=g, dtype=dtype))

    ours = [inputs[0].clone().requires_grad_(need_x)] + [p.clone().requires_grad_() for p in inputs[1:]]
    theirs = [inputs[0].clone().requires_grad_(need_x)] + [p.clone().requires_grad_() for p in inputs[1:]]
    out = jumprelu_sae(*ours, eps, chunks=chunks)
    ref = _reference(*theirs, eps)
    pre = ref[4]
    u = (pre - inputs[5].unsqueeze(1)) / eps.view(-1, 1, 1).to(dtype)
    in_band = (u.abs() < 0.5)
    # The case exercises every branch: band entries below and above theta, and outside it.
    assert (in_band & (u < 0)).sum() > 100 and (in_band & (u > 0)).sum() > 100 and (~in_band).sum() > 100

    for name, a, b in zip(("latents", "recon", "l0", "fired"), out, ref):
        torch.testing.assert_close(a, b, msg=lambda m: f"{name}: {m}")
    assert out[3].sum() == (ref[0] != 0).sum() and not out[3].requires_grad

    # b_dec's and theta's gradients sum B terms of either sign, in another order than autograd's.
    tol = {"rtol": 2e-5, "atol": 2e-4} if dtype == torch.float32 else {}
    names = ("x", "W_enc", "b_enc", "b_dec", "W_dec", "theta")
    # Every output's gradient; the loop's case (latents observed only); the L0 term alone.
    for grads in ((g_lat, g_rec, g_l0), (None, g_rec, g_l0), (g_lat, None, None), (None, None, g_l0)):
        for p in ours + theirs:
            p.grad = None
        keep = [i for i, gr in enumerate(grads) if gr is not None]
        torch.autograd.backward([out[i] for i in keep], [grads[i] for i in keep], retain_graph=True)
        torch.autograd.backward([ref[i] for i in keep], [grads[i] for i in keep], retain_graph=True)
        for name, a, b in zip(names, ours, theirs):
            if not b.requires_grad:
                continue
            if b.grad is None:  # autograd gave none: ours is None or zero
                assert a.grad is None or not a.grad.any(), name
                continue
            torch.testing.assert_close(a.grad, b.grad, **tol, msg=lambda m: f"{name} {keep}: {m}")


def test_theta_gradient_formula():
    """theta's gradient is the straight-through formula, written out per latent."""
    inputs, eps = _case(2, torch.float64, seed=5, B=64, S=6, d=4)
    theta = inputs[5].clone().requires_grad_()
    latents, recon, l0, _ = jumprelu_sae(*inputs[:5], theta, eps)
    g_lat = torch.randn_like(latents)
    g_rec = torch.randn_like(recon)
    torch.autograd.backward([latents, recon, l0], [g_lat, g_rec, torch.tensor([0.7, -1.3], dtype=torch.float64)])
    with torch.no_grad():
        pre = torch.einsum("bi,ris->rbs", inputs[0], inputs[1]) - torch.einsum("ri,ris->rs", inputs[3], inputs[1]
                                                                               ).unsqueeze(1) + inputs[2].unsqueeze(1)
        e = eps.double().view(-1, 1, 1)
        band = (((pre - inputs[5].unsqueeze(1)) / e).abs() < 0.5).double()
        g_total = g_lat + torch.einsum("rbi,rsi->rbs", g_rec, inputs[4])
        expected = (-(inputs[5].unsqueeze(1) / e) * band * g_total).sum(1) \
            + torch.tensor([0.7, -1.3], dtype=torch.float64).view(-1, 1) * (-(1 / e) * band).sum(1) / pre.shape[1]
    torch.testing.assert_close(theta.grad, expected)


def test_gradcheck_float64():
    """The true derivatives (x, W_enc, b_enc, b_dec, W_dec) by finite differences, with every
    pre-activation far from its threshold so no step is crossed."""
    g = torch.Generator().manual_seed(0)
    R, B, S, d = 2, 5, 7, 3
    x = torch.randn(B, d, generator=g, dtype=torch.float64)
    W_enc = torch.randn(R, d, S, generator=g, dtype=torch.float64) * 0.1
    b_enc = torch.where(torch.rand(R, S, generator=g) < 0.5, -10.0, 10.0).to(torch.float64)
    b_dec = torch.randn(R, d, generator=g, dtype=torch.float64)
    W_dec = torch.randn(R, S, d, generator=g, dtype=torch.float64)
    theta = torch.full((R, S), 0.5, dtype=torch.float64)
    eps = torch.tensor([0.2, 0.3])
    assert torch.autograd.gradcheck(lambda *a: jumprelu_sae(*a, theta, eps)[:2],
                                    tuple(t.requires_grad_() for t in [x, W_enc, b_enc, b_dec, W_dec]))
    x3 = torch.randn(R, B, d, generator=g, dtype=torch.float64).requires_grad_()  # x per run
    assert torch.autograd.gradcheck(lambda x, W: jumprelu_sae(x, W, b_enc, b_dec, W_dec, theta, eps)[:2],
                                    (x3, W_enc.detach().requires_grad_()))


def test_model_forward_uses_the_kernel_and_matches_reference():
    """JumpReLUSAE.forward (kernel path) against the plain path it replaced, through the model's
    threshold parametrisation: loss terms, `fired`, and the gradient of every parameter."""
    torch.manual_seed(0)
    cfgs = [JumpReLUConfig(d_in=8, d_sae=32, seed=s, l0_coefficient=c) for s, c in ((0, 0.3), (1, 0.05))]
    model = JumpReLUSAE(cfgs)
    x = torch.randn(256, 8)
    model.init_b_dec(x, "mean")
    out = model(x)
    out["loss"].sum().backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    pre = model.pre_acts(x)
    th = model.threshold.unsqueeze(1)
    bw = (model.bandwidth * model.data_scale).view(-1, 1, 1)
    latents = JumpReLUFunction.apply(pre, th, bw)
    recon = model.decode(latents)
    l0 = StepFunction.apply(pre, th, bw).sum(-1).mean(-1)
    loss = model.mse(x, recon) + model.l0_coefficient * l0
    loss.sum().backward()

    torch.testing.assert_close(out["loss"], loss)
    torch.testing.assert_close(out["l0"], l0.detach())
    torch.testing.assert_close(out["fired"], (latents > 0).sum(1).float())
    assert not out["l0"].requires_grad
    for n, p in model.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{n}: {m}")
    assert ours["threshold_param"].any()
