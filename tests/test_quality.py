"""Measured SAE quality on synthetic data with a known ground truth (benchmarks/synthetic.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from benchmarks.synthetic import (
    SyntheticSpec, feature_recovery, firing_probabilities, fraction_recovered, generate, ground_truth,
    max_cosines, write_synthetic_cache,
)
from pipeline.loader import ActivationLoader
from trainer.run import evaluate
from trainer.sae_topk import TopKConfig, TopKSAE
from trainer.train import LoopConfig, train_stack


def test_feature_recovery_on_constructed_decoders():
    g = torch.Generator().manual_seed(0)
    true = torch.nn.functional.normalize(torch.randn(100, 64, generator=g), dim=1)
    # The true directions, permuted, rescaled (norms do not matter) and among extra random rows: 1.0.
    scales = torch.rand(100, 1, generator=g) * 3 + 0.1
    exact = torch.cat([true[torch.randperm(100, generator=g)] * scales, torch.randn(50, 64, generator=g)])
    random = torch.randn(150, 64, generator=g)
    stack = torch.stack([exact, random])  # (R = 2, d_sae, d)
    rec = feature_recovery(true, stack)
    assert rec.shape == (2,)
    assert rec[0].item() == pytest.approx(1.0, abs=1e-5)
    assert rec[1].item() < 0.5  # random rows in 64 dims: the best of 150 is ~0.35
    assert feature_recovery(true, exact).shape == (1,)  # a single (d_sae, d) decoder is R = 1
    assert feature_recovery(true, -exact)[0].item() < 0.5  # signed: an opposite direction is not the feature
    torch.testing.assert_close(fraction_recovered(true, stack), torch.tensor([1.0, 0.0]))
    # One feature missing from the decoder: only its own score drops (to its best cosine with the
    # other true features), so recovery falls by (1 - that) / 100 and 99% are recovered.
    cos = max_cosines(true, true[1:])[0]
    assert torch.all(cos[1:] > 0.9999) and cos[0] < 0.9
    assert feature_recovery(true, true[1:])[0].item() == pytest.approx(1 - (1 - cos[0].item()) / 100, abs=1e-6)
    assert fraction_recovered(true, true[1:])[0].item() == pytest.approx(0.99)


def test_synthetic_cache_has_the_requested_l0_and_power_law(tmp_path):
    spec = SyntheticSpec(d=16, n_features=64, mean_l0=4.0, alpha=1.0, noise_std=0.0, offset_norm=2.0, seed=3)
    data = write_synthetic_cache(tmp_path / "c", spec, rows=40_000, eval_rows=4_000)
    # Probabilities: a power law with the requested sum.
    p = data.probs
    assert p.sum() == pytest.approx(4.0, rel=1e-9)
    np.testing.assert_allclose(p[0] / p, np.arange(1, 65) ** 1.0, rtol=1e-9)
    assert p[0] == pytest.approx(4.0 / sum(1 / i for i in range(1, 65)), rel=1e-9)  # 0.841
    # Realised: mean L0 within 1% of 4 in both splits, frequencies on the power law (slope -alpha).
    assert data.mean_l0("train") == pytest.approx(4.0, rel=0.01)
    assert data.mean_l0("eval") == pytest.approx(4.0, rel=0.03)
    freq = data.frequencies("train")
    slope = np.polyfit(np.log(np.arange(1, 65)), np.log(freq), 1)[0]
    assert slope == pytest.approx(-1.0, abs=0.05)
    np.testing.assert_allclose(freq, p, atol=4 * np.sqrt(p * (1 - p) / 40_000).max())
    # The cache holds exactly the generated rows (shuffled on disk), split by split.
    loader = ActivationLoader(tmp_path / "c", hooks="x", batch_size=4096, split="train")
    cached = torch.cat(list(loader)).numpy()
    assert cached.shape == (40_000, 16) and loader.source.rows("eval") == 4_000
    generated = np.concatenate([x for _, x in generate(spec, 40_000, "train")])
    np.testing.assert_array_equal(np.sort(cached.sum(axis=1)), np.sort(generated.sum(axis=1)))
    # Its mean is the offset plus each direction times its probability (uniform magnitudes: mean 1).
    dirs, offset, _ = ground_truth(spec)
    expected_mean = offset.numpy() + p.astype(np.float32) @ dirs.numpy()
    np.testing.assert_allclose(cached.mean(axis=0), expected_mean, atol=0.03)
    assert np.linalg.norm(offset.numpy()) == pytest.approx(2.0, rel=1e-5)
    np.testing.assert_allclose(np.linalg.norm(dirs.numpy(), axis=1), 1.0, rtol=1e-5)


def test_synthetic_data_is_deterministic():
    spec = SyntheticSpec(d=8, n_features=32, mean_l0=2.0, seed=5)
    a = [x for _, x in generate(spec, 5_000, "train", chunk_rows=1024)]
    b = [x for _, x in generate(spec, 5_000, "train", chunk_rows=1024)]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    other = np.concatenate([x for _, x in generate(SyntheticSpec(d=8, n_features=32, mean_l0=2.0, seed=6), 5_000)])
    assert not np.allclose(np.concatenate(a), other)
    assert firing_probabilities(10, 10.0, 1.0) == pytest.approx(np.ones(10))  # clipped at 1
    assert firing_probabilities(100, 30.0, 2.0).max() == 1.0 and firing_probabilities(100, 30.0, 2.0).sum() == \
        pytest.approx(30.0)


def test_topk_recovers_the_true_features(tmp_path):
    """Easy setting: 128 features in 32 dimensions, 3 active per row on average. TopK with k = 3
    and twice as many latents finds nearly every feature (0.99 mean max cosine on seed 0)."""
    spec = SyntheticSpec(d=32, n_features=128, mean_l0=3.0, alpha=0.5, seed=0)
    rows, batch = 120_000, 256
    data = write_synthetic_cache(tmp_path / "c", spec, rows=rows, eval_rows=8_192)
    loader = ActivationLoader(tmp_path / "c", hooks="x", batch_size=batch, seed=0, tokens=rows)
    steps = math.ceil(rows / batch)
    model = TopKSAE([TopKConfig(d_in=32, d_sae=256, k=3, dead_tokens_threshold=rows // 10, seed=0)])
    loop = LoopConfig(lr=1e-2, lr_warmup_steps=steps // 20, lr_decay="cosine", total_steps=steps, log_every=steps)
    last = train_stack(model, loader, loop, log=None)
    recovery = feature_recovery(data.directions, model.W_dec)
    assert recovery.shape == (1,)
    assert recovery[0].item() > 0.9, recovery
    assert fraction_recovered(data.directions, model.W_dec)[0].item() > 0.8
    metrics, _ = evaluate(model, list(ActivationLoader(tmp_path / "c", hooks="x", batch_size=4096, split="eval")))
    assert 2.5 < last["l0"][0] <= 3.0  # top 3, minus the odd negative pre-activation ReLU drops
    assert metrics["eval_explained_variance"][0] > 0.7
