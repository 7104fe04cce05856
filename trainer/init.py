"""Initialisation shared by the architectures, per run of a stack.

Each run draws its weights from its own `torch.Generator` seeded with that run's seed, so run r of a
stack is bit-for-bit the single run (R = 1) with the same seed: stacking never changes a result.
"""

from __future__ import annotations

from typing import Sequence

import torch

from pipeline.errors import PipelineError


@torch.no_grad()
def init_tied_weights_(W_enc: torch.Tensor, W_dec: torch.Tensor, b_enc: torch.Tensor,
                       seeds: Sequence[int], dec_init_norm: torch.Tensor, tied: bool = True) -> None:
    """Fill `W_dec (R, d_sae, d_in)` with random rows of norm `dec_init_norm[r]`, set
    `W_enc (R, d_in, d_sae)` to its per-run transpose and `b_enc` to 0, in place.

    Tied init (W_enc = W_dec^T) is what Gao et al. 2024 and Anthropic's April 2024 update use: at
    step 0 every latent reads the direction it writes, which cuts early dead latents."""
    R, d_sae, d_in = W_dec.shape
    if len(seeds) != R:
        raise PipelineError(f"{len(seeds)} seeds for a stack of {R} runs; give one seed per run")
    if W_dec.is_meta:  # a replay at real sizes (trainer.step_trace): shapes only, no values to draw
        return
    for r, seed in enumerate(seeds):
        g = torch.Generator(device="cpu").manual_seed(int(seed))
        # Drawn on the CPU in float32 whatever the target device/dtype: the same seed gives the
        # same SAE everywhere.
        w = torch.randn(d_sae, W_dec.shape[-1], generator=g, dtype=torch.float32)
        w = w / w.norm(dim=-1, keepdim=True) * float(dec_init_norm[r])
        W_dec[r].copy_(w)
        if W_enc.shape[1] != W_dec.shape[-1] or not tied:
            # A transcoder reads one space and writes another: the encoder gets its own directions.
            w = torch.randn(d_sae, W_enc.shape[1], generator=g, dtype=torch.float32)
            w = w / w.norm(dim=-1, keepdim=True) * float(dec_init_norm[r])
        W_enc[r].copy_(w.T)
    b_enc.zero_()


@torch.no_grad()
def geometric_median(points: torch.Tensor, iters: int = 5, eps: float = 1e-8) -> torch.Tensor:
    """Weiszfeld iterations for the geometric median of `points (..., n, d)`, batched over the
    leading dimensions; starts from the mean. A few iterations are plenty for an initial `b_dec`."""
    median = points.mean(dim=-2)
    for _ in range(iters):
        dist = (points - median.unsqueeze(-2)).norm(dim=-1).clamp_min(eps)  # (..., n)
        w = 1.0 / dist
        median = (w.unsqueeze(-1) * points).sum(dim=-2) / w.sum(dim=-1, keepdim=True)
    return median


@torch.no_grad()
def init_b_dec_(b_dec: torch.Tensor, sample: torch.Tensor, method: str = "mean", iters: int = 5) -> None:
    """Set `b_dec (R, d_in)` from a sample batch, in place: `sample (n, d_in)` is shared by every run,
    `(R, n, d_in)` gives each run its own. `method` is "mean", "geometric_median", "zeros" or "keep" (leave as is).

    Starting b_dec at the data's centre means the encoder sees centred inputs from step 0."""
    R, d_in = b_dec.shape
    if method == "keep":
        return
    if method == "zeros":
        b_dec.zero_()
        return
    if sample.shape[-1] != d_in or sample.dim() not in (2, 3) or (sample.dim() == 3 and sample.shape[0] != R):
        raise PipelineError(f"b_dec init sample has shape {tuple(sample.shape)}; expected (n, {d_in}) "
                            f"or ({R}, n, {d_in})")
    x = sample.to(device=b_dec.device, dtype=torch.float32)
    if method == "mean":
        centre = x.mean(dim=-2)
    elif method == "geometric_median":
        centre = geometric_median(x, iters=iters)
    else:
        raise PipelineError(f"unknown b_dec init method {method!r}; use mean, geometric_median or zeros")
    b_dec.copy_(centre.expand(R, d_in).to(b_dec.dtype))


@torch.no_grad()
def search_init_scale_(model, sample: torch.Tensor, grid: torch.Tensor | None = None,
                       max_rows: int = 1024) -> torch.Tensor:
    """Grid-search, per run, the scale of the tied initial weights that minimises the MSE on `sample`.

    As Language-Model-SAEs' `Initializer`: with b_dec already set from the data, random unit
    directions reconstruct best at one overall scale, and starting there saves the first few hundred
    steps of Adam finding it. A run whose decoder is kept unit-norm (`model.unit_norm_decoder`)
    scales only its encoder; otherwise W_dec rows get norm s and W_enc = W_dec^T. A coarse
    log-spaced grid, then a finer one around each run's best. Returns the chosen scales (R,).

    The 47 forwards use the first `max_rows` rows of the sample (a shuffled batch): on the default
    cache 1,024 rows chose the same scale as 4,096 for 5 of 6 (architecture, d_sae) pairs tried (the sixth, a
    TopK at d_sae 1024, one fine step off with the same full-batch MSE to 1e-4) in 3.4-3.7x less
    time (d_sae 8192: 4.6-5.1 s -> 1.2-1.5 s), the biggest fixed cost of a short run or sweep."""
    W_enc, W_dec = model.W_enc, model.W_dec
    R = W_dec.shape[0]
    unit = W_dec / W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # (R, d_sae, d_out)
    unit_enc = W_enc / W_enc.norm(dim=1, keepdim=True).clamp_min(1e-12)  # (R, d_in, d_sae)
    unit_dec = getattr(model, "unit_norm_decoder", False)
    x = sample[..., :max_rows, :].to(device=W_dec.device, dtype=W_dec.dtype)

    def set_scale(s: torch.Tensor) -> None:  # s: (R,)
        s3 = s.view(R, 1, 1).to(W_dec.dtype)
        W_dec.copy_(unit if unit_dec else unit * s3)
        W_enc.copy_(unit_enc * s3)

    def mse_at(scales: torch.Tensor) -> torch.Tensor:  # scales (G, R): one forward per row -> (G, R)
        out = []
        for s in scales:
            set_scale(s)
            out.append(model(x)["mse"].float())
        return torch.stack(out)

    if grid is None:  # coarse, log-spaced; then 21 points within a coarse step of each run's best
        grid = torch.logspace(-3, 2, 26)
    grid = grid.to(W_dec.device).view(-1, 1).expand(-1, R)
    best = grid[mse_at(grid).argmin(dim=0), torch.arange(R)]  # (R,)
    fine = best * torch.logspace(-0.2, 0.2, 21, device=W_dec.device).view(-1, 1)  # (21, R)
    best = fine[mse_at(fine).argmin(dim=0), torch.arange(R)]
    set_scale(best)
    return best
