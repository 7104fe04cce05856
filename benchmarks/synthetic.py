"""Synthetic activations with a known ground truth, for measuring how well an SAE recovers features.

Each row is a sparse, non-negative combination of `n_features` unit directions in `d` dimensions
(superposition: n_features > d), plus a fixed mean offset and optional Gaussian noise:

    x = offset + sum_i a_i f_i + noise,   a_i = m_i * 1[feature i fires],  m_i >= 0

Feature i fires independently with probability p_i proportional to (i + 1)^-alpha (a power law),
scaled so that the expected number of active features per row (the true L0) is `mean_l0`. The
magnitudes m_i are drawn uniform on [0.5, 1.5] or exponential with mean 1.

Everything is a function of `seed`: the directions and offset come from one generator, and each
chunk of rows of a split from its own (seed, split, chunk) generator, so the same spec always gives
the same rows. `write_synthetic_cache` writes a train and an eval split through the writer API and
returns the true directions; `feature_recovery` scores a decoder against them.

    from benchmarks.synthetic import SyntheticSpec, write_synthetic_cache, feature_recovery
    data = write_synthetic_cache("caches/synthetic", SyntheticSpec(d=64, n_features=512), rows=300_000)
    score = feature_recovery(data.directions, model.W_dec)     # (R,) mean max cosine per run
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from pipeline.writer import ActivationBlock, CacheWriter, WriterConfig

SPLIT_IDS = {"train": 1, "eval": 2}
CHUNK_ROWS = 16_384


@dataclass(frozen=True)
class SyntheticSpec:
    """What the activations look like (the ground truth is a function of this and nothing else)."""

    d: int = 64
    """Width of the activations."""
    n_features: int = 512
    """Number of true feature directions (n_features > d: superposition)."""
    mean_l0: float = 5.0
    """Expected number of active features per row."""
    alpha: float = 0.5
    """Power-law exponent of the firing probabilities: p_i proportional to (i + 1)^-alpha."""
    magnitude: str = "uniform"
    """'uniform' (on [0.5, 1.5]) or 'exponential' (mean 1) magnitudes of an active feature."""
    noise_std: float = 0.01
    """Std of isotropic Gaussian noise added to every coordinate (0: none)."""
    offset_norm: float = 1.0
    """Norm of the fixed mean offset added to every row (a random direction; 0: none)."""
    seed: int = 0
    """Seed of the directions, the offset and every row."""


@dataclass
class SyntheticData:
    """What `write_synthetic_cache` wrote and the ground truth behind it."""

    path: Path
    spec: SyntheticSpec
    directions: torch.Tensor
    """(n_features, d) unit feature directions."""
    offset: torch.Tensor
    """(d,) the mean offset added to every row."""
    probs: np.ndarray
    """(n_features,) firing probability of each feature."""
    rows: dict[str, int] = field(default_factory=dict)
    """Rows written per split."""
    counts: dict[str, np.ndarray] = field(default_factory=dict)
    """Per split, how many rows each feature fired in (n_features,)."""

    def mean_l0(self, split: str = "train") -> float:
        """The realised mean number of active features per row of a split."""
        return float(self.counts[split].sum() / self.rows[split])

    def frequencies(self, split: str = "train") -> np.ndarray:
        """The realised firing frequency of each feature in a split."""
        return self.counts[split] / self.rows[split]


def firing_probabilities(n_features: int, mean_l0: float, alpha: float) -> np.ndarray:
    """p_i = min(1, c (i + 1)^-alpha) with c chosen so that sum_i p_i = mean_l0."""
    if not 0 < mean_l0 <= n_features:
        raise ValueError(f"mean_l0 = {mean_l0} must be in (0, n_features = {n_features}]")
    w = (np.arange(n_features, dtype=np.float64) + 1) ** -float(alpha)
    lo, hi = 0.0, mean_l0 / w.min()  # sum(min(1, c w)) is increasing in c; bisect for the target
    for _ in range(200):
        c = 0.5 * (lo + hi)
        if np.minimum(1.0, c * w).sum() < mean_l0:
            lo = c
        else:
            hi = c
    return np.minimum(1.0, 0.5 * (lo + hi) * w)


def ground_truth(spec: SyntheticSpec) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """(directions (n_features, d) unit rows, offset (d,), probabilities (n_features,)) of a spec."""
    rng = np.random.default_rng([spec.seed, 0])
    dirs = rng.standard_normal((spec.n_features, spec.d))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    offset = rng.standard_normal(spec.d)
    offset *= spec.offset_norm / np.linalg.norm(offset)
    probs = firing_probabilities(spec.n_features, spec.mean_l0, spec.alpha)
    return (torch.from_numpy(dirs.astype(np.float32)), torch.from_numpy(offset.astype(np.float32)), probs)


def generate(spec: SyntheticSpec, rows: int, split: str = "train",
             chunk_rows: int = CHUNK_ROWS) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Chunks of (coefficients (n, n_features) float32, x (n, d) float32) of a split, deterministic."""
    dirs, offset, probs = ground_truth(spec)
    dirs_np, offset_np = dirs.numpy(), offset.numpy()
    probs32 = probs.astype(np.float32)
    for c, start in enumerate(range(0, rows, chunk_rows)):
        n = min(chunk_rows, rows - start)
        rng = np.random.default_rng([spec.seed, SPLIT_IDS[split], c])
        active = rng.random((n, spec.n_features), dtype=np.float32) < probs32
        if spec.magnitude == "uniform":
            mags = rng.random((n, spec.n_features), dtype=np.float32) + np.float32(0.5)
        elif spec.magnitude == "exponential":
            mags = rng.standard_exponential((n, spec.n_features), dtype=np.float32)
        else:
            raise ValueError(f"unknown magnitude {spec.magnitude!r}; use uniform or exponential")
        coef = np.where(active, mags, np.float32(0))
        x = coef @ dirs_np + offset_np
        if spec.noise_std:
            x += rng.standard_normal((n, spec.d), dtype=np.float32) * np.float32(spec.noise_std)
        yield coef, x.astype(np.float32, copy=False)


def write_synthetic_cache(path: str | Path, spec: SyntheticSpec = SyntheticSpec(), rows: int = 300_000,
                          eval_rows: int = 20_000, overwrite: bool = False,
                          writer_config: WriterConfig | None = None) -> SyntheticData:
    """Write `rows` train rows and `eval_rows` eval rows of `spec` to a cache at `path` (hook "x")."""
    path = Path(path)
    dirs, offset, probs = ground_truth(spec)
    data = SyntheticData(path=path, spec=spec, directions=dirs, offset=offset, probs=probs)
    config = writer_config or WriterConfig(format="zarr", shard_mb=32, seed=spec.seed)
    with CacheWriter(path, {"x": spec.d}, config, overwrite=overwrite,
                     source_config={"synthetic": {**spec.__dict__, "rows": rows, "eval_rows": eval_rows}}) as w:
        for split, n in (("train", rows), ("eval", eval_rows)):
            counts = np.zeros(spec.n_features, dtype=np.int64)
            for coef, x in generate(spec, n, split):
                counts += (coef > 0).sum(axis=0)
                w.put(ActivationBlock({"x": torch.from_numpy(x)}, split=split))
            data.rows[split], data.counts[split] = n, counts
        w.close(complete=True)
    return data


@torch.no_grad()
def max_cosines(true_dirs: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """(R, n_features): for every true feature, its best cosine similarity with a decoder row.

    `W_dec` is (d_sae, d) or a stack (R, d_sae, d); rows of any norm (a zero row matches nothing)."""
    W = W_dec.detach().float()
    if W.dim() == 2:
        W = W.unsqueeze(0)
    true = torch.nn.functional.normalize(true_dirs.detach().float().to(W.device), dim=-1)
    W = torch.nn.functional.normalize(W, dim=-1)
    return torch.einsum("fd,rsd->rfs", true, W).amax(dim=-1)


def feature_recovery(true_dirs: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """(R,) mean over the true features of the best cosine similarity with a decoder row."""
    return max_cosines(true_dirs, W_dec).mean(dim=-1)


def fraction_recovered(true_dirs: torch.Tensor, W_dec: torch.Tensor, threshold: float = 0.9) -> torch.Tensor:
    """(R,) fraction of the true features some decoder row matches with cosine > threshold."""
    return (max_cosines(true_dirs, W_dec) > threshold).float().mean(dim=-1)
