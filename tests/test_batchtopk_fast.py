"""The sparse BatchTopK / Matryoshka training step (trainer.kernels_batch) against a plain dense one.

The dense reference is the formula itself through autograd: every pre-activation with a graph, the
batch-wide top k*B by `batch_topk_per_run` (a `topk` over the flattened batch), a dense decoder
(`decode`, or `prefix_recons` for Matryoshka) and TopK's AuxK through `pre.gather`.

Tolerance: the two sum the same terms in different orders only, so in float64 every output and
gradient agrees to rtol 1e-9 / atol 1e-12; in float32 to rtol 1e-4 / atol 1e-5. The kept entries
must be identical in both.
"""

from __future__ import annotations

import math

import pytest
import torch

from trainer.kernels_batch import BatchTopKSelector, codes_from_dense
from trainer.sae_batchtopk import BatchTopKConfig, BatchTopKSAE, batch_topk_per_run
from trainer.sae_matryoshka import MatryoshkaConfig, MatryoshkaSAE

TOL = {torch.float64: dict(rtol=1e-9, atol=1e-12), torch.float32: dict(rtol=1e-4, atol=1e-5)}


def make(arch: str, d_in: int = 16, d_sae: int = 96, ks=(2, 5, 9), **extra):
    """A stack of runs with different k, some latents marked dead so that AuxK takes part."""
    cls, cfg = (BatchTopKSAE, BatchTopKConfig) if arch == "batchtopk" else (MatryoshkaSAE, MatryoshkaConfig)
    model = cls([cfg(d_in=d_in, d_sae=d_sae, k=k, seed=s, dead_tokens_threshold=100, aux_k=6, **extra)
                 for s, k in enumerate(ks)])
    with torch.no_grad():
        model.tokens_since_fired[:, ::3] = 1000  # a third of the latents are dead
        model.b_enc.normal_(0.0, 0.3)
    return model


def dense_reference(model, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The training forward as plain autograd over dense (R, B, d_sae) latents."""
    pre = model.pre_acts(x)
    latents = batch_topk_per_run(pre, model.k, model.k_max)
    target = x if x.dim() == 3 else x.unsqueeze(0)
    if isinstance(model, MatryoshkaSAE):
        recons = model.prefix_recons(latents)
        mses = torch.stack([model.mse(target, r) for r in recons])
        main = mses.sum(dim=0) if model.prefix_loss == "sum" else mses.mean(dim=0)
        recon = recons[-1]
    else:
        recon = model.decode(latents)
        main = model.mse(target, recon)
    aux = model.aux_k_coef * model.auxk_loss(pre, target - recon)
    l0 = (latents > 0).sum(dim=-1).to(recon.dtype).mean(dim=-1)
    return {"loss": main + aux, "mse": model.mse(target, recon), "aux_loss": aux, "l0": l0,
            "latents": latents.detach(), "recon": recon}


def grads_of(model, out: dict[str, torch.Tensor], x: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    x.grad = None
    out["loss"].sum().backward()
    g = {name: p.grad.clone() for name, p in model.named_parameters()}
    if x.requires_grad:
        g["x"] = x.grad.clone()
    return g


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("x_dims", [2, 3])
@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
def test_sparse_step_equals_dense_reference(arch, x_dims, dtype):
    """Forward outputs and every gradient (parameters, and the input when it asks for one) of the
    sparse step equal the dense reference's, over several steps (so the selector's threshold guess
    from the previous step is exercised as well as its first guess from a sample)."""
    extra = {"prefix_widths": (1, 7, 40, 96)} if arch == "matryoshka" else {}
    model = make(arch, **extra).to(dtype)
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        x = torch.randn(48, 16, generator=g, dtype=dtype) * (1 + step)  # the scale moves: guesses fail
        if x_dims == 3:
            x = x.expand(3, -1, -1) + 0.1 * torch.randn(3, 48, 16, generator=g, dtype=dtype)
        x.requires_grad_(x_dims == 3)
        ref = dense_reference(model, x)
        ref_grads = grads_of(model, ref, x)
        out = model(x)
        assert torch.equal(out["latents"] > 0, ref["latents"] > 0), "the kept entries differ"
        for key in ("loss", "mse", "aux_loss", "l0", "latents", "recon"):
            torch.testing.assert_close(out[key].detach(), ref[key].detach(), **TOL[dtype], msg=key)
        assert bool((out["aux_loss"] > 0).all()), "AuxK did not take part"
        for name, grad in grads_of(model, out, x).items():
            torch.testing.assert_close(grad, ref_grads[name], **TOL[dtype], msg=f"step {step}: grad {name}")


def test_matryoshka_prefix_mse_equals_dense():
    model = make("matryoshka", prefix_loss="mean").double()
    x = torch.randn(40, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    out = model(x)
    recons = model.prefix_recons(out["latents"])
    by_hand = torch.stack([model.mse(x, r) for r in recons]).mean(dim=0)
    torch.testing.assert_close(out["prefix_mse"], by_hand, **TOL[torch.float64])


def test_after_step_from_sparse_outputs_equals_dense():
    """`after_step` on the forward's firing counts and batch threshold leaves the dead-latent
    counts and the tracked threshold exactly as the dense path (from `latents`) does, and the
    firing counts are those of the dense latents."""
    a, b = make("batchtopk"), make("batchtopk")
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        out = a(x)
        assert torch.equal(out["fired"], (out["latents"] > 0).sum(dim=1).to(out["fired"].dtype))
        a.after_step(out, 64)
        dense = {k: v for k, v in out.items() if k not in ("fired", "batch_threshold")}
        b.after_step(dense, 64)
        assert torch.equal(a.tokens_since_fired, b.tokens_since_fired)
        assert torch.equal(a.threshold, b.threshold) and torch.equal(a.threshold_batches, b.threshold_batches)


def test_a_swapped_in_select_hook_is_used():
    """A `select` hook (data-parallel training swaps one in) decides the kept entries; its dense
    latents are returned, and no per-process firing counts (they would cover one rank only)."""
    model = make("batchtopk").double()
    x = torch.randn(32, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def per_row_top(pre, k, k_max):  # not BatchTopK's choice: every row keeps exactly k_max
        vals, idx = pre.topk(k_max, dim=-1)
        return torch.zeros_like(pre).scatter(-1, idx, vals.relu())

    model.select = per_row_top
    out = model(x)
    assert "fired" not in out and "batch_threshold" not in out
    ref = per_row_top(model.pre_acts(x), model.k, model.k_max)
    assert torch.equal(out["latents"], ref.detach())
    torch.testing.assert_close(out["recon"], model.decode(ref), **TOL[torch.float64])
    model.after_step(out, 32)  # the dense path of after_step
    assert model.threshold_batches.tolist() == [1, 1, 1]


# -- the selector on its own --------------------------------------------------------------------

def kept_reference(pre: torch.Tensor, n: list[int]) -> list[set[int]]:
    """Per run, the flat indices of the positive entries among its top n[r] (plain topk)."""
    out = []
    for r in range(pre.shape[0]):
        flat = pre[r].reshape(-1)
        vals, idx = flat.topk(n[r])
        out.append(set((idx[vals > 0] + r * flat.numel()).tolist()))
    return out


def test_selector_is_exact_whatever_its_guess():
    """Exactly the top n per run, for a first guess (sample), a good guess (last step's), a guess
    far too high (the distribution moved: retried lower) and far too low (more candidates)."""
    g = torch.Generator().manual_seed(0)
    sel = BatchTopKSelector()
    n = [64 * 3, 64 * 20, 64 * 200]  # k = 3, 20, 200 of 256 latents over 64 rows
    for scale, shift in [(1.0, 0.0), (1.0, 0.0), (0.1, -0.5), (3.0, 2.0), (1.0, 0.0)]:
        pre = torch.randn(3, 64, 256, generator=g) * scale + shift
        pre[1, :8] += 4.0  # a few rows fire far more than the rest (a batch-wide top-k's point)
        flat, vals = sel(pre, n)
        assert torch.equal(flat, flat.sort().values)
        assert torch.equal(vals, pre.reshape(-1)[flat])
        got = set(flat.tolist())
        assert got == set().union(*kept_reference(pre, n))


def test_selector_edge_cases():
    """Ties at the n-th value keep exactly n; fewer than n positives keeps every positive one;
    k = d_sae keeps everything positive; a run of NaNs (diverged) keeps nothing and ends."""
    sel = BatchTopKSelector()
    pre = torch.randint(-3, 4, (2, 16, 8)).float()  # many ties
    flat, vals = sel(pre, [20, 16 * 8])
    counts = [int((flat < 128).sum()), int((flat >= 128).sum())]
    assert counts[0] == min(20, int((pre[0] > 0).sum())) and counts[1] == int((pre[1] > 0).sum())
    nth = pre[0].reshape(-1).topk(20).values[-1]
    assert bool((vals[:counts[0]] >= nth).all())
    assert int((pre[0] > nth).sum()) <= counts[0]
    neg = torch.full((1, 4, 8), -1.0)
    assert sel(neg, [8])[0].numel() == 0
    nan = torch.full((2, 4, 8), math.nan)
    nan[1] = torch.randn(4, 8)
    flat, _ = sel(nan, [8, 8])
    assert bool((flat >= 32).all()) and flat.numel() == min(8, int((nan[1] > 0).sum()))


def test_codes_from_dense_round_trip():
    latents = torch.randn(2, 8, 16).relu_()
    codes = codes_from_dense(latents)
    assert torch.equal(codes.dense_into(torch.empty_like(latents)), latents)
    assert torch.equal(codes.fired(latents.dtype), (latents > 0).sum(dim=1).to(latents.dtype))
