"""The sparse BatchTopK / Matryoshka training step (trainer.kernels_batch) against a plain dense one.

The dense reference is the formula itself through autograd: every pre-activation with a graph, the
batch-wide top k*B by `batch_topk_per_run` (a `topk` over the flattened batch), a dense decoder
(`decode`, or `prefix_recons` for Matryoshka) and TopK's AuxK through `pre.gather`.

The fused step's selection is checked with both strategies (`BatchTopKSAE.selection`).

Tolerance: the two sum the same terms in different orders only, so in float64 every output and
gradient agrees to rtol 1e-9 / atol 1e-12; in float32 to rtol 1e-4 / atol 1e-5. The kept entries
must be identical in both.
"""

from __future__ import annotations

import math

import pytest
import torch

from trainer.kernels.sparse import BatchTopKSelector, codes_from_dense, codes_from_topk
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
    loss, aux = model.add_auxk(main, pre, target - recon)
    l0 = (latents > 0).sum(dim=-1).to(recon.dtype).mean(dim=-1)
    return {"loss": loss, "mse": model.mse(target, recon), "aux_loss": aux, "l0": l0,
            "latents": latents.detach(), "recon": recon}


def kept_latents(model, x: torch.Tensor) -> torch.Tensor:
    """The dense latents of the fused step's selection (its sparse codes, made dense)."""
    with torch.no_grad():
        pre = model.pre_acts(x)
        codes, _ = model.select_codes(pre)
        return codes.dense_into(torch.zeros_like(pre))


def grads_of(model, out: dict[str, torch.Tensor], x: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    x.grad = None
    out["loss"].sum().backward()
    g = {name: p.grad.clone() for name, p in model.named_parameters()}
    if x.requires_grad:
        g["x"] = x.grad.clone()
    return g


@pytest.mark.parametrize("selection", ["threshold", "topk"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("x_dims", [2, 3])
@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
def test_sparse_step_equals_dense_reference(arch, x_dims, dtype, selection):
    """Forward outputs and every gradient (parameters, and the input when it asks for one) of the
    sparse step equal the dense reference's, over several steps (so the selector's threshold guess
    from the previous step is exercised as well as its first guess from a sample), with either
    selection (the CPU's threshold selector, the GPU's fixed-size topk)."""
    extra = {"prefix_widths": (1, 7, 40, 96)} if arch == "matryoshka" else {}
    model = make(arch, **extra).to(dtype)
    model.kernels, model.selection = "fused", selection
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        x = torch.randn(48, 16, generator=g, dtype=dtype) * (1 + step)  # the scale moves: guesses fail
        if x_dims == 3:
            x = x.expand(3, -1, -1) + 0.1 * torch.randn(3, 48, 16, generator=g, dtype=dtype)
        x.requires_grad_(x_dims == 3)
        ref = dense_reference(model, x)
        ref_grads = grads_of(model, ref, x)
        out = model(x)
        kept = kept_latents(model, x)
        assert torch.equal(kept > 0, ref["latents"] > 0), "the kept entries differ"
        torch.testing.assert_close(kept, ref["latents"], **TOL[dtype])
        assert torch.equal(out["fired"], (kept > 0).sum(dim=1).to(out["fired"].dtype))
        for key in ("loss", "mse", "aux_loss", "l0", "recon"):
            torch.testing.assert_close(out[key].detach(), ref[key].detach(), **TOL[dtype], msg=key)
        assert bool((out["aux_loss"] > 0).all()), "AuxK did not take part"
        for name, grad in grads_of(model, out, x).items():
            torch.testing.assert_close(grad, ref_grads[name], **TOL[dtype], msg=f"step {step}: grad {name}")


def test_matryoshka_prefix_mse_equals_dense():
    model = make("matryoshka", prefix_loss="mean").double()
    x = torch.randn(40, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    out = model(x)
    recons = model.prefix_recons(kept_latents(model, x))
    by_hand = torch.stack([model.mse(x, r) for r in recons]).mean(dim=0)
    torch.testing.assert_close(out["prefix_mse"], by_hand, **TOL[torch.float64])


@pytest.mark.parametrize("selection", ["threshold", "topk"])
def test_after_step_from_sparse_outputs_equals_dense(selection):
    """`after_step` on the fused step's firing counts and batch threshold leaves the dead-latent
    counts and the tracked threshold exactly as the plain (dense) step's outputs do."""
    a, b = make("batchtopk"), make("batchtopk")
    b.load_state_dict(a.state_dict())
    a.kernels, a.selection, b.kernels = "fused", selection, "plain"
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        out_a, out_b = a(x), b(x)
        assert torch.equal(out_a["fired"], out_b["fired"])
        a.after_step(out_a, 64)
        b.after_step(out_b, 64)
        assert torch.equal(a.tokens_since_fired, b.tokens_since_fired)
        assert torch.equal(a.threshold, b.threshold) and torch.equal(a.threshold_batches, b.threshold_batches)


@pytest.mark.parametrize("kernels", ["fused", "plain"])
def test_a_swapped_in_select_hook_is_used(kernels):
    """A `select` hook (data-parallel training swaps one in) decides the kept entries, in either path:
    the reconstruction and the firing counts are those of its latents."""
    model = make("batchtopk").double()
    model.kernels = kernels
    x = torch.randn(32, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def per_row_top(pre, k, k_max):  # not BatchTopK's choice: every row keeps exactly k_max
        vals, idx = pre.topk(k_max, dim=-1)
        return torch.zeros_like(pre).scatter(-1, idx, vals.relu())

    model.select = per_row_top
    out = model(x)
    ref = per_row_top(model.pre_acts(x), model.k, model.k_max)
    assert torch.equal(out["fired"], (ref > 0).sum(dim=1).double())
    torch.testing.assert_close(out["recon"], model.decode(ref), **TOL[torch.float64])
    model.after_step(out, 32)
    assert model.threshold_batches.tolist() == [1, 1, 1]


def test_topk_codes_keep_what_the_selector_keeps():
    """The fixed-size selection (`codes_from_topk`, a GPU step's) keeps the exact selector's entries,
    with the same values and firing counts; its extra entries are inactive and hold 0."""
    g = torch.Generator().manual_seed(5)
    pre = torch.randn(3, 64, 256, generator=g)
    pre[2] -= 2.5  # fewer positive values than k * B in this run: inactive entries among the n_max
    n = [64 * 3, 64 * 20, 64 * 40]
    flat, vals = BatchTopKSelector()(pre, n)
    codes = codes_from_topk(pre, torch.tensor(n), max(n))
    assert codes.flat.numel() == 3 * max(n)
    active = codes.active.bool()
    assert torch.equal(codes.flat[active], flat) and torch.equal(codes.vals[active], vals)
    assert bool((codes.vals[~active] == 0).all())
    dense = torch.zeros(pre.numel()).index_put_((flat,), vals).view_as(pre)
    assert torch.equal(codes.fired(torch.float32), (dense > 0).sum(dim=1).float())
    assert codes.run_counts.tolist() == [int((dense[r] > 0).sum()) for r in range(3)]


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
