"""Matryoshka BatchTopK SAE (Bussmann et al. 2025, "Learning multi-level features with Matryoshka
SAEs"; Nabeshima 2024), for a stack of R runs.

The latents are ordered and cut into nested prefixes of widths m_1 < m_2 < ... < m_G = d_sae
(default d_sae/16, d_sae/8, d_sae/4, d_sae/2, d_sae). Each prefix must reconstruct the input on
its own:

    latents = BatchTopK_k(W_enc^T (x - b_dec) + b_enc)                 (as trainer.sae_batchtopk)
    recon_g = W_dec[:m_g]^T latents[:m_g] + b_dec                      g = 1..G
    loss    = sum_g mse(x, recon_g)  (or their mean)  + aux_k_coef * auxk

so the first latents learn the most general features (they carry every prefix's loss) and later
ones refine them, which limits feature absorption. recon = recon_G is the full reconstruction and
`mse` is its error. Everything else (the batch top-k, the threshold tracked for inference, AuxK on
the full residual, the `jumprelu` export) is BatchTopK's, inherited, including its sparse
training step: each token's kept latents are summed per prefix group (one bag per token and
group) and recon_g is the running sum of the groups' parts, so no prefix touches a dense
latent. Runs in one stack share d_in, d_sae, the prefix widths and the prefix-loss reduction; k
and the other BatchTopK settings may differ per run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from pipeline.errors import PipelineError
from trainer.kernels.chunks import counts
from trainer.kernels.sparse import BatchCodes, segment_decode
from trainer.registry import register_architecture
from trainer.sae_batchtopk import BatchTopKConfig, BatchTopKSAE
from trainer.stack import StepOutput, shared


@dataclass
class MatryoshkaConfig(BatchTopKConfig):
    """One Matryoshka BatchTopK run: BatchTopK's fields and the nested prefixes."""

    prefix_widths: tuple[int, ...] | None = None
    """Widths of the nested prefixes, increasing, the last = d_sae; None = d_sae/16, /8, /4, /2, d_sae."""
    prefix_loss: str = "sum"
    """How the prefixes' MSEs combine into the loss: "sum" (as SAELens) or "mean"."""

    def resolved_prefix_widths(self) -> tuple[int, ...]:
        """prefix_widths with its default filled in."""
        if self.prefix_widths is not None:
            return tuple(int(w) for w in self.prefix_widths)
        return tuple(sorted({max(1, self.d_sae // d) for d in (16, 8, 4, 2)} | {self.d_sae}))


@register_architecture("matryoshka")
class MatryoshkaSAE(BatchTopKSAE):
    """A stack of R Matryoshka BatchTopK SAEs of the same shape, trained on the same batches."""

    config_class = MatryoshkaConfig
    unit_norm_decoder = True
    supports_transcoder = False  # its prefixes reconstruct its input only

    def __init__(self, cfgs: MatryoshkaConfig | Sequence[MatryoshkaConfig]):
        super().__init__(cfgs)
        widths = [c.resolved_prefix_widths() for c in self.cfgs]
        if any(w != widths[0] for w in widths):
            raise PipelineError(f"runs stacked together must share prefix_widths; got {widths}")
        self.prefix_widths = widths[0]
        w = self.prefix_widths
        if not w or w[-1] != self.d_sae or any(a >= b for a, b in zip(w, w[1:])) or w[0] < 1:
            raise PipelineError(f"prefix_widths {list(w)} must increase strictly from >= 1 to d_sae = {self.d_sae}")
        self.prefix_loss = shared(self.cfgs, "prefix_loss")
        if self.prefix_loss not in ("sum", "mean"):
            raise PipelineError(f"prefix_loss {self.prefix_loss!r}: use sum or mean")
        # On the device once, so a step does not copy it from the host.
        self.register_buffer("_prefix_ends", torch.tensor(w), persistent=False)

    # -- the training step's forward -----------------------------------------------------------

    def prefix_recons(self, latents: torch.Tensor) -> list[torch.Tensor]:
        """Reconstructions (R, batch, d_in) from each prefix of `latents (R, batch, d_sae)`, built up
        group by group; the last is the full reconstruction."""
        recon, start, out = self.b_dec.unsqueeze(1), 0, []
        for end in self.prefix_widths:
            recon = recon + torch.einsum("rbs,rsi->rbi", latents[..., start:end], self.W_dec[:, start:end])
            out.append(recon)
            start = end
        return out

    def prefix_bags(self, codes: BatchCodes) -> tuple[torch.Tensor, torch.Tensor]:
        """Each kept entry's bag, (token, prefix group) flattened as token * G + group, and each
        bag's first entry: the codes are sorted by latent within a token, so a token's groups are
        consecutive runs of its entries."""
        G = len(self.prefix_widths)
        bags = codes.token * G + torch.searchsorted(self._prefix_ends, codes.latent, right=True)
        per_bag = counts(bags, codes.token_starts.numel() * G)
        return bags, per_bag.cumsum(0).sub_(per_bag)

    def forward(self, x: torch.Tensor) -> StepOutput:
        """Everything a training step needs, per run.

        Returns `loss`, `mse` (the full reconstruction's), `prefix_mse` (the sum or mean of every
        prefix's MSE, the last prefix included), `aux_loss`, `l0`, `threshold` (each (R,)) and
        `recon` (R, batch, d_in), plus BatchTopK's `fired` and `batch_threshold`.
        loss = prefix_mse + aux_loss. Backpropagate `loss.sum()`.

        The fused step sums each prefix group's part of every token's reconstruction as one sparse
        bag; the prefixes' reconstructions are their running sums over the groups."""
        self._check_input(x)
        target = x if x.dim() == 3 else x.unsqueeze(0)
        if self.use_fused(x):
            w = self.fused_weights()
            pre, codes, latents, kept = self.sparse_step(x, w)
            R, B, _ = pre.shape
            G = len(self.prefix_widths)
            parts = segment_decode(kept, w.W_dec, codes, *self.prefix_bags(codes)).view(R, B, G, -1)
            # Group by group (unbind: one gradient buffer for all of them, where slicing would zero a
            # full-size one per group), not a cumsum over the groups' strided dimension (3x slower).
            recons, recon = [], self.b_dec.unsqueeze(1)
            for part in parts.unbind(dim=2):
                recon = recon + part
                recons.append(recon)
            aux_x = x
        else:
            pre = self.pre_acts(x)
            codes, latents = None, self.select(pre, self.k, self.k_max)
            recons = self.prefix_recons(latents)
            aux_x = w = None
        recon = recons[-1]
        mses = torch.stack([self.mse(target, r) for r in recons])  # (G, R)
        prefix_mse = mses.sum(dim=0) if self.prefix_loss == "sum" else mses.mean(dim=0)
        loss, aux_loss = self.add_auxk(prefix_mse, pre, target - recon, aux_x, w)
        return {"loss": loss, "mse": mses[-1], "prefix_mse": prefix_mse, "aux_loss": aux_loss,
                **self.step_outputs(codes, latents), "recon": recon}
