"""trainer.kernels against the dense autograd formulas they replace: values and gradients, float32
and float64, one run and a stack of three, and gradcheck on tiny cases."""

from __future__ import annotations

import pytest
import torch

from trainer.kernels.chunks import CHUNKS, Chunks
from trainer.kernels.relu import relu_sae
from trainer.kernels.sparse import sparse_decode, sparse_pre_acts


def _codes(R: int, B: int, S: int, k: int, dtype: torch.dtype, g: torch.Generator):
    """Distinct latent ids per row (as topk gives) and their values."""
    idx = torch.rand(R, B, S, generator=g).topk(k, dim=-1).indices
    return idx, torch.randn(R, B, k, generator=g, dtype=dtype)


def _dense(idx: torch.Tensor, vals: torch.Tensor, S: int) -> torch.Tensor:
    R, B, _ = idx.shape
    return torch.zeros(R, B, S, dtype=vals.dtype).scatter(-1, idx, vals)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("R", [1, 3])
def test_sparse_decode_matches_dense(dtype, R):
    g = torch.Generator().manual_seed(R)
    B, S, d, k = 300, 64, 12, 5  # more rows than one gather chunk
    idx, vals = _codes(R, B, S, k, dtype, g)
    W = torch.randn(R, S, d, generator=g, dtype=dtype)
    grad_out = torch.randn(R, B, d, generator=g, dtype=dtype)

    v1, W1 = vals.clone().requires_grad_(), W.clone().requires_grad_()
    out = sparse_decode(idx, v1, W1)
    out.backward(grad_out)
    v2, W2 = vals.clone().requires_grad_(), W.clone().requires_grad_()
    ref = torch.einsum("rbs,rsi->rbi", _dense(idx, v2, S), W2)
    ref.backward(grad_out)

    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(v1.grad, v2.grad)
    torch.testing.assert_close(W1.grad, W2.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("R", [1, 3])
@pytest.mark.parametrize("x_per_run", [False, True])
def test_sparse_pre_acts_gradients_match_dense(dtype, R, x_per_run):
    g = torch.Generator().manual_seed(10 + R)
    B, S, d, k = 200, 48, 10, 4
    x = torch.randn(*((R,) if x_per_run else ()), B, d, generator=g, dtype=dtype)
    params = [torch.randn(R, d, S, generator=g, dtype=dtype), torch.randn(R, S, generator=g, dtype=dtype),
              torch.randn(R, d, generator=g, dtype=dtype)]
    grad = torch.randn(R, B, k, generator=g, dtype=dtype)

    def pre(x, W_enc, b_enc, b_dec):
        return torch.einsum("rbi,ris->rbs", x - b_dec.unsqueeze(1), W_enc) + b_enc.unsqueeze(1)

    with torch.no_grad():
        top, idx = pre(x, *params).topk(k, dim=-1)
    ours = [p.clone().requires_grad_() for p in [x, *params]]
    out = sparse_pre_acts(top, idx, *ours)
    out.backward(grad)
    theirs = [p.clone().requires_grad_() for p in [x, *params]]
    ref = pre(*theirs).gather(-1, idx)
    ref.backward(grad)

    torch.testing.assert_close(out, ref)
    for name, a, b in zip(("x", "W_enc", "b_enc", "b_dec"), ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, msg=lambda m: f"{name}: {m}")

    # Without x needing a gradient, b_dec's comes from b_enc's (no per-token pass): the same value.
    params2 = [p.clone().requires_grad_() for p in params]
    sparse_pre_acts(top, idx, x, *params2).backward(grad)
    for a, b in zip(params2, theirs[1:]):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("R", [1, 3])
@pytest.mark.parametrize("small_chunks", [False, True])
@pytest.mark.parametrize("x_per_run", [False, True])
def test_relu_sae_matches_dense(dtype, R, small_chunks, x_per_run):
    g = torch.Generator().manual_seed(20 + R)
    B, S, d = 150, 40, 9
    # 7 latents a chunk: the chunked passes' loops (the last chunk short); else one chunk
    chunks = Chunks(cpu_bytes=7 * B * torch.finfo(dtype).bits // 8) if small_chunks else CHUNKS
    x = torch.randn(*((R,) if x_per_run else ()), B, d, generator=g, dtype=dtype)
    params = [torch.randn(R, d, S, generator=g, dtype=dtype), torch.randn(R, S, generator=g, dtype=dtype) - 0.5,
              torch.randn(R, d, generator=g, dtype=dtype), torch.randn(R, S, d, generator=g, dtype=dtype)]
    g_lat, g_rec, g_l1 = (torch.randn(R, B, S, generator=g, dtype=dtype), torch.randn(R, B, d, generator=g, dtype=dtype),
                          torch.randn(R, generator=g, dtype=dtype))

    def dense(x, W_enc, b_enc, b_dec, W_dec):
        latents = (torch.einsum("rbi,ris->rbs", x - b_dec.unsqueeze(1), W_enc) + b_enc.unsqueeze(1)).relu()
        recon = torch.einsum("rbs,rsi->rbi", latents, W_dec) + b_dec.unsqueeze(1)
        l1 = (latents * W_dec.norm(dim=-1).unsqueeze(1)).sum(-1).mean(-1)
        return latents, recon, l1, (latents > 0).sum(-1).to(dtype).mean(-1), (latents > 0).sum(1).to(dtype)

    # b_dec's gradient sums B * d_sae terms of either sign, in another order than autograd's.
    tol = {"rtol": 2e-5, "atol": 2e-4} if dtype == torch.float32 else {}
    for need_x in (False, True):
        ours = [x.clone().requires_grad_(need_x)] + [p.clone().requires_grad_() for p in params]
        theirs = [x.clone().requires_grad_(need_x)] + [p.clone().requires_grad_() for p in params]
        out, ref = relu_sae(*ours, chunks=chunks), dense(*theirs)
        for a, b in zip(out, ref):  # latents, recon, l1, then the exact counts l0 and fired
            torch.testing.assert_close(a, b)
        assert out[4].sum() == (ref[0] > 0).sum() and not out[3].requires_grad
        # Every output's gradient, and the loop's case: latents only observed (no gradient).
        for grads in ((g_lat, g_rec, g_l1), (None, g_rec, g_l1)):
            for p in ours + theirs:
                p.grad = None
            keep = [i for i, gr in enumerate(grads) if gr is not None]
            torch.autograd.backward([out[i] for i in keep], [grads[i] for i in keep], retain_graph=True)
            torch.autograd.backward([ref[i] for i in keep], [grads[i] for i in keep], retain_graph=True)
            for name, a, b in zip(("x", "W_enc", "b_enc", "b_dec", "W_dec"), ours, theirs):
                if b.requires_grad:
                    torch.testing.assert_close(a.grad, b.grad, **tol, msg=lambda m: f"{name}: {m}")


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    R, B, S, d, k = 2, 5, 7, 3, 2
    idx, vals = _codes(R, B, S, k, torch.float64, g)
    W = torch.randn(R, S, d, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda v, W: sparse_decode(idx, v, W),
                                    (vals.requires_grad_(), W.requires_grad_()))

    x = torch.randn(B, d, generator=g, dtype=torch.float64)
    enc = [torch.randn(R, d, S, generator=g, dtype=torch.float64), torch.randn(R, S, generator=g, dtype=torch.float64),
           torch.randn(R, d, generator=g, dtype=torch.float64)]

    def selected(x, W_enc, b_enc, b_dec):
        # The values come from a dense pass without autograd, as in a TopK step; the gradient only
        # from sparse_pre_acts, so gradcheck's finite differences test its backward.
        with torch.no_grad():
            top = (torch.einsum("rbi,ris->rbs", x - b_dec.unsqueeze(1), W_enc) + b_enc.unsqueeze(1)).gather(-1, idx)
        return sparse_pre_acts(top, idx, x, W_enc, b_enc, b_dec)

    assert torch.autograd.gradcheck(selected, tuple(t.requires_grad_() for t in [x, *enc]))

    W_dec = torch.randn(R, S, d, generator=g, dtype=torch.float64)
    # ReLU kinks: keep every pre-activation away from 0 so finite differences do not cross one.
    b_enc = torch.where(torch.rand(R, S, generator=g) < 0.5, -10.0, 10.0).to(torch.float64)
    assert torch.autograd.gradcheck(lambda *a: relu_sae(*a)[:3],
                                    tuple(t.requires_grad_() for t in [x, enc[0] * 0.1, b_enc, enc[2], W_dec]))


def test_chunks_fit_the_cache_on_cpu_and_are_large_on_a_gpu():
    row = 4096 * 4  # a latent-major row of batch 4096, float32
    assert CHUNKS.rows(row, torch.device("cpu")) == (1 << 21) // row == 128
    assert CHUNKS.rows(row, torch.device("cpu"), cpu_bytes=1 << 25) == 2048
    # On a GPU each chunk costs kernel launches, not cache misses: d_sae 32768 is 2 chunks, not 256.
    assert CHUNKS.rows(row, torch.device("cuda")) == (1 << 28) // row == 16384


def test_row_dots_take_the_same_values_in_both_forms():
    """The sparse backward's gathered-row dot products: the CPU's multiply-and-sum and the GPU's batch of
    small products (forced here on the CPU) agree."""
    from trainer.kernels.sparse import _dot_rows

    g = torch.Generator().manual_seed(0)
    picked = torch.randn(7, 5, 12, generator=g, dtype=torch.float64)
    rows = torch.randn(7, 12, 1, generator=g, dtype=torch.float64)
    expected = (picked * rows.transpose(1, 2)).sum(dim=-1, keepdim=True)
    for batched in (False, True):
        out = torch.empty(7, 5, 1, dtype=torch.float64)
        _dot_rows(picked.clone(), rows, out, batched=batched)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
