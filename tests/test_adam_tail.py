"""The Triton optimizer tail (trainer/kernels/adam_tail.py) equals the plain one (torch's fused Adam,
`remove_parallel_grad`, `normalize_decoder`) in float64, run in Triton's interpreter on the CPU. The
clipping norm is float32 in both (as logged), so the two differ by its rounding: rtol 1e-6, where a
wrong term of Adam or of the constraint is off by 1e-3 or more."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trainer.kernels import adam_tail
from trainer.optim import StackedAdam

pytestmark = pytest.mark.skipif(not adam_tail.available(), reason="triton is not installed (pip install triton)")


def stack_params(seed: int, R: int = 3, S: int = 12, d: int = 10) -> dict[str, nn.Parameter]:
    """A stack's parameters in the layouts a real one has: a unit-row decoder, a latent-major encoder
    seen transposed (R, d, S), biases."""
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(R, S, d, generator=g, dtype=torch.float64)
    W_dec /= W_dec.norm(dim=-1, keepdim=True)
    W_enc = torch.randn(R, S, d, generator=g, dtype=torch.float64).transpose(1, 2)
    return {"W_enc": nn.Parameter(W_enc), "b_enc": nn.Parameter(torch.randn(R, S, generator=g, dtype=torch.float64)),
            "W_dec": nn.Parameter(W_dec), "b_dec": nn.Parameter(torch.randn(R, d, generator=g, dtype=torch.float64))}


def set_grads(params: dict[str, nn.Parameter], step: int, nan_run: int | None = None) -> None:
    g = torch.Generator().manual_seed(1000 + step)
    for p in params.values():
        grad = torch.randn(p.shape, generator=g, dtype=p.dtype) * (3.0 if step % 2 else 0.05)
        if p.stride() != p.contiguous().stride():  # autograd makes W_enc's gradient in its own layout
            grad = grad.transpose(1, 2).contiguous().transpose(1, 2)
        if nan_run is not None:
            grad[nan_run] = float("nan")
        p.grad = grad


@pytest.mark.parametrize("clip", [None, [0.5, 1.0, 100.0]])
def test_triton_tail_equals_plain_tail_over_steps(clip):
    plain, fused = stack_params(0), stack_params(0)
    lr = [1e-2, 3e-3, 0.0]
    opts = [StackedAdam(p, lr=lr, max_grad_norm=clip, unit_rows="W_dec", tail=tail)
            for p, tail in ((plain, "torch"), (fused, "triton"))]
    assert opts[1].tail == "triton"
    for step in range(6):
        skip = torch.tensor([False, step == 3, False])
        norms = []
        for params, opt in zip((plain, fused), opts):
            set_grads(params, step, nan_run=1 if step == 3 else None)
            norms.append(opt.step(skip=skip))
        finite = torch.tensor([True, step != 3, True])
        torch.testing.assert_close(norms[1][finite], norms[0][finite], rtol=1e-6, atol=1e-9)
        for name in plain:
            torch.testing.assert_close(fused[name].detach(), plain[name].detach(), rtol=1e-6, atol=1e-9)
            torch.testing.assert_close(opts[1].exp_avg[name], opts[0].exp_avg[name], rtol=1e-6, atol=1e-9)
            torch.testing.assert_close(opts[1].exp_avg_sq[name], opts[0].exp_avg_sq[name], rtol=1e-6, atol=1e-9)
    # The constraint held: unit rows; the skipped run 1 kept its step-3 NaN gradient out of its weights.
    torch.testing.assert_close(fused["W_dec"].detach().norm(dim=-1), torch.ones(3, 12, dtype=torch.float64))
    assert all(torch.isfinite(p).all() for p in fused.values())


def test_triton_tail_leaves_a_skipped_run_untouched():
    params = stack_params(1)
    before = {n: p.detach().clone() for n, p in params.items()}
    opt = StackedAdam(params, lr=1e-2, max_grad_norm=1.0, unit_rows="W_dec", tail="triton")
    set_grads(params, 0, nan_run=2)
    opt.step(skip=torch.tensor([False, False, True]))
    for name, p in params.items():
        assert torch.equal(p.detach()[2], before[name][2]), name
        assert not torch.equal(p.detach()[0], before[name][0]), name
        assert torch.equal(opt.exp_avg[name][2], torch.zeros_like(opt.exp_avg[name][2]))


def test_tail_auto_is_torch_on_a_cpu_and_triton_on_meta():
    assert StackedAdam(stack_params(0), lr=1e-3).tail == "torch"
    with torch.device("meta"):
        meta = {"w": nn.Parameter(torch.empty(2, 4, 3))}
    assert StackedAdam(meta, lr=1e-3, unit_rows="w").tail == "triton"


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_gather_dot_equals_the_plain_gathers(dtype):
    from trainer.kernels import gather_dot
    from trainer.kernels.chunks import CHUNKS
    from trainer.kernels.sparse import _entry_dot, _rowwise_dot

    g = torch.Generator().manual_seed(0)
    R, S, B, k, d = 2, 40, 9, 5, 200  # d over one block of the kernel's loop
    table = torch.randn(R * S, d, generator=g, dtype=torch.float64).to(dtype)
    rows = torch.randn(R * B, d, generator=g, dtype=torch.float64).to(dtype)
    codes = torch.stack([torch.randperm(S, generator=g)[:k] + (n // B) * S for n in range(R * B)])
    plain = _rowwise_dot(codes, table, rows, CHUNKS).double()
    fused = gather_dot.gather_dot(table, codes.reshape(-1), rows, None, k, R).view(R * B, k).double()
    exact = torch.einsum("nkd,nd->nk", table.double()[codes], rows.double())
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(fused, exact, **tol)
    # The plain bf16 path multiplies and sums in bf16; the kernel accumulates in float32: no worse.
    assert (fused - exact).abs().max() <= (plain - exact).abs().max()
    if dtype == torch.float64:
        torch.testing.assert_close(plain, exact, **tol)
    # Variable bags (BatchTopK's entries): each entry names its token.
    bags = torch.randint(0, R * B, (23,), generator=g).sort().values
    ids = torch.randint(0, R * S, (23,), generator=g)
    fused_e = gather_dot.gather_dot(table, ids, rows, bags, 0, R).double()
    torch.testing.assert_close(fused_e, (table.double()[ids] * rows.double()[bags]).sum(-1), **tol)
    if dtype == torch.float64:
        torch.testing.assert_close(_entry_dot(table, ids, rows, bags, CHUNKS).double(), fused_e, **tol)


def test_elementwise_gpu_step_equals_the_plain_functions():
    from trainer.kernels.elementwise_gpu import JumpReLUStep
    from trainer.sae_jumprelu import JumpReLUFunction, StepFunction

    g = torch.Generator().manual_seed(0)
    R, B, S = 2, 37, 150  # neither a multiple of the kernel's tiles
    pre = torch.randn(R, B, S, generator=g, dtype=torch.float64)
    threshold = (torch.rand(R, S, generator=g, dtype=torch.float64) * 0.5 + 0.1)
    eps = torch.tensor([0.3, 0.8], dtype=torch.float64)
    g_lat = torch.randn(R, B, S, generator=g, dtype=torch.float64)
    g_l0 = torch.tensor([0.7, -1.3], dtype=torch.float64)

    def run(fused: bool):
        p, t = pre.clone().requires_grad_(), threshold.clone().requires_grad_()
        if fused:
            lat, l0, fired = JumpReLUStep.apply(p, t, eps)
        else:
            lat = JumpReLUFunction.apply(p, t.unsqueeze(1), eps.view(-1, 1, 1))
            l0 = StepFunction.apply(p, t.unsqueeze(1), eps.view(-1, 1, 1)).sum(dim=-1).mean(dim=-1)
            fired = (lat.detach() > 0).sum(dim=1, dtype=torch.float64)
        ((lat * g_lat).sum() + (l0 * g_l0).sum()).backward()
        return lat.detach(), l0.detach(), fired, p.grad, t.grad

    for got, want in zip(run(True), run(False)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert run(False)[4].abs().sum() > 0  # the kernel's window catches some pre-activations


def test_relu_gpu_step_equals_the_plain_standard_step():
    from trainer.kernels.elementwise_gpu import ReLUStep

    g = torch.Generator().manual_seed(1)
    R, B, S = 2, 37, 150
    pre = torch.randn(R, B, S, generator=g, dtype=torch.float64)
    norms = torch.rand(R, S, generator=g, dtype=torch.float64) + 0.5
    g_lat = torch.randn(R, B, S, generator=g, dtype=torch.float64)

    def run(fused: bool):
        p = pre.clone().requires_grad_()
        if fused:
            lat, sums, fired = ReLUStep.apply(p)
        else:
            lat = p.relu()
            sums, fired = lat.sum(dim=1), (lat > 0).sum(dim=1, dtype=torch.float64)
        l1 = (sums * norms).sum(dim=-1) / B
        ((lat * g_lat).sum() + (l1 * torch.tensor([0.4, 2.0], dtype=torch.float64)).sum()).backward()
        return lat.detach(), sums.detach(), fired, p.grad

    for got, want in zip(run(True), run(False)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_gated_gpu_step_equals_the_plain_gated_step():
    from trainer.kernels.elementwise_gpu import GatedStep
    from trainer.sae_gated import GatedSAE

    g = torch.Generator().manual_seed(2)
    R, B, S = 2, 37, 150
    z = torch.randn(R, B, S, generator=g, dtype=torch.float64)
    b_gate, r_mag, b_mag = (torch.randn(R, S, generator=g, dtype=torch.float64) * 0.5 for _ in range(3))
    norms = torch.rand(R, S, generator=g, dtype=torch.float64) + 0.5
    g_lat, g_gate = (torch.randn(R, B, S, generator=g, dtype=torch.float64) for _ in range(2))

    def run(fused: bool):
        leaves = [t.clone().requires_grad_() for t in (z, b_gate, r_mag, b_mag)]
        p, bg, rm, bm = leaves
        if fused:
            lat, gate, sums, fired = GatedStep.apply(p, bg, rm.exp(), bm)
        else:  # GatedSAE.gate_and_magnitude from the product p, then gate and forward's terms
            pi_gate, pi_mag = p + bg.unsqueeze(1), p * rm.exp().unsqueeze(1) + bm.unsqueeze(1)
            lat, gate = GatedSAE.gate(pi_gate, pi_mag), pi_gate.relu()
            sums, fired = gate.sum(dim=1), (lat.detach() > 0).sum(dim=1, dtype=torch.float64)
        l1 = (sums * norms).sum(dim=-1) / B
        ((lat * g_lat).sum() + (gate * g_gate).sum() + (l1 * torch.tensor([0.4, 2.0], dtype=torch.float64)).sum()
         ).backward()
        return (lat.detach(), gate.detach(), sums.detach(), fired, *(t.grad for t in leaves))

    fused, plain = run(True), run(False)
    for got, want in zip(fused, plain):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # Every case occurs: shut gates, open gates with a negative magnitude, firing latents.
    assert 0 < fused[3].sum() < (plain[1] > 0).sum() < R * B * S


def test_gated_sae_triton_branch_equals_the_plain_branch(monkeypatch):
    import trainer.sae_gated as sae_gated
    from trainer.sae_gated import GatedConfig, GatedSAE

    torch.manual_seed(3)
    model = GatedSAE([GatedConfig(d_in=9, d_sae=150, l1_coefficient=c, seed=i) for i, c in enumerate((0.5, 3.0))])
    model = model.double()
    with torch.no_grad():
        for name in ("b_gate", "r_mag", "b_mag", "b_dec"):
            getattr(model, name).normal_(0, 0.3)
    x = torch.randn(37, 9, dtype=torch.float64)
    model.kernels = "plain"
    outs = []
    for triton_on in (True, False):
        monkeypatch.setattr(sae_gated, "use_triton", lambda device, on=triton_on: on)
        model.zero_grad()
        out = model(x)
        out["loss"].sum().backward()
        outs.append(({k: v.detach() for k, v in out.items()}, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (out_t, grads_t), (out_p, grads_p) = outs
    for k in out_p:
        torch.testing.assert_close(out_t[k], out_p[k], rtol=1e-12, atol=1e-12, msg=k)
    for n in grads_p:
        torch.testing.assert_close(grads_t[n], grads_p[n], rtol=1e-12, atol=1e-12, msg=n)


def test_row_norms_gradient_equals_autograds():
    from trainer.kernels.elementwise_gpu import RowNorms

    W = torch.randn(2, 7, 5, dtype=torch.float64)
    W[1, 3] = 0  # a zero row gets no gradient either way
    g = torch.randn(2, 7, dtype=torch.float64)
    a, b = W.clone().requires_grad_(), W.clone().requires_grad_()
    (RowNorms.apply(a) * g).sum().backward()
    (b.norm(dim=-1) * g).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=0)


def test_triton_check_refuses_a_cpu_and_a_failing_kernel_falls_back_with_one_warning(monkeypatch):
    from trainer.kernels import triton_check

    assert not triton_check.use_triton(torch.device("cpu"))
    assert triton_check.use_triton(torch.device("meta"))
    # The check itself runs on a CPU in the interpreter: the kernels pass it there.
    triton_check._check(torch.device("cpu"))

    def broken(device):
        raise RuntimeError("PTX compile failed\nmore detail")

    triton_check._works.cache_clear()
    monkeypatch.setattr(triton_check, "_check", broken)
    with pytest.warns(UserWarning, match=r"Triton kernels disabled on cpu \(RuntimeError: PTX compile failed\)"):
        assert triton_check._works(torch.device("cpu")) is False
    triton_check._works.cache_clear()
