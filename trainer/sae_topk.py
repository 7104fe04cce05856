"""TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"), for a stack of R runs.

    latents = scatter(TopK_k(W_enc^T (x - b_dec) + b_enc)), ReLU'd
    recon   = W_dec^T latents + b_dec          (+ W_skip^T (x - b_in): a skip-transcoder)
    loss    = mse + aux_k_coef * auxk

Sparsity is set by k, so there is no L1 term; the AuxK loss revives dead latents by asking the
top-`aux_k` dead ones to reconstruct the residual the live ones left. Runs in one stack share d_in
and d_sae; k, aux_k, aux_k_coef, dead_tokens_threshold and the seed may differ per run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple
from typing import Sequence

import torch

from pipeline.errors import PipelineError
from pipeline.transfer import values_to_device
from trainer.kernels.chunks import counts
from trainer.kernels.sparse import given_pre_acts, shared_gather, sparse_decode, sparse_pre_acts
from trainer.lagged import LaggedRead
from trainer.registry import register_architecture
from trainer.stack import StackedSAE, StepOutput, per_run


@dataclass
class TopKConfig:
    """One TopK run."""

    d_in: int
    """Width of the activations read (and reconstructed)."""
    d_sae: int
    """Number of latents."""
    k: int
    """Latents kept per token."""
    aux_k: int | None = None
    """Dead latents used by the AuxK loss; None = d_in // 2 (Gao et al. App. B.1, as SAELens)."""
    aux_k_coef: float = 1 / 8
    """Weight of the AuxK loss (Gao et al. use 1/32; 1/8 leaves fewer dead latents at no cost in
    explained variance, BENCHMARKS.md "Ours with defaults against a tuned SAELens")."""
    dead_tokens_threshold: int | None = None
    """A latent that has not fired for this many tokens counts as dead (None: 10M, Gao et al.'s;
    `pipeline train` sets 1/40 of the run when that is less, `dead_tokens_threshold_for`)."""
    seed: int = 0
    """Seed of this run's initial weights."""
    dec_init_norm: float = 1.0
    """Norm of each decoder row at init (the decoder is kept unit-norm during training)."""
    d_out: int | None = None
    """Transcoder: width of the other hook it reconstructs (None: an SAE, reconstructing its input)."""
    initial_k: int | None = None
    """k annealing: start at this larger k and decrease linearly to k (None: no annealing)."""
    k_anneal_steps: int = 0
    """Steps over which k goes from initial_k to k."""
    skip: bool = False
    """Transcoder: add a linear skip path W_skip (d_in x d_out) from input to output (a skip-transcoder)."""

    def k_at(self, step: int) -> int:
        """k in use at `step` (annealed linearly from initial_k)."""
        if self.initial_k is None or self.k_anneal_steps <= 0 or step >= self.k_anneal_steps:
            return self.k
        return round(self.initial_k + (self.k - self.initial_k) * step / self.k_anneal_steps)

    def resolved_dead_tokens_threshold(self) -> int:
        """dead_tokens_threshold with its default filled in."""
        return DEAD_TOKENS_THRESHOLD if self.dead_tokens_threshold is None else self.dead_tokens_threshold

    def resolved_aux_k(self) -> int:
        """aux_k with its default filled in and capped at d_sae."""
        aux_k = self.d_in // 2 if self.aux_k is None else self.aux_k
        return max(1, min(aux_k, self.d_sae))


DEAD_TOKENS_THRESHOLD = 10_000_000
"""Gao et al.'s dead-latent window: a latent silent for this many tokens is dead."""


def dead_tokens_threshold_for(run_tokens: int) -> int:
    """The dead-latent window for a run of `run_tokens`: 1/40 of it, at most 10M. With 10M the AuxK
    loss never acts in a run shorter than that; at lr 3e-3 a window of 1/40 of the run left 0.2-0.4%
    of the latents dead after 1M tokens (10-18% with 10M) and 4-8% after 8M (10-17% with 1/10), at
    no cost in explained variance (BENCHMARKS.md, "Ours with defaults against a tuned SAELens")."""
    return max(1, min(DEAD_TOKENS_THRESHOLD, run_tokens // 40))


MARGIN_STEPS = (0, 1, 2, 4, 8)
"""The host's view of the dead latents counts, per run, those within this many steps of dead: a view
that is m steps old bounds the dead latents now by its count for the first margin >= m (a CPU's view
is never late: margin 0, the exact count)."""


def relu_first_k(vals: torch.Tensor, k: torch.Tensor | None) -> torch.Tensor:
    """`vals (R, batch, k_max)`, sorted descending per row: run r keeps its first k[r], ReLU'd, and
    zeroes the rest. `k` None: every run keeps all k_max (then `vals` need not be sorted)."""
    if k is None:
        return vals.relu()
    keep = torch.arange(vals.shape[-1], device=vals.device) < k.view(-1, 1, 1)  # (R, 1, k_max)
    return torch.where(keep, vals.relu(), torch.zeros((), dtype=vals.dtype, device=vals.device))


def topk_per_run(pre: torch.Tensor, k: torch.Tensor, k_max: int) -> torch.Tensor:
    """Keep the top `k[r]` entries of `pre (R, batch, d_sae)` per row, ReLU'd, zeros elsewhere.

    One `topk` with the stack's largest k serves every run: values come back sorted, so run r keeps
    the first k[r] of them and zeroes the rest. Its top-k[r] are exactly what a run alone would pick."""
    vals, idx = pre.topk(k_max, dim=-1, sorted=True)
    return torch.zeros_like(pre).scatter(-1, idx, relu_first_k(vals, k))


def first_true(mask: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions of the first `n` True entries of each row of `mask (R, S)`, in order, as `(idx (R, n),
    valid (R, n))`; rows with fewer are padded with position 0, not valid. Fixed-size: no host sync."""
    R, S = mask.shape
    rank = mask.cumsum(dim=1).sub_(1)
    slot = torch.where(mask & (rank < n), rank, torch.full_like(rank, n))  # n: a spare slot, dropped
    positions = torch.arange(S, device=mask.device).expand(R, S)
    idx = torch.zeros(R, n + 1, dtype=torch.long, device=mask.device).scatter_(1, slot, positions)[:, :n]
    valid = torch.arange(n, device=mask.device) < mask.sum(dim=1, keepdim=True)
    return idx, valid


class DeadLatents(NamedTuple):
    """AuxK's candidates in a fused step: the dead latents (at most n per run) and their weights."""

    ids: torch.Tensor
    """(R, n) latent ids, padded with 0 past a run's dead ones."""
    valid: torch.Tensor
    """(R, n) bool: which ids are dead latents."""
    n_dead: torch.Tensor
    """(R,) dead latents per run."""
    W_enc: torch.Tensor
    """(R, d_in, n) their encoder columns (gradient shared with W_enc's, `shared_gather`)."""
    b_enc: torch.Tensor
    """(R, n)"""
    W_dec: torch.Tensor
    """(R, n, d_out) their decoder rows."""


class FusedWeights(NamedTuple):
    """The weights a fused step uses: the parameters, or aliases of them that share their gradient with
    the dead latents' slices (`DeadLatents`), when AuxK takes part."""

    W_enc: torch.Tensor
    b_enc: torch.Tensor
    W_dec: torch.Tensor
    dead: DeadLatents | None


def bucket(n: int, limit: int) -> int:
    """`n` rounded up to a multiple of 16 (fewer distinct shapes for the allocator, aligned for the
    matrix units), at most `limit`."""
    return min(limit, max(16, -(-n // 16) * 16))


@register_architecture("topk")
class TopKSAE(StackedSAE):
    """A stack of R TopK SAEs of the same shape, trained on the same batches."""

    config_class = TopKConfig
    supports_transcoder = True
    # Gao et al. keep decoder rows unit-norm: the loop removes the gradient parallel to each row
    # before the optimiser step and renormalises after it (trainer.optim).
    unit_norm_decoder = True
    # The sparse step (trainer.kernels: the gradients touch the k kept entries only, O(B k d_in)
    # instead of three dense matmuls) on every device; its sparse parts compute in float32 under bf16.
    fused_on = frozenset({"cpu", "cuda"})
    fused_transcoder = True
    fused_matmuls = 1
    latent_major_encoder = True

    def __init__(self, cfgs: TopKConfig | Sequence[TopKConfig]):
        super().__init__(cfgs)
        R, d_sae = self.n_runs, self.d_sae
        for c in self.cfgs:
            if not 1 <= c.k <= d_sae:
                raise PipelineError(f"k = {c.k} must be between 1 and d_sae = {d_sae}")
            if c.initial_k is not None and not c.k <= c.initial_k <= d_sae:
                raise PipelineError(f"initial_k = {c.initial_k} must be between k = {c.k} and d_sae = {d_sae}")

        # Per-run hyper-parameters live in buffers: they move with .to(device) and are saved.
        self.register_buffer("k", per_run(self.cfgs, "k", torch.long))
        self.register_buffer("aux_k", torch.tensor([c.resolved_aux_k() for c in self.cfgs], dtype=torch.long))
        self.register_buffer("aux_k_coef", per_run(self.cfgs, "aux_k_coef", torch.float32))
        windows = [c.resolved_dead_tokens_threshold() for c in self.cfgs]
        self.register_buffer("dead_tokens_threshold", torch.tensor(windows, dtype=torch.long))
        # Tokens seen since each latent last fired, per run (updated by `update_dead`).
        self.register_buffer("tokens_since_fired", torch.zeros(R, d_sae, dtype=torch.long))
        # Python ints, so that forward never syncs with the device to find them.
        self._k_host = [c.k for c in self.cfgs]
        self.k_max = max(self._k_host)
        aux_ks = [c.resolved_aux_k() for c in self.cfgs]
        self.aux_k_max = max(aux_ks)
        self._aux_k_uniform = len(set(aux_ks)) == 1
        self._windows = windows
        # The host's view of the dead latents, a step or more late on a GPU (no sync): per run, the
        # largest tokens_since_fired and how many latents are within each of MARGIN_STEPS steps of
        # dead, pushed after every count (`_count_tokens`), stamped with the host's token count. A
        # latent can only be dead now if it was that close then: the AuxK loss is skipped when none
        # can be (it is exactly 0), and otherwise runs over that many candidates (`dead_bound`).
        self._dead_view = LaggedRead()
        self._tokens = 0
        self._step_tokens = 0
        self._dead_view.assume(0, [[0] * R] * (1 + len(MARGIN_STEPS)))  # a new stack: nothing unfired yet
        # Any other write to tokens_since_fired (a test, a load, .to()) makes that view unknown.
        self._counted_version = self.tokens_since_fired._version
        self.register_buffer("_no_aux", torch.zeros(R), persistent=False)
        self.register_load_state_dict_post_hook(lambda module, _keys: module.dead_counts_changed())

    def on_step(self, step: int, total_steps: int | None) -> None:
        """k annealing: the k each run uses at this step (host values, so no device sync)."""
        ks = [c.k_at(step) for c in self.cfgs]
        if ks != self._k_host:
            self.k.copy_(values_to_device(ks, self.k))
            self._k_host, self.k_max = ks, max(ks)

    def after_step(self, out: dict[str, torch.Tensor], n_tokens: int) -> None:
        self._count_tokens(out["fired"] > 0, n_tokens)

    def export_run(self, run: int) -> tuple[dict[str, torch.Tensor], dict]:
        weights, _ = super().export_run(run)
        # SAELens has no TopK transcoder: ours is "topk_transcoder" (docs/FORMAT.md).
        arch = self.transcoder_cfg("topk_transcoder") if self.is_transcoder else {"architecture": "topk"}
        return weights, {**arch, "k": self.cfgs[run].k, "rescale_acts_by_decoder_norm": False}

    # -- forward pieces ------------------------------------------------------------------------

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents (R, batch, d_sae): each run's top k[r] pre-activations, ReLU'd."""
        return topk_per_run(self.pre_acts(x), self.k, self.k_max)

    # -- dead latents and the AuxK loss --------------------------------------------------------

    def dead_mask(self) -> torch.Tensor:
        """(R, d_sae) bool: latents that have not fired for dead_tokens_threshold[r] tokens."""
        return self.tokens_since_fired >= self.dead_tokens_threshold.unsqueeze(1)

    @torch.no_grad()
    def update_dead(self, latents: torch.Tensor, n_tokens: int) -> None:
        """Count `n_tokens` more tokens for every latent, and restart the count of those that fired
        in `latents (R, batch, d_sae)`. Call once per training step, after forward."""
        self._count_tokens((latents > 0).any(dim=1), n_tokens)

    def _count_tokens(self, fired: torch.Tensor, n_tokens: int) -> None:
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired.masked_fill_(fired, 0)
        self._tokens += n_tokens
        self._step_tokens = n_tokens
        if self.tokens_since_fired._version != self._counted_version + 2:
            self._dead_view.forget()  # written since the last count: earlier views no longer hold
        self._counted_version = self.tokens_since_fired._version
        self._push_counts()

    def _push_counts(self) -> None:
        """Send the host this stack's dead-latent counts as they are now (`_dead_view`)."""
        since, window = self.tokens_since_fired, self.dead_tokens_threshold.unsqueeze(1)
        near = [(since >= window - m * self._step_tokens).sum(dim=1) for m in MARGIN_STEPS]
        self._dead_view.push(torch.stack([since.amax(dim=1), *near]), self._tokens)

    def _apply(self, fn, recurse: bool = True):
        written = self.tokens_since_fired._version != self._counted_version  # since the last count
        module = super()._apply(fn, recurse)
        # A move or cast (.to(device), .double()) keeps the counts: the host's view still holds, unless
        # they were written before it.
        if written:
            self._dead_view.forget()
        self._counted_version = self.tokens_since_fired._version
        return module

    def dead_counts_changed(self) -> None:
        """Call after setting `tokens_since_fired` other than by training (a load does): the host's
        view of the dead latents is then unknown until the next step's counts arrive (such a write
        is also noticed by itself, from the buffer's version counter)."""
        self._dead_view.forget()
        self._counted_version = self.tokens_since_fired._version

    def dead_bound(self) -> int | None:
        """A host bound on how many latents of any run are dead now (no device sync): 0 when none can
        be, None when unknown (no recent enough counts)."""
        if self.tokens_since_fired._version != self._counted_version:
            self.dead_counts_changed()
        for seen in (self._dead_view.latest(), None):
            if seen is None:
                # Nothing known (a load, a write to the counts: send them now), or the host ran more
                # than MARGIN_STEPS[-1] steps ahead of the device: wait for the newest count, the one
                # sync this takes, and only then. A resumed run then decides as the unbroken one did.
                if self._dead_view.latest() is None:
                    self._push_counts()
                seen = self._dead_view.wait()
                if seen is None:
                    return None
            stamp, counts = seen
            elapsed = self._tokens - stamp
            if all(m + elapsed < w for m, w in zip(counts[0].tolist(), self._windows)):
                return 0
            for margin, near in zip(MARGIN_STEPS, counts[1:]):
                if elapsed <= margin * self._step_tokens:
                    return int(near.max())
        return None

    def may_have_dead(self) -> bool:
        """False when no latent can be dead now (host bookkeeping, no device sync)."""
        return self.dead_bound() != 0

    def assume_dead_for_replay(self, fraction: float) -> None:
        """On the meta device (trainer.step_trace), where no count comes back: let the host see
        `fraction` of every run's latents dead (0: none near dead, AuxK skipped)."""
        R, S = self.n_runs, self.d_sae
        dead = round(fraction * S)
        seen = [[max(self._windows) if dead else 0] * R] + [[dead] * R] * len(MARGIN_STEPS)
        self._dead_view.assume(self._tokens, seen)

    def fused_weights(self) -> FusedWeights:
        """The weights of a fused step, with AuxK's candidates when any latent can be dead: every dead
        latent (as many as `dead_bound` allows: a fixed size, no sync) and its weights."""
        bound = self.dead_bound()
        if bound == 0:
            return FusedWeights(self.W_enc, self.b_enc, self.W_dec, None)
        R, d_in, S = self.W_enc.shape
        dead = self.dead_mask()
        ids, valid = first_true(dead, S if bound is None else bucket(bound, S))
        n = ids.shape[1]
        W_enc, W_enc_dead = shared_gather(self.W_enc, ids.unsqueeze(1).expand(R, d_in, n), 2)
        b_enc, b_enc_dead = shared_gather(self.b_enc, ids, 1)
        W_dec, W_dec_dead = shared_gather(self.W_dec, ids.unsqueeze(-1).expand(R, n, self.d_out), 1)
        return FusedWeights(W_enc, b_enc, W_dec, DeadLatents(ids, valid, dead.sum(dim=1), W_enc_dead, b_enc_dead,
                                                             W_dec_dead))

    def auxk_loss(self, pre: torch.Tensor, residual: torch.Tensor, x: torch.Tensor | None = None,
                  weights: FusedWeights | None = None) -> torch.Tensor | None:
        """Unweighted AuxK loss per run (R,): the top aux_k[r] dead latents (ReLU'd) reconstruct the
        detached residual x - recon through W_dec, without b_dec (Gao et al. App. A.2; b_dec is
        already in the residual). Scaled by min(1, n_dead / aux_k) as sparsify and SAELens do, so it
        fades in as latents die; exactly 0 for a run without dead latents, and None (no work queued)
        when the host knows that no run has any (`dead_bound`).

        `pre` carries the encoder's autograd graph (the plain path), or, computed without one, comes
        with the input `x` and the step's `weights` (the fused path): AuxK then works on the dead
        latents alone, densely, as they are few (`fused_weights`): their pre-activations gathered
        from `pre`, the top aux_k per token kept, and three small matmuls over them for the
        reconstruction and its gradients, which join the weights' own in place."""
        if x is None:
            if self.dead_bound() == 0:
                return None
            dead = self.dead_mask()
            n_dead = dead.sum(dim=1)  # (R,)
            with torch.no_grad():
                dead_pre = pre.masked_fill(~dead.unsqueeze(1), float("-inf"))  # live latents never chosen
                idx = dead_pre.topk(self.aux_k_max, dim=-1, sorted=True).indices
            vals = relu_first_k(pre.gather(-1, idx), torch.minimum(self.aux_k, n_dead))
            e_hat = torch.einsum("rbs,rsi->rbi", torch.zeros_like(pre).scatter(-1, idx, vals), self.W_dec)
        else:
            dead = weights.dead
            if dead is None:
                return None
            n_dead = dead.n_dead
            R, B, n = pre.shape[0], pre.shape[1], dead.ids.shape[1]
            with torch.no_grad():
                dead_pre = pre.gather(-1, dead.ids.unsqueeze(1).expand(R, B, n))
                dead_pre.masked_fill_(~dead.valid.unsqueeze(1), float("-inf"))
                A = min(self.aux_k_max, n)
                # Past a run's dead latents the values are -inf (never kept): with one aux_k for every
                # run, nothing else needs cutting, so the order is not needed either.
                ordered = not self._aux_k_uniform
                if A == n and not ordered:  # every candidate may be kept: nothing to select
                    keep = dead_pre > 0  # the ReLU (past the dead ones: -inf)
                else:
                    top, j = dead_pre.topk(A, dim=-1, sorted=ordered)
                    chosen = top > 0  # the ReLU
                    if ordered:
                        chosen &= torch.arange(A, device=top.device) < torch.minimum(self.aux_k, n_dead).view(R, 1, 1)
                    keep = torch.zeros_like(dead_pre, dtype=torch.bool).scatter_(-1, j, chosen)
                values = dead_pre.masked_fill(~keep, 0.0)
            acts = given_pre_acts(values, x, dead.W_enc, dead.b_enc, self.input_bias) * keep
            e_hat = torch.bmm(acts, dead.W_dec)
        scale = (n_dead.to(self.W_dec.dtype) / self.aux_k.to(self.W_dec.dtype)).clamp(max=1.0)
        return scale * (e_hat - residual.detach()).pow(2).sum(dim=-1).mean(dim=-1)

    def add_auxk(self, loss: torch.Tensor, pre: torch.Tensor, residual: torch.Tensor, x: torch.Tensor | None = None,
                 weights: FusedWeights | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`(loss + aux_loss, aux_loss)` with aux_loss = aux_k_coef * AuxK (`auxk_loss`'s arguments);
        when AuxK is skipped, `loss` itself and zeros, with no op queued."""
        aux = self.auxk_loss(pre, residual, x, weights)
        if aux is None:
            return loss, self._no_aux
        aux_loss = self.aux_k_coef * aux
        return loss + aux_loss, aux_loss

    # -- the training step's forward -----------------------------------------------------------

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None) -> StepOutput:
        """Everything a training step needs, per run. `target`: what a transcoder reconstructs
        (None: x itself).

        Returns `loss`, `mse`, `aux_loss`, `l0` (each (R,)), `recon` (R, batch, d_out), `fired`
        (R, d_sae): per latent, the tokens it is active on, and the sparse codes `latent_idx`
        (R, batch, k_max) with their activations `latent_vals` (detached; run r's entries past its
        own k are 0; `dense_latents` rebuilds the (R, batch, d_sae) latents). loss = mse + aux_loss,
        with aux_loss = aux_k_coef * AuxK. mse is the squared error summed over the width and
        averaged over the batch (SAELens's training MSE). Backpropagate `loss.sum()`: runs share no
        parameters, so each run's gradient is that of its own loss."""
        y = x if target is None else target
        y = y if y.dim() == 3 else y.unsqueeze(0)
        fused = self.use_fused(x)
        # Order matters only to stacks whose runs keep different k (each keeps its first k[r]).
        k = None if len(set(self._k_host)) == 1 else self.k
        if fused:
            # Every pre-activation is needed only to choose the top k (and the AuxK candidates); the
            # gradient flows through the chosen ones (trainer.kernels.sparse.sparse_pre_acts), so there is no
            # graph over (R, B, d_sae), and the decoder sums k rows per token (sparse_decode).
            w = self.fused_weights()
            with torch.no_grad():
                pre = self.pre_acts(x)
                top, idx = pre.topk(self.k_max, dim=-1, sorted=k is not None)
            vals = relu_first_k(sparse_pre_acts(top, idx, x, w.W_enc, w.b_enc, self.input_bias), k)
            recon = self.add_skip(sparse_decode(idx, vals, w.W_dec) + self.b_dec.unsqueeze(1), x)
        else:
            w = None
            pre = self.pre_acts(x)
            vals, idx = pre.topk(self.k_max, dim=-1, sorted=k is not None)
            vals = relu_first_k(vals, k)
            latents = torch.zeros_like(pre).scatter(-1, idx, vals)
            recon = self.decode(latents, x)
        residual = y - recon
        mse = residual.pow(2).sum(dim=-1).mean(dim=-1)
        loss, aux_loss = self.add_auxk(mse, pre, residual, x if fused else None, w)
        vals = vals.detach()
        active = (vals > 0).to(self.W_dec.dtype)
        R, S = self.n_runs, self.d_sae
        fired = counts((idx + torch.arange(R, device=idx.device).view(R, 1, 1) * S).view(-1), R * S,
                       active.view(-1)).view(R, S)
        return {"loss": loss, "mse": mse, "aux_loss": aux_loss, "l0": active.sum(dim=-1).mean(dim=-1),
                "recon": recon, "fired": fired, "latent_idx": idx, "latent_vals": vals}


def dense_latents(out: dict[str, torch.Tensor], d_sae: int) -> torch.Tensor:
    """The (R, batch, d_sae) latents of a TopK forward's output, from its sparse codes."""
    idx, vals = out["latent_idx"], out["latent_vals"]
    return vals.new_zeros(*idx.shape[:2], d_sae).scatter_(-1, idx, vals)
