"""Data-parallel training of one stack (`torchrun ... -m pipeline train --ddp`), with DDP's semantics.

Each rank steps the same stack on its own part of every global batch; the result is the stack a
single process would train on the whole global batch (up to float summation order):

- gradients are averaged over the ranks before the per-run clipping and Adam step (every loss is a
  mean over the batch, so the average of the ranks' means is the global mean's gradient);
- the first batch (b_dec, initial scale) is the gathered global batch, and rank 0's weights are
  broadcast after it, so every rank starts from the same weights;
- `after_step` (dead-latent counts, BatchTopK's threshold) and the loop's firing counts see the
  whole global batch: the forward's per-latent firing counts (R, d_sae) are summed over the ranks
  (no latents travel);
- BatchTopK's batch-wide selection keeps the top k * global batch pre-activations over all ranks:
  each rank contributes its local top k * global batch, the (k * global batch)-th largest of their
  union is the threshold every rank applies to its own rows;
- a run is frozen (NaN/Inf) when its loss failed on any rank.

torch's DistributedDataParallel is not used: it wraps one module with one optimizer, while here the
loop's per-run Adam and clipping (trainer.optim) need the averaged gradients themselves.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from pipeline.errors import PipelineError


class DataParallel:
    """The collectives a StackTrainer needs to train one stack over every rank of the process group."""

    def __init__(self) -> None:
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        self._threshold: torch.Tensor | None = None  # the last global batch-wide selection's (R,)

    def _gather(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts, dim=dim)

    def gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The global batch (rank 0's rows first) from each rank's (rows, d) part."""
        return self._gather(x, 0)

    @torch.no_grad()
    def broadcast_module(self, model: torch.nn.Module) -> None:
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0)

    @torch.no_grad()
    def any(self, flags: torch.Tensor) -> torch.Tensor:
        """Element-wise OR of a bool tensor over the ranks."""
        x = flags.to(torch.int32)
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
        return x.bool()

    @torch.no_grad()
    def average_grads(self, params) -> None:
        """One all-reduce of every gradient (flattened together), divided by the world size."""
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        at = 0
        for g in grads:
            g.copy_(flat[at:at + g.numel()].view_as(g))
            at += g.numel()

    def forward(self, model: torch.nn.Module, x: torch.Tensor, *target: torch.Tensor) -> dict[str, torch.Tensor]:
        """The model's forward on this rank's rows, its batch-wide selection (an architecture's `select`
        hook, if it has one) over all ranks."""
        if hasattr(model, "select"):
            model.select = self.batch_topk
        return model(x, *target)

    def batch_topk(self, pre: torch.Tensor, k: torch.Tensor, k_max: int) -> torch.Tensor:
        """`batch_topk_per_run` over the global batch: keep this rank's pre-activations (R, rows,
        d_sae) that are among the top k[r] * global rows of all ranks, ReLU'd, zeros elsewhere."""
        R, b, S = pre.shape
        B = b * self.world
        with torch.no_grad():
            # The global top k*B holds at most k*B entries of any one rank: those are all it sends.
            local = pre.detach().reshape(R, b * S).topk(min(k_max * B, b * S), dim=-1).values
            union = self._gather(local, 1)
            top = union.topk(k_max * B, dim=-1).values
            threshold = top.gather(1, (k * B - 1).view(R, 1)).view(R, 1, 1)
        self._threshold = threshold.view(R)
        return torch.where(pre >= threshold, pre.relu(), torch.zeros((), dtype=pre.dtype, device=pre.device))

    @torch.no_grad()
    def global_out(self, out: dict[str, torch.Tensor], rows: int) -> tuple[dict[str, torch.Tensor], int]:
        """The forward output as `after_step` and the firing counts see it: per-latent firing counts
        summed over the ranks, the global batch threshold, and the global row count."""
        g = dict(out)
        fired = out["fired"].clone()
        dist.all_reduce(fired)
        g["fired"] = fired
        if "batch_threshold" in out and self._threshold is not None:
            # Every rank kept its entries >= the global (k*B)-th largest value t: the smallest kept one
            # is t itself when it is positive, and when it is not, fewer than k*B were (then 0).
            g["batch_threshold"] = self._threshold.clamp(min=0).view(-1, 1)
        return g, rows * self.world

    @torch.no_grad()
    def mean_metrics(self, m: dict) -> dict:
        """Per-run float metrics averaged over the ranks (means over the global batch, for logging)."""
        keys = [k for k, v in m.items() if isinstance(v, list) and v and isinstance(v[0], float)]
        if not keys:
            return m
        t = torch.tensor([m[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(t)
        t /= self.world
        return {**m, **{k: row for k, row in zip(keys, t.tolist())}}


class RankBatches:
    """A rank's loader whose state is every rank's (gathered), so one checkpoint resumes them all."""

    def __init__(self, loader: Any):
        self.loader = loader
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def __iter__(self):
        return iter(self.loader)

    def state_dict(self) -> dict:
        from pipeline.distributed import all_gather

        return {"ranks": all_gather(self.loader.state_dict())}

    def load_state_dict(self, state: dict) -> None:
        ranks = state.get("ranks")
        if ranks is None or len(ranks) != self.world:
            n = len(ranks) if ranks is not None else 1
            raise PipelineError(f"the checkpoint was written by {n} data-parallel rank(s), this run has "
                                f"{self.world}; resume with the same world size")
        self.loader.load_state_dict(ranks[self.rank])


def data_parallel(ddp: bool, world: int) -> DataParallel | None:
    """The data-parallel helper of `pipeline train` under torchrun (None for one process)."""
    if world <= 1:
        return None
    if not ddp:
        raise PipelineError(f"pipeline train runs as {world} processes (torchrun) but without --ddp; pass --ddp "
                            "to train one SAE data-parallel, or use `pipeline sweep` to spread many SAEs over them")
    return DataParallel()


def loader_share(batch_size: int, tokens: int, ddp: DataParallel | None) -> dict:
    """ActivationLoader arguments for this rank's part of every global batch of `batch_size` rows.

    Every rank takes the same number of full batches (ceil(tokens / batch_size), epochs' short tails
    dropped): a rank with one step more or less would wait forever at the next all-reduce."""
    if ddp is None:
        return {"batch_size": batch_size, "tokens": tokens}
    if batch_size % ddp.world:
        raise PipelineError(f"--batch-size {batch_size} does not split over {ddp.world} ranks; "
                            f"use a multiple of {ddp.world}")
    local = batch_size // ddp.world
    steps = -(-tokens // batch_size)
    return {"batch_size": local, "tokens": steps * local, "rank": ddp.rank, "world_size": ddp.world,
            "drop_last": True}


def spread_stacks(stacks: list[list[int]], costs: list[float], world: int) -> list[list[list[int]]]:
    """Sweep-parallel: the stacks each rank trains, greedily balanced by cost (largest first, each to
    the least loaded rank; deterministic, so every rank computes the same split)."""
    load, out = [0.0] * world, [[] for _ in range(world)]
    for i in sorted(range(len(stacks)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        load[r] += costs[i]
        out[r].append(i)
    return [[stacks[i] for i in sorted(mine)] for mine in out]
