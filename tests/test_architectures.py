"""The architectures beyond TopK and standard: batchtopk, jumprelu, gated, matryoshka.

For each: a stack equals its runs trained one by one (through the real loop, `train_stack`), an
export round-trips into a fresh model, SAELens loads the export and encodes/decodes as we do, the
exported (inference) SAE keeps the L0 the run had in training, and it learns easy sparse data.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.errors import PipelineError
from trainer.export import export_saelens, init_from
from trainer.registry import get_architecture, registered_architectures
from trainer.sae_batchtopk import BatchTopKConfig, BatchTopKSAE
from trainer.sae_gated import GatedConfig, GatedSAE
from trainer.sae_jumprelu import JumpReLUConfig, JumpReLUSAE
from trainer.sae_matryoshka import MatryoshkaConfig, MatryoshkaSAE
from trainer.train import LoopConfig, explained_variance, train_stack
from tests.builders import ARCHS, sparse_batches, stack_configs

ATOL = 1e-5  # stacked vs one-by-one, float32, after 50 steps (as tests/test_trainer_arch.py)
L0_RTOL = 0.10  # exported inference L0 on held-out rows vs the last training L0


# -- 1. a stack equals its runs trained one by one -------------------------------------------------


def train_logged(model, data: list[torch.Tensor], lr, clip) -> list[dict]:
    """`train_stack` over `data`, every step's metrics returned."""
    lines: list[dict] = []
    train_stack(model, data, LoopConfig(lr=lr, max_grad_norm=clip, log_every=1), log=lines.append)
    return lines


@pytest.mark.parametrize("arch", ARCHS)
def test_stack_equals_single_runs(arch):
    """R = 3 runs (seeds 0, 1, 2; per-run sparsity settings; lr 1e-3, 3e-3, 1e-2; clip 0.5, 1, inf)
    trained 50 steps by `train_stack` on the same batches equal the same runs trained one by one as
    R = 1 stacks: every parameter and buffer (thresholds, dead-latent counts) within atol 1e-5, and
    every step's loss terms and L0 (float32)."""
    d_in, d_sae = 16, 64
    cls = get_architecture(arch)
    cfgs = stack_configs(arch, d_in, d_sae)
    lrs, clips = [1e-3, 3e-3, 1e-2], [0.5, 1.0, float("inf")]
    data = sparse_batches(50, 64, d=d_in, n_feat=32)
    stack = cls(cfgs)
    stack_lines = train_logged(stack, data, lrs, clips)
    for r, cfg in enumerate(cfgs):
        single = cls([cfg])
        single_lines = train_logged(single, data, lrs[r], clips[r])
        for name, value in single.state_dict().items():
            torch.testing.assert_close(stack.state_dict()[name][r], value[0], atol=ATOL, rtol=0,
                                       msg=lambda m: f"run {r}, {name}: {m}")
        for step, (so, o) in enumerate(zip(stack_lines, single_lines)):
            for key in o:
                if isinstance(o[key], list) and o[key] and isinstance(o[key][0], float) and key not in ("lr", "tokens_per_s"):
                    assert so[key][r] == pytest.approx(o[key][0], abs=ATOL, rel=1e-5), (r, step, key)
    if arch in ("batchtopk", "matryoshka"):  # AuxK did take part, and the thresholds differ per run
        assert any(max(line["aux_loss"]) > 0 for line in stack_lines)
        assert len(set(stack.threshold[:, 0].tolist())) == 3


# -- 2-5. trained runs: export round trip, SAELens, L0 kept, learning ------------------------------

TRAIN_STEPS = 400


def trained_configs(arch: str) -> tuple[list, float]:
    """Two runs per architecture (so that run 1 of a stack is what gets exported) and the lr."""
    d_in, d_sae = 32, 128
    if arch == "batchtopk":
        return [BatchTopKConfig(d_in=d_in, d_sae=d_sae, k=k, seed=s) for s, k in [(0, 3), (1, 5)]], 3e-3
    if arch == "matryoshka":
        return [MatryoshkaConfig(d_in=d_in, d_sae=d_sae, k=k, seed=s) for s, k in [(0, 3), (1, 5)]], 3e-3
    if arch == "jumprelu":  # the defaults (L0 coefficient 0.3), and a weaker L0 penalty
        # A penalty c per firing latent drops the features whose squared magnitude is below c
        # (magnitudes here: uniform in [0.5, 1.5)); at c >= 0.4 the optimum loses > 0.1 of the
        # explained variance, so this test stays below.
        return [JumpReLUConfig(d_in=d_in, d_sae=d_sae, seed=0), JumpReLUConfig(d_in=d_in, d_sae=d_sae, seed=1,
                                                                                 l0_coefficient=0.1)], 3e-3
    # L1 1 finds the true L0 of 3 (held-out EV 0.92); 2 drops features (L0 1.5, EV 0.70) since the
    # decoder norms in the L1 are frozen (trainer/sae_gated.py): the decoder cannot shrink to dodge it.
    return [GatedConfig(d_in=d_in, d_sae=d_sae, l1_coefficient=c, seed=s) for s, c in [(0, 1.0), (1, 0.75)]], 1e-2


@pytest.fixture(scope="module")
def trained():
    """arch -> (model, last training metrics, held-out rows): 400 steps of 256 rows each."""
    cache = {}

    def get(arch: str):
        if arch not in cache:
            cfgs, lr = trained_configs(arch)
            model = get_architecture(arch)(cfgs)
            last = train_stack(model, sparse_batches(TRAIN_STEPS, 256), LoopConfig(lr=lr, log_every=50), log=None)
            cache[arch] = model, last, torch.cat(sparse_batches(16, 256, seed=99))
        return cache[arch]

    return get


@pytest.mark.parametrize("arch", ARCHS)
def test_export_round_trip(tmp_path, trained, arch):
    """Run 1 of a trained stack, exported and loaded back (`init_from`) into a fresh R = 1 model,
    encodes and decodes exactly as the run did; the extra weights (threshold, r_mag...) came along."""
    model, _, held = trained(arch)
    export_saelens(model, 1, tmp_path / "sae", {"hook_name": "x"})
    fresh = type(model)([model.cfgs[1]])
    init_from(fresh, tmp_path / "sae")
    with torch.no_grad():
        ours, theirs = model.encode(held)[1], fresh.encode(held)[0]
        torch.testing.assert_close(theirs, ours, atol=1e-6, rtol=1e-6)
        assert torch.equal(theirs > 0, ours > 0)
        torch.testing.assert_close(fresh.decode(theirs[None])[0], model.decode(ours[None].expand(2, -1, -1))[1],
                                   atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_export_loads_in_saelens(tmp_path, trained, arch):
    """SAELens 6.54 loads the export as its `jumprelu` (batchtopk, jumprelu, matryoshka) or `gated`
    SAE, and its encode/decode equal ours on the same rows."""
    sae_lens = pytest.importorskip("sae_lens")
    model, _, held = trained(arch)
    export_saelens(model, 1, tmp_path / "sae", {"hook_name": "x"}, sparsity=torch.full((model.d_sae,), -2.0))
    sae = sae_lens.SAE.load_from_disk(str(tmp_path / "sae"), device="cpu")
    assert sae.cfg.architecture() == ("gated" if arch == "gated" else "jumprelu")
    x = held[:64]  # few rows: an activation within float rounding of a threshold would differ
    with torch.no_grad():
        ours, theirs = model.encode(x)[1], sae.encode(x)
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
        assert (ours > 0).any()
        torch.testing.assert_close(sae.decode(theirs), model.decode(ours[None].expand(2, -1, -1))[1],
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_exported_l0_equals_training_l0(tmp_path, trained, arch):
    """The exported SAE (as SAELens runs it) on 4,096 held-out rows fires as many latents per row
    as the run did in its last training step, within 10%. For batchtopk and matryoshka this is the
    point of the tracked threshold: training L0 is exactly k, inference is a JumpReLU.
    Measured (held-out / training): batchtopk 2.99/3, 4.92/5; matryoshka 3.01/3, 4.98/5; jumprelu
    2.45/2.48, 2.87/2.88; gated 2.91/2.87, 3.57/3.53. With SAELens's threshold rate (0.01 instead of
    0.1) the batchtopk k = 5 run exports 4.13 (-17%)."""
    sae_lens = pytest.importorskip("sae_lens")
    model, last, held = trained(arch)
    for run in range(model.n_runs):
        export_saelens(model, run, tmp_path / str(run), {"hook_name": "x"})
        sae = sae_lens.SAE.load_from_disk(str(tmp_path / str(run)), device="cpu")
        with torch.no_grad():
            l0 = float((sae.encode(held) > 0).sum(-1).float().mean())
        # The k-based ones' export is held to the issue's 5% (measured: within 1.6%).
        rel = 0.05 if arch in ("batchtopk", "matryoshka") else L0_RTOL
        assert l0 == pytest.approx(last["l0"][run], rel=rel), (run, l0, last["l0"])
        if arch in ("batchtopk", "matryoshka"):
            assert last["l0"][run] == model.cfgs[run].k


@pytest.mark.parametrize("arch", ARCHS)
def test_learns_sparse_data(trained, arch):
    """Easy sparse data (3 of 64 directions in d = 32): explained variance above 0.8 on held-out
    rows with the inference encoder, and a sparse code (L0 below d_sae / 10 = 12.8)."""
    model, last, held = trained(arch)
    with torch.no_grad():
        latents = model.encode(held)
        ev = explained_variance(held, model.decode(latents))
        l0 = (latents > 0).sum(-1).float().mean(-1)
    assert ev.min() > 0.8, ev.tolist()
    assert min(last["explained_variance"]) > 0.8, last["explained_variance"]
    assert l0.max() < model.d_sae / 10, l0.tolist()


# -- architecture specifics ------------------------------------------------------------------------

def test_batchtopk_is_batch_wide_and_calibrates():
    """Training keeps k * B latents over the batch (rows may differ); `calibrate_threshold` sets the
    inference threshold so that the L0 over the calibration rows is k exactly."""
    model = BatchTopKSAE([BatchTopKConfig(d_in=32, d_sae=128, k=k, seed=k) for k in (2, 5)])
    x = sparse_batches(1, 512)[0]
    model.init_b_dec(x)
    out = model(x)
    latents = model.select(model.pre_acts(x), model.k, model.k_max).detach()  # the step's kept entries
    assert torch.equal(out["fired"], (latents > 0).sum(dim=1).float())
    per_row = (latents > 0).sum(-1)  # (R, B)
    assert per_row.sum(-1).tolist() == [2 * 512, 5 * 512] and out["l0"].tolist() == [2.0, 5.0]
    assert per_row.min() != per_row.max()
    model.calibrate_threshold(x)
    assert (model.encode(x) > 0).sum(-1).float().mean(-1).tolist() == [2.0, 5.0]
    # The first batch threshold the loop's after_step takes is the smallest kept activation.
    model.after_step(out, x.shape[0])
    smallest = torch.stack([lat[lat > 0].min() for lat in latents])
    assert torch.equal(model.threshold, smallest[:, None].expand(2, 128))
    assert model.threshold_batches.tolist() == [1, 1]


def test_matryoshka_prefix_losses():
    """The loss sums (or averages) every prefix's MSE; the last prefix is the full reconstruction."""
    cfgs = [MatryoshkaConfig(d_in=16, d_sae=64, k=4, prefix_loss=p) for p in ("sum", "mean")]
    model_sum, model_mean = MatryoshkaSAE(cfgs[0]), MatryoshkaSAE(cfgs[1])
    assert model_sum.prefix_widths == (4, 8, 16, 32, 64)
    x = sparse_batches(1, 32, d=16, n_feat=32)[0]
    out_sum, out_mean = model_sum(x), model_mean(x)
    lat, W = model_sum.select(model_sum.pre_acts(x), model_sum.k, model_sum.k_max).detach(), model_sum.W_dec
    torch.testing.assert_close(out_sum["mse"], model_sum.mse(x, model_sum.decode(lat)))
    torch.testing.assert_close(out_sum["prefix_mse"], out_mean["prefix_mse"] * 5)
    by_hand = sum(model_sum.mse(x, torch.einsum("rbs,rsi->rbi", lat[..., :w], W[:, :w]) + model_sum.b_dec[:, None])
                  for w in (4, 8, 16, 32, 64))
    torch.testing.assert_close(out_sum["prefix_mse"], by_hand)
    with pytest.raises(PipelineError, match="prefix_widths"):
        MatryoshkaSAE(MatryoshkaConfig(d_in=16, d_sae=64, k=4, prefix_widths=(8, 4, 64)))
    with pytest.raises(PipelineError, match="share prefix_widths"):
        MatryoshkaSAE([MatryoshkaConfig(d_in=16, d_sae=64, k=4),
                       MatryoshkaConfig(d_in=16, d_sae=64, k=4, prefix_widths=(32, 64))])


def test_jumprelu_straight_through_gradients():
    """The thresholds get the rectangle-kernel pseudo-derivatives: the L0 term pushes a threshold
    up by (1/eps) per pre-activation within eps/2 of it; none reaches the encoder through the step."""
    model = JumpReLUSAE(JumpReLUConfig(d_in=4, d_sae=3, init_threshold=0.5, bandwidth=0.2, l0_coefficient=1.0))
    with torch.no_grad():
        model.W_enc.zero_()
        model.b_enc.copy_(torch.tensor([[0.45, 0.65, 0.55]]))  # every row: pre = b_enc
    x = torch.zeros(8, 4)
    out = model(x)
    out["aux_loss"].sum().backward()
    # d/d log_theta of mean_b sum_i H(pre_i - theta_i) = theta * (-(1/eps) K((pre - theta) / eps)), and
    # the parameter is log_theta / threshold_rate (no data seen: init_threshold and eps are absolute).
    rate = model.cfgs[0].threshold_rate
    torch.testing.assert_close(model.threshold_param.grad, rate * torch.tensor([[-0.5 / 0.2, 0.0, -0.5 / 0.2]]))
    assert model.b_enc.grad is None or not model.b_enc.grad.any()
    assert out["l0"].tolist() == [2.0]


def test_jumprelu_defaults_reach_a_sparse_code_in_a_short_run():
    """150 steps of 256 rows at lr 1e-3 (38k tokens; true L0 3): the default settings take the
    initial L0 (about 36 of 128) below 4, and the L0 coefficient sets where it lands (0.03 stays
    well above). Measured: 2.2 and 5.9. With log-space thresholds at Adam's plain rate and the old
    bandwidth (threshold_rate 1, bandwidth 0.05) both stay at 30.6: thresholds cannot travel in so
    few steps."""
    cfgs = [JumpReLUConfig(d_in=32, d_sae=128, seed=0), JumpReLUConfig(d_in=32, d_sae=128, seed=0, l0_coefficient=0.03)]
    model = JumpReLUSAE(cfgs)
    train_stack(model, sparse_batches(150, 256), LoopConfig(lr=1e-3, log_every=50), log=None)
    with torch.no_grad():
        l0 = (model.encode(torch.cat(sparse_batches(8, 256, seed=99))) > 0).sum(-1).float().mean(-1).tolist()
    assert l0[0] < 4.0, l0
    assert l0[1] > 1.5 * l0[0], l0


def test_gated_auxiliary_loss_uses_a_frozen_decoder():
    """The gate's auxiliary reconstruction trains the encoder and b_gate, not the decoder."""
    model = GatedSAE(GatedConfig(d_in=8, d_sae=16, l1_coefficient=0.0))
    x = sparse_batches(1, 32, d=8, n_feat=16)[0]
    out = model(x)
    out["gate_recon_mse"].sum().backward()
    assert model.W_dec.grad is None or not model.W_dec.grad.any()
    assert model.b_dec.grad is not None and model.b_dec.grad.any()  # through the centred input
    assert model.b_gate.grad.any() and model.W_enc.grad.any()
    assert "b_enc" not in dict(model.named_parameters())


def test_registered():
    assert set(ARCHS) <= set(registered_architectures())
    assert get_architecture("gated") is GatedSAE and get_architecture("matryoshka") is MatryoshkaSAE
