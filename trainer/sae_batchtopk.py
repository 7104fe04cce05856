"""BatchTopK SAE (Bussmann et al. 2024, "BatchTopK sparse autoencoders"), for a stack of R runs.

Training, per run and batch of B rows:

    pre     = W_enc^T (x - b_dec) + b_enc                              (B, d_sae)
    latents = the top k*B entries of ReLU(pre) over the whole batch, zeros elsewhere
    recon   = W_dec^T latents + b_dec          (+ W_skip^T (x - b_in): a skip-transcoder)
    loss    = mse + aux_k_coef * auxk                                  (AuxK as in TopK)

so a token may use more or fewer than k latents, k on average over the batch. Keeping the top k*B
entries is thresholding the batch at its (k*B)-th largest pre-activation t_b; the run tracks t_b
(the smallest kept activation of each batch, as SAELens does: a running mean over the first
batches, then an exponential moving average with rate `threshold_lr`) in a `threshold` buffer.
SAELens's rate 0.01 lags behind a threshold that is still moving and its export drifts (a test
run: L0 4.13 at inference for k = 5); the default 0.1 keeps it within 2% (a batch of thousands of
rows pins t_b well, so the faster average costs little noise). Inference does not depend on the
batch:

    latents = JumpReLU_threshold(pre) = pre * H(pre - threshold)

which is what `encode` computes and how a run is exported (SAELens's `jumprelu` format, the
threshold given to every latent). With a unit-norm decoder (kept by the loop, as TopK) the
threshold is one number per run; `calibrate_threshold` can also set it from data so that the
inference L0 over that data is exactly k. Runs in one stack share d_in and d_sae; k, aux_k,
aux_k_coef, dead_tokens_threshold, threshold_lr and the seed may differ per run.

The training step computes the same thing as autograd through the formulas above, without their
dense work (trainer.kernels.sparse): the pre-activations are computed without a graph, the top k*B
is found exactly from a threshold guessed below it (a compare pass and an order statistic over
~1.2 k*B candidates, not a `topk` over all B * d_sae values), and the kept entries, a variable
number per token, go through sparse decoder and encoder kernels whose backward touches only them.
The dead-latent counts and the batch threshold come from those sparse codes too. The `select`
hook (swapped by data-parallel training) is still honoured: its dense output's positive entries
are the kept ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from pipeline.errors import PipelineError
from trainer.kernels.sparse import BatchCodes, BatchTopKSelector, codes_from_dense, codes_from_flat, codes_from_topk, \
    segment_decode, segment_pre_acts
from trainer.registry import register_architecture
from trainer.sae_jumprelu import jumprelu, load_threshold
from trainer.sae_topk import FusedWeights, TopKConfig, TopKSAE, topk_per_run
from trainer.stack import StepOutput, per_run


@dataclass
class BatchTopKConfig(TopKConfig):
    """One BatchTopK run: TopK's fields (k now counts latents per token on average over a batch)."""

    threshold_lr: float = 0.1
    """Rate of the moving average that tracks the batch threshold, after a plain mean of the first
    1 / threshold_lr batches (SAELens: 0.01, which lags further behind a still-moving threshold)."""


def batch_topk_per_run(pre: torch.Tensor, k: torch.Tensor, k_max: int) -> torch.Tensor:
    """Keep the top `k[r] * batch` entries of `pre (R, batch, d_sae)` over the whole batch of each
    run, ReLU'd, zeros elsewhere: `topk_per_run` on the batch flattened into one row."""
    R, B, S = pre.shape
    return topk_per_run(pre.reshape(R, 1, B * S), k * B, k_max * B).view(R, B, S)


@register_architecture("batchtopk")
class BatchTopKSAE(TopKSAE):
    """A stack of R BatchTopK SAEs of the same shape, trained on the same batches.

    TopK's k annealing, dead-latent counts and AuxK loss apply unchanged (inherited)."""

    config_class = BatchTopKConfig
    supports_transcoder = True
    unit_norm_decoder = True
    fused_transcoder = True
    selection: str = "auto"
    """How the fused step finds the batch's top k*B: "threshold" (`BatchTopKSelector`: a compare pass
    and an order statistic over the candidates, faster on a CPU, but it reads counts back: a few host
    syncs a step), "topk" (`codes_from_topk`: one topk per run, fixed-size codes, no host sync) or
    "auto" (threshold on a CPU, topk elsewhere). Both keep exactly the same entries."""

    def __init__(self, cfgs: BatchTopKConfig | Sequence[BatchTopKConfig]):
        super().__init__(cfgs)
        # The batch-wide selection: data-parallel training (trainer.distributed) swaps in one over
        # every rank's rows.
        self.select = batch_topk_per_run
        for c in self.cfgs:
            if not 0 < c.threshold_lr <= 1:
                raise PipelineError(f"threshold_lr = {c.threshold_lr} must be in (0, 1]")
        R, d_sae = self.n_runs, self.d_sae
        self.register_buffer("threshold_lr", per_run(self.cfgs, "threshold_lr", torch.float32))
        # The inference threshold per run and latent (one value per run unless loaded from elsewhere),
        # and the number of batches it has seen (the moving average starts as a plain mean).
        self.register_buffer("threshold", torch.zeros(R, d_sae))
        self.register_buffer("threshold_batches", torch.zeros(R, dtype=torch.long))
        # Finds the batch-wide top k*B exactly without sorting every value (trainer.kernels.sparse);
        # its state is a guess that only saves work, so it is not saved with the model.
        self._selector = BatchTopKSelector()

    def after_step(self, out: dict[str, torch.Tensor], n_tokens: int) -> None:
        self._count_tokens(out["fired"] > 0, n_tokens)
        self._move_threshold(out["batch_threshold"].view(-1))

    def export_run(self, run: int) -> tuple[dict[str, torch.Tensor], dict]:
        weights = {**self.export_weights(run), "threshold": self.threshold[run]}
        arch = self.transcoder_cfg("jumprelu_transcoder") if self.is_transcoder else {"architecture": "jumprelu"}
        return weights, arch

    @torch.no_grad()
    def load_run(self, run: int, weights: dict[str, torch.Tensor], cfg: dict) -> None:
        """Also the threshold, when the export has one (a `jumprelu` export): continuing to train
        re-estimates it from the batches."""
        super().load_run(run, weights, cfg)
        if "threshold" in weights or cfg.get("architecture") == "jumprelu":
            self.threshold[run] = load_threshold(weights, self.threshold[run])
        self.threshold_batches[run] = 0

    # -- forward pieces ------------------------------------------------------------------------

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents (R, batch, d_sae) at inference: JumpReLU with the learnt threshold (each row on
        its own, whatever else is in the batch). Training's forward uses the batch top-k."""
        return jumprelu(self.pre_acts(x), self.threshold)

    # -- the threshold -------------------------------------------------------------------------

    @torch.no_grad()
    def batch_threshold(self, latents: torch.Tensor) -> torch.Tensor:
        """(R,) the threshold a training batch used: its smallest kept activation, or 0 when fewer
        than k*B pre-activations were positive (then every positive one was kept); NaN without any."""
        B = latents.shape[1]
        kept = latents > 0
        smallest = latents.masked_fill(~kept, float("inf")).amin(dim=(1, 2))
        smallest = torch.where(smallest.isinf(), torch.full_like(smallest, float("nan")), smallest)
        full = kept.sum(dim=(1, 2)) >= self.k * B
        return torch.where(full, smallest, torch.zeros_like(smallest))

    @torch.no_grad()
    def update_threshold(self, latents: torch.Tensor) -> None:
        """Move each run's threshold toward this batch's (`batch_threshold`): by 1 / (n + 1) for
        its first batches (a plain mean), then by threshold_lr. A run whose batch kept nothing
        (or went NaN) is left as it was. Call once per training step, after forward."""
        self._move_threshold(self.batch_threshold(latents))

    def _move_threshold(self, t_b: torch.Tensor) -> None:
        """`update_threshold` from the batch thresholds t_b (R,) themselves (in float32 whatever the
        latents' precision)."""
        t_b = t_b.to(self.threshold.dtype)
        ok = torch.isfinite(t_b)
        rate = torch.maximum(self.threshold_lr, 1.0 / (self.threshold_batches + 1).to(torch.float32))
        rate = torch.where(ok, rate, torch.zeros_like(rate)).unsqueeze(1)
        self.threshold.lerp_(torch.where(ok, t_b, torch.zeros_like(t_b)).unsqueeze(1).expand_as(self.threshold),
                             rate.to(self.threshold.dtype))
        self.threshold_batches += ok.to(torch.long)

    @torch.no_grad()
    def calibrate_threshold(self, batches: Iterable[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """Set each run's threshold from data, so that the inference L0 over these rows is k[r]:
        midway between the (k[r] * rows)-th and the next largest ReLU'd pre-activation of all of
        them (the batch threshold of one batch holding every row). Returns the thresholds (R,).
        Holds every pre-activation (R, rows, d_sae) in memory: pass a sample (tens of thousands of
        rows), not a split."""
        batches = [batches] if isinstance(batches, torch.Tensor) else list(batches)
        pre = torch.cat([self.pre_acts(x.to(self.W_enc.dtype)) for x in batches], dim=1).relu()
        R, n, d_sae = pre.shape
        flat = pre.reshape(R, -1)
        top = [flat[r].topk(min(int(self.k[r]) * n + 1, n * d_sae)).values for r in range(R)]
        t = torch.stack([v[-2:].mean() if len(v) > int(self.k[r]) * n else v[-1] for r, v in enumerate(top)])
        self.threshold.copy_(t.unsqueeze(1).expand_as(self.threshold))
        return t

    # -- the training step's forward -----------------------------------------------------------

    def batch_sizes(self, B: int) -> list[int]:
        """Entries each run keeps over a batch of B rows: k[r] * B (host ints, no device sync)."""
        return [k * B for k in self._k_host]

    @torch.no_grad()
    def select_codes(self, pre: torch.Tensor) -> tuple[BatchCodes, torch.Tensor | None]:
        """The batch-wide selection over `pre (R, B, d_sae)` (computed without autograd) as sparse
        codes of its positive entries, and the dense latents when the `select` hook gave them.

        The default hook is done without forming dense latents (`selection`); a swapped-in hook
        (data-parallel training: a threshold over every rank's rows) returns dense latents (the kept
        entries ReLU'd, zeros elsewhere) whose positive entries are the codes."""
        if self.select is not batch_topk_per_run:
            latents = self.select(pre, self.k, self.k_max)
            return codes_from_dense(latents), latents
        B = pre.shape[1]
        selection = self.selection
        if selection == "auto":
            selection = "threshold" if pre.device.type == "cpu" else "topk"
        if selection == "topk":
            return codes_from_topk(pre, self.k * B, self.k_max * B, ordered=len(set(self._k_host)) > 1), None
        flat, vals = self._selector(pre, self.batch_sizes(B))
        return codes_from_flat(flat, vals, tuple(pre.shape)), None

    def sparse_step(self, x: torch.Tensor, w: FusedWeights) -> tuple[torch.Tensor, BatchCodes, torch.Tensor | None,
                                                                      torch.Tensor]:
        """The fused step's selection: `(pre (R, B, d_sae) without a graph, codes, dense latents from a
        swapped-in hook or None, the kept pre-activations (nnz,) carrying the encoder's graph)`.

        Every pre-activation is needed only to choose the kept ones; the gradient reaches the encoder
        through those alone (`segment_pre_acts`), so there is no graph over (R, B, d_sae)."""
        with torch.no_grad():
            pre = self.pre_acts(x)
            codes, latents = self.select_codes(pre)
        return pre, codes, latents, segment_pre_acts(codes, x, w.W_enc, w.b_enc, self.input_bias)

    def step_outputs(self, codes: BatchCodes | None, latents: torch.Tensor) -> dict[str, torch.Tensor]:
        """What both paths add to a forward's output: `l0`, the logged `threshold`, the firing counts
        `fired` (R, d_sae) and the batch threshold `batch_threshold` (R, 1) that `after_step` moves the
        inference threshold with; from the sparse codes when there are any, else from dense latents."""
        B = latents.shape[1] if latents is not None else codes.shape[1]
        if codes is not None:
            fired, batch_threshold = codes.fired(self.W_dec.dtype), codes.batch_threshold(self.k * B)
        else:
            fired, batch_threshold = (latents > 0).sum(dim=1, dtype=self.W_dec.dtype), self.batch_threshold(latents)
        # batch_threshold is (R, 1), not (R,): the loop logs every (R,) output as a metric.
        return {"l0": fired.sum(dim=-1) / B, "threshold": self.threshold.mean(dim=-1), "fired": fired,
                "batch_threshold": batch_threshold.unsqueeze(1)}

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None) -> StepOutput:
        """Everything a training step needs, per run. `target`: what a transcoder reconstructs (None:
        x itself).

        Returns `loss`, `mse`, `aux_loss`, `l0`, `threshold` (each (R,); `threshold` is the
        inference threshold so far, logged), `recon` (R, batch, d_out), `fired` (R, d_sae) and
        `batch_threshold` (R, 1). loss = mse + aux_loss, with aux_loss = aux_k_coef * AuxK.
        Backpropagate `loss.sum()`."""
        self._check_input(x)
        target = x if target is None else target
        target = target if target.dim() == 3 else target.unsqueeze(0)
        if self.use_fused(x):
            w = self.fused_weights()
            pre, codes, latents, kept = self.sparse_step(x, w)
            R, B, _ = pre.shape
            recon = self.add_skip(segment_decode(kept, w.W_dec, codes).view(R, B, -1) + self.b_dec.unsqueeze(1), x)
            aux_x = x
        else:
            pre = self.pre_acts(x)
            codes, latents = None, self.select(pre, self.k, self.k_max)
            recon = self.decode(latents, x)
            aux_x = w = None
        residual = target - recon
        mse = residual.pow(2).sum(dim=-1).mean(dim=-1)
        loss, aux_loss = self.add_auxk(mse, pre, residual, aux_x, w)
        return {"loss": loss, "mse": mse, "aux_loss": aux_loss, **self.step_outputs(codes, latents), "recon": recon}
