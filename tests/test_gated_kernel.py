"""trainer.kernels_gated against the plain autograd formulas of the gated SAE it replaces: every
output and every gradient, float32 and float64, one run and a stack of three, x with and without a
gradient, the L1's decoder norms live or frozen, chunked passes that straddle runs; gradcheck on a
tiny case; and GatedSAE.forward wired to it."""

from __future__ import annotations

import pytest
import torch

from trainer.kernels.chunks import Chunks
from trainer.kernels.gated import gated_sae
from trainer.sae_gated import GatedConfig, GatedSAE

NAMES = ("x", "W_enc", "b_gate", "r_mag", "b_mag", "b_dec", "W_dec")


def reference(x, W_enc, b_gate, r_mag, b_mag, b_dec, W_dec, frozen_l1_norms=False):
    """The plain formulas (GatedSAE's gate_and_magnitude and gate, the L1 and the frozen-decoder
    auxiliary reconstruction), through autograd."""
    proj = torch.einsum("rbi,ris->rbs", x - b_dec.unsqueeze(1), W_enc)
    pi_gate = proj + b_gate.unsqueeze(1)
    pi_mag = proj * r_mag.exp().unsqueeze(1) + b_mag.unsqueeze(1)
    latents = (pi_gate > 0).to(pi_mag.dtype) * pi_mag.relu()
    recon = torch.einsum("rbs,rsi->rbi", latents, W_dec) + b_dec.unsqueeze(1)
    gate_acts = pi_gate.relu()
    norms = (W_dec.detach() if frozen_l1_norms else W_dec).norm(dim=-1)
    l1 = (gate_acts * norms.unsqueeze(1)).sum(dim=-1).mean(dim=-1)
    gate_recon = torch.einsum("rbs,rsi->rbi", gate_acts, W_dec.detach()) + b_dec.detach().unsqueeze(1)
    active = latents > 0
    return latents, recon, gate_recon, l1, active.sum(-1).to(x.dtype).mean(-1), active.sum(1).to(x.dtype)


def make_inputs(R: int, B: int, S: int, d: int, dtype: torch.dtype, seed: int, x_per_run: bool = False):
    """x and the six parameters, scaled so that about half of the gates open and half of the open
    latents have a positive magnitude."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=dtype) * scale

    x = randn(*((R,) if x_per_run else ()), B, d)
    return [x, randn(R, d, S, scale=0.5), randn(R, S, scale=0.5), randn(R, S, scale=0.3), randn(R, S, scale=0.5),
            randn(R, d, scale=0.3), randn(R, S, d, scale=0.5)]


def small_chunks(B: int, itemsize: int) -> Chunks:
    """Chunks of 7 latents (forward: some straddle two runs) and 16 (backward, the last one short:
    d_sae 40), whose elementwise work goes in pieces of 7 (the forward's size: 7, 7, 2 and 7, 1)."""
    return Chunks(cpu_bytes=7 * 2 * B * itemsize, matmul_bytes=16 * 2 * B * itemsize)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("R", [1, 3])
@pytest.mark.parametrize("frozen", [False, True])
def test_gated_sae_matches_autograd(dtype, R, frozen):
    B, S, d = 150, 40, 9
    chunks = small_chunks(B, torch.empty((), dtype=dtype).element_size())
    inputs = make_inputs(R, B, S, d, dtype, seed=R + 10 * frozen)
    g = torch.Generator().manual_seed(99)
    grads_all = [torch.randn(R, B, S, generator=g, dtype=dtype), torch.randn(R, B, d, generator=g, dtype=dtype),
                 torch.randn(R, B, d, generator=g, dtype=dtype), torch.randn(R, generator=g, dtype=dtype)]
    # b_dec's and r_mag's gradients sum B * d_sae terms of either sign, in another order than autograd's.
    tol = {"rtol": 2e-5, "atol": 2e-4} if dtype == torch.float32 else {}
    for need_x in (False, True):
        ours = [inputs[0].clone().requires_grad_(need_x)] + [p.clone().requires_grad_() for p in inputs[1:]]
        theirs = [inputs[0].clone().requires_grad_(need_x)] + [p.clone().requires_grad_() for p in inputs[1:]]
        out, ref = gated_sae(*ours, frozen_l1_norms=frozen, chunks=chunks), reference(*theirs, frozen_l1_norms=frozen)
        for name, a, b in zip(("latents", "recon", "gate_recon", "l1", "l0", "fired"), out, ref):
            torch.testing.assert_close(a, b, msg=lambda m: f"{name}: {m}")
        assert 0 < out[5].sum() < R * B * S  # some latents fire, not all
        assert not out[4].requires_grad and not out[5].requires_grad
        # Every output's gradient; the loop's case (latents only observed); each extra term alone.
        cases = (grads_all, [None, *grads_all[1:]], [None, None, grads_all[2], None], [None, None, None, grads_all[3]],
                 [None, grads_all[1], None, None])
        for grads in cases:
            for p in ours + theirs:
                p.grad = None
            keep = [i for i, gr in enumerate(grads) if gr is not None]
            torch.autograd.backward([out[i] for i in keep], [grads[i] for i in keep], retain_graph=True)
            torch.autograd.backward([ref[i] for i in keep], [grads[i] for i in keep], retain_graph=True)
            for name, a, b in zip(NAMES, ours, theirs):
                if not b.requires_grad:
                    continue
                if b.grad is None:  # no path from these outputs (W_dec from gate_recon alone)
                    assert a.grad is None or not a.grad.any(), name
                else:
                    torch.testing.assert_close(a.grad, b.grad, **tol, msg=lambda m: f"{name}, {keep}: {m}")


def test_per_run_input_and_default_chunks():
    """x of shape (R, B, d_in) (its gradient per run), with the module's own chunk sizes."""
    inputs = make_inputs(2, 64, 24, 5, torch.float64, seed=7, x_per_run=True)
    ours = [p.clone().requires_grad_() for p in inputs]
    theirs = [p.clone().requires_grad_() for p in inputs]
    out, ref = gated_sae(*ours), reference(*theirs)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b)
    loss = lambda o: o[1].pow(2).sum() + o[2].pow(2).sum() + o[3].sum()  # noqa: E731
    loss(out).backward()
    loss(ref).backward()
    for name, a, b in zip(NAMES, ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, msg=lambda m: f"{name}: {m}")


def test_gradcheck_float64():
    R, B, S, d = 2, 5, 7, 3
    chunks = small_chunks(B, 8)
    x, W_enc, _, r_mag, _, b_dec, W_dec = make_inputs(R, B, S, d, torch.float64, seed=0)
    g = torch.Generator().manual_seed(1)
    # Kinks of the gate (pi_gate = 0) and of the magnitudes' ReLU (pi_mag = 0): keep every
    # pre-activation far from them so finite differences cross none; all four sign combinations occur.
    b_gate = torch.where(torch.rand(R, S, generator=g) < 0.5, -10.0, 10.0).to(torch.float64)
    b_mag = torch.where(torch.rand(R, S, generator=g) < 0.5, -10.0, 10.0).to(torch.float64)
    W_enc = W_enc * 0.1
    params = [t.clone().requires_grad_() for t in (x, W_enc, b_gate, r_mag, b_mag, b_dec, W_dec)]
    with torch.no_grad():
        lat = gated_sae(*params, chunks=chunks)[0]
    assert 0 < (lat > 0).sum() < lat.numel()
    # latents, recon and l1 (live decoder norms) in every input.
    def main_terms(*a):
        out = gated_sae(*a, chunks=chunks)
        return out[0], out[1], out[3]

    assert torch.autograd.gradcheck(main_terms, tuple(params))
    # The auxiliary reconstruction adds a frozen copy of the decoder and b_dec, the frozen-norm L1 a
    # frozen copy of W_dec: finite differences in those two inputs would see the frozen terms, so
    # they are constants here (b_dec's gradient through the gate: the reference tests above).
    def extra_terms(*a):
        out = gated_sae(*a, b_dec, W_dec, frozen_l1_norms=True, chunks=chunks)
        return out[2], out[3]

    assert torch.autograd.gradcheck(extra_terms, tuple(params[:5]))


def test_gated_forward_uses_the_kernel_and_counts_firing():
    """GatedSAE.forward: its loss terms and gradients equal the plain formulas (L1 weighted by the
    frozen decoder's norms), `fired` is each latent's count of active tokens, and the benchmark's
    bound counts 7 dense matmuls."""
    assert GatedSAE.dense_matmuls == 7
    model = GatedSAE([GatedConfig(d_in=12, d_sae=48, l1_coefficient=c, seed=s) for s, c in [(0, 0.5), (1, 2.0)]])
    with torch.no_grad():
        model.b_gate.normal_(0, 0.3)
        model.b_mag.normal_(0, 0.3)
        model.r_mag.normal_(0, 0.3)
        model.b_dec.normal_(0, 0.3)
    x = torch.randn(96, 12, generator=torch.Generator().manual_seed(3))
    out = model(x, l1_scale=0.7)
    out["loss"].sum().backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    pi_gate, pi_mag = model.gate_and_magnitude(x)
    latents = model.gate(pi_gate, pi_mag)
    recon = model.decode(latents)
    gate_acts = pi_gate.relu()
    l1 = (gate_acts * model.W_dec.detach().norm(dim=-1).unsqueeze(1)).sum(-1).mean(-1)
    gate_recon = torch.einsum("rbs,rsi->rbi", gate_acts, model.W_dec.detach()) + model.b_dec.detach().unsqueeze(1)
    mse, gate_mse = model.mse(x, recon), model.mse(x, gate_recon)
    loss = mse + 0.7 * model.l1_coefficient * l1 + gate_mse
    loss.sum().backward()

    for name, value in (("latents", latents), ("recon", recon), ("mse", mse), ("l1", l1), ("gate_recon_mse", gate_mse),
                        ("loss", loss)):
        torch.testing.assert_close(out[name], value, msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(out["l0"], (latents > 0).sum(-1).float().mean(-1))
    torch.testing.assert_close(out["fired"], (latents > 0).sum(1).float())
    for name, p in model.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, rtol=2e-5, atol=2e-5, msg=lambda m: f"{name}: {m}")
