"""The memory-mapped, shuffled activation loader: the hot path of every SAE training run.

Shuffling happens at two levels, both seeded and deterministic from (seed, epoch):
1. blocks: each shard is cut into blocks of `block_rows` consecutive rows; one permutation of all
   blocks of the split (across shards) orders the epoch; rank r of W takes every W-th block;
2. buffer: consecutive blocks fill a buffer of about `buffer_rows` rows, which is permuted; full
   batches are cut from it and the rows left over join the next buffer.

The plan (which rows make which batch) is computed from row counts alone, so a restored
`state_dict()` resumes at the exact batch: only the rows of the batches still to come are read.
Blocks are read with plain slices of memory-mapped shards (sequential I/O); the buffer is the only
anonymous memory the loader holds. A background thread prepares batches (pinned when the target is
a GPU) while the caller trains.
"""

from __future__ import annotations

import concurrent.futures
import math
import os
import queue
import threading
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from pipeline.backends import file_region
from pipeline.errors import CacheFormatError, PipelineError
from pipeline.integrity import ShardVerifier
from pipeline.manifest import MANIFEST_FILE

DEFAULT_BLOCK_ROWS = 64
DEFAULT_BUFFER_BATCHES = 16


def open_source(path: str | Path):
    """Our cache (a manifest.json), a SAELens `CacheActivationsRunner` cache, or a remote cache
    (`hf://datasets/ORG/NAME`: shards fetched on first use into a local mirror)."""
    if isinstance(path, str) and "://" in path and not path.startswith("file://"):
        from pipeline.hub_stream import open_remote_cache

        return open_remote_cache(path)
    path = Path(path)
    if (path / MANIFEST_FILE).is_file():
        from pipeline.reader import Cache

        return Cache(path)
    try:
        from pipeline.saelens_cache import SAELensCache, is_saelens_cache
    except ImportError:  # pragma: no cover - the module ships with the package
        is_saelens_cache = None
    if is_saelens_cache is not None and is_saelens_cache(path):
        return SAELensCache(path)
    raise CacheFormatError(
        f"{path} is neither an activation cache of ours (no {MANIFEST_FILE}) nor a SAELens activation cache; "
        "write one with `pipeline cache --out DIR`"
    )


@dataclass
class LoaderState:
    """Where the loader is: restoring it resumes at exactly the next batch."""

    epoch: int = 0
    batch: int = 0
    """Batches already yielded in this epoch."""
    tokens: int = 0
    """Rows yielded in total (all epochs)."""


def _stored_to_tensor(array: np.ndarray, stored: str) -> torch.Tensor:
    t = torch.from_numpy(array)
    return t.view(torch.bfloat16) if stored == "bfloat16" else t


class ActivationLoader:
    """Iterate shuffled batches of activation rows from a cache.

    `hooks`: None (the cache's hooks: a tensor if it has one, a dict if several), a hook name
    (tensor batches), or a list of names (dict hook -> tensor, rows aligned across hooks).
    Iterating yields one epoch (or, with `tokens`, epochs until that many rows).
    A batch is yielded only after every shard it reads has been verified against the manifest's
    checksums (pipeline.integrity); a bad shard stops the run, or is left out with `skip_bad_shards`.
    """

    def __init__(
        self,
        path: str | Path,
        hooks: str | list[str] | None = None,
        batch_size: int = 4096,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        split: str = "train",
        *,
        block_rows: int = DEFAULT_BLOCK_ROWS,
        buffer_rows: int | None = None,
        tokens: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        prefetch: int = 4,
        normalize: bool = False,
        drop_last: bool = False,
        skip_bad_shards: bool = False,
    ):
        self.source = open_source(path)
        self.path = Path(path)
        names = list(self.source.hooks) if hooks is None else ([hooks] if isinstance(hooks, str) else list(hooks))
        self.hooks = [self.source.check_hook(h) for h in names]
        self.single = isinstance(hooks, str) or (hooks is None and len(self.hooks) == 1)
        self.batch_size, self.seed, self.dtype = int(batch_size), int(seed), dtype
        self.device = torch.device(device)
        self.split, self.block_rows = split, int(block_rows)
        self.buffer_rows = int(buffer_rows or DEFAULT_BUFFER_BATCHES * self.batch_size)
        self.tokens, self.rank, self.world_size = tokens, int(rank), int(world_size)
        self.prefetch, self.drop_last = max(1, int(prefetch)), drop_last
        if not 0 <= self.rank < self.world_size:
            raise PipelineError(f"rank {rank} is outside world size {world_size}")
        if self.batch_size < 1 or self.block_rows < 1:
            raise PipelineError("batch_size and block_rows must be positive")
        shards = self.source.shards(split)
        self.shard_rows = [int(s["rows"]) for s in shards]
        # Checksums are checked in the background, ahead of the reads (guarantees: pipeline.integrity).
        self.verifier = ShardVerifier(self.source, split, self.hooks, order=lambda: (s for s, _, _ in self._blocks(0)))
        if skip_bad_shards:
            self.shard_rows = self.verifier.usable_rows(self.shard_rows)
        total = sum(self.shard_rows)
        if total == 0:
            raise PipelineError(f"the {split} split of {self.path} is empty")
        if self.batch_size > total // self.world_size:
            raise PipelineError(
                f"batch_size {self.batch_size} is larger than the {split} split "
                f"({total:,} rows{f' over {self.world_size} ranks' if self.world_size > 1 else ''}); "
                "use a smaller batch size"
            )
        # Open (and size-check) every shard now, so a truncated one is named before training starts.
        self._arrays = {h: [self.source.activations(h, split, i) for i in range(len(shards))] for h in self.hooks}
        self._stored = self.source.dtype
        self._threads = max(1, min(4, os.cpu_count() or 1))
        self._pool = concurrent.futures.ThreadPoolExecutor(self._threads, thread_name_prefix="loader-copy")
        self._regions = {h: [self._open_region(a) for a in arrs] for h, arrs in self._arrays.items()}
        if any(not isinstance(a, np.ndarray) for arrs in self._arrays.values() for a in arrs):
            warnings.warn(f"cache {self.path} is compressed: blocks are decoded by zarr, slower than "
                          "memory-mapped reads", stacklevel=2)
        self.scale = {h: 1.0 for h in self.hooks}
        """Per-hook factor applied to every row (normalisation), to be folded into exported SAEs."""
        if normalize:
            for h in self.hooks:
                mean_norm = self.source.hook_stats(h)["mean_norm"]
                self.scale[h] = math.sqrt(self.source.hooks[h]) / mean_norm
        self.state = LoaderState()

    @staticmethod
    def _open_region(array) -> tuple[int, int] | None:
        region = file_region(array)
        if region is None:
            return None
        return os.open(region[0], os.O_RDONLY), region[1]

    def close(self) -> None:
        """Release file descriptors and threads (also done when the loader is garbage collected)."""
        for regions in getattr(self, "_regions", {}).values():
            for r in regions:
                if r is not None:
                    os.close(r[0])
        self._regions = {}
        if hasattr(self, "verifier"):
            self.verifier.close()
        if hasattr(self, "_pool"):
            self._pool.shutdown(wait=False)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - at interpreter shutdown, modules may already be gone
            pass

    # ----------------------------------------------------------------------------- the plan

    def _blocks(self, epoch: int) -> list[tuple[int, int, int]]:
        """This rank's blocks (shard, start, stop) for an epoch, in shuffled order."""
        blocks = [(s, start, min(start + self.block_rows, n))
                  for s, n in enumerate(self.shard_rows) for start in range(0, n, self.block_rows)]
        order = np.random.default_rng([self.seed, epoch]).permutation(len(blocks))
        return [blocks[i] for i in order[self.rank::self.world_size]]

    def _plan(self, epoch: int) -> Iterator[tuple[list, np.ndarray, np.ndarray, int, list[int]]]:
        """Per buffer: (blocks, leftover row ids, permutation, number of its first batch, batch sizes).

        Row ids are (shard << 40) | row: the rows carried over from the previous buffer are named
        by id, so any buffer can be rebuilt without reading the ones before it.
        """
        blocks = self._blocks(epoch)
        per_buffer = max(1, math.ceil(self.buffer_rows / self.block_rows))
        leftover = np.zeros(0, dtype=np.int64)
        first = 0
        for c in range(0, len(blocks), per_buffer):
            chunk = blocks[c:c + per_buffer]
            n = len(leftover) + sum(stop - start for _, start, stop in chunk)
            perm = np.random.default_rng([self.seed, epoch, self.rank, c]).permutation(n)
            full = n // self.batch_size
            sizes = [self.batch_size] * full
            last = c + per_buffer >= len(blocks)
            if last and n % self.batch_size and not self.drop_last:
                sizes.append(n % self.batch_size)  # the epoch's tail: every row once
            yield chunk, leftover, perm, first, sizes
            first += len(sizes)
            if not last:
                ids = np.concatenate([leftover] + [(np.int64(s) << 40) + np.arange(start, stop, dtype=np.int64)
                                                   for s, start, stop in chunk])
                leftover = ids[perm[full * self.batch_size:]]

    def batches_per_epoch(self) -> int:
        return sum(len(sizes) for *_, sizes in self._plan(0))

    # ----------------------------------------------------------------------------- reading

    def _gather(self, hook: str, ids: np.ndarray) -> np.ndarray:
        """Rows by id, copied once from the memory-mapped shards into a new batch array.

        Ids are grouped by shard (a stable sort keeps the permuted order inside each shard), and
        the copies are split over a few threads (numpy releases the GIL while it copies).
        """
        arrays = self._arrays[hook]
        ids = ids[np.argsort(ids >> 40, kind="stable")]
        shard, row = ids >> 40, ids & ((1 << 40) - 1)
        out = np.empty((len(ids), self.source.hooks[hook]), dtype=_np_dtype(arrays[0]))
        bounds = np.flatnonzero(np.diff(shard)) + 1
        pieces = []
        step = max(256, -(-len(ids) // self._threads))
        for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(ids)]):
            pieces += [(int(shard[lo]), a, min(a + step, hi)) for a in range(lo, hi, step)]

        def copy(piece: tuple[int, int, int]) -> None:
            s, lo, hi = piece
            a = arrays[s]
            if isinstance(a, np.ndarray):
                np.take(a, row[lo:hi], axis=0, out=out[lo:hi])
            else:  # compressed zarr: decoded by zarr
                out[lo:hi] = a.get_orthogonal_selection((row[lo:hi], slice(None)))

        if len(pieces) == 1:
            copy(pieces[0])
        else:
            list(self._pool.map(copy, pieces))
        return out

    def _prefetch_blocks(self, chunk: list) -> None:
        """Ask the kernel to read the buffer's blocks ahead: sequential reads instead of page faults."""
        for hook in self.hooks:
            arrays = self._arrays[hook]
            for s, start, stop in chunk:
                region = self._regions[hook][s]
                if region is None:
                    continue
                fd, offset = region
                row_bytes = arrays[s].strides[0]
                os.posix_fadvise(fd, offset + start * row_bytes, (stop - start) * row_bytes, os.POSIX_FADV_WILLNEED)

    def _epoch_batches(self, epoch: int, skip: int) -> Iterator[dict[str, np.ndarray]]:
        """The epoch's batches after its first `skip` ones; skipped buffers are not read."""
        for chunk, leftover, perm, first, sizes in self._plan(epoch):
            if first + len(sizes) <= skip:
                continue
            self._prefetch_blocks(chunk)
            ids = np.concatenate([leftover] + [(np.int64(s) << 40) + np.arange(start, stop, dtype=np.int64)
                                               for s, start, stop in chunk])
            self.verifier.require(np.unique(ids >> 40))  # waits only for shards whose check is not done
            at = 0
            for k, size in enumerate(sizes):
                batch_ids = ids[perm[at:at + size]]
                at += size
                if first + k >= skip:
                    yield {h: self._gather(h, batch_ids) for h in self.hooks}

    # ----------------------------------------------------------------------------- iteration

    def _to_tensors(self, arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        out = {}
        for h, a in arrays.items():
            t = _stored_to_tensor(a, self._stored).to(self.dtype)
            if self.scale[h] != 1.0:
                t.mul_(self.scale[h])
            if self.device.type == "cuda":
                t = t.pin_memory()
            out[h] = t
        return out

    def _producer(self, q: queue.Queue, stop: threading.Event, state: LoaderState) -> None:
        try:
            epoch, skip, tokens = state.epoch, state.batch, state.tokens
            while not stop.is_set():
                for arrays in self._epoch_batches(epoch, skip):
                    if self.tokens is not None:
                        room = self.tokens - tokens
                        if room <= 0:
                            break
                        arrays = {h: a[:room] for h, a in arrays.items()}
                    tokens += len(next(iter(arrays.values())))
                    item = self._to_tensors(arrays)
                    while not stop.is_set():
                        try:
                            q.put(("batch", item), timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                q.put(("epoch_end", None))
                if self.tokens is None or tokens >= self.tokens:
                    break
                epoch, skip = epoch + 1, 0
            q.put(("done", None))
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            q.put(("error", e))

    def __iter__(self) -> Iterator[torch.Tensor | dict[str, torch.Tensor]]:
        if self.tokens is not None and self.state.tokens >= self.tokens:
            return
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        thread = threading.Thread(target=self._producer, args=(q, stop, LoaderState(**asdict(self.state))),
                                  name="activation-loader", daemon=True)
        thread.start()
        try:
            while True:
                kind, item = q.get()
                if kind == "error":
                    raise item
                if kind == "done":
                    return
                if kind == "epoch_end":
                    self.state = LoaderState(self.state.epoch + 1, 0, self.state.tokens)
                    if self.tokens is None:
                        return
                    continue
                batch = {h: t.to(self.device, non_blocking=True) for h, t in item.items()}
                self.state = LoaderState(self.state.epoch, self.state.batch + 1,
                                         self.state.tokens + len(next(iter(batch.values()))))
                yield batch[self.hooks[0]] if self.single else batch
        finally:
            stop.set()
            thread.join()

    def state_dict(self) -> dict:
        return {**asdict(self.state), "seed": self.seed, "batch_size": self.batch_size, "split": self.split,
                "rank": self.rank, "world_size": self.world_size, "block_rows": self.block_rows,
                "buffer_rows": self.buffer_rows}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "batch_size", "split", "rank", "world_size", "block_rows", "buffer_rows"):
            if key in state and state[key] != getattr(self, key):
                raise PipelineError(
                    f"loader state was saved with {key}={state[key]!r}, this loader has {getattr(self, key)!r}; "
                    "resume with the same loader settings"
                )
        self.state = LoaderState(int(state["epoch"]), int(state["batch"]), int(state["tokens"]))


def _np_dtype(array) -> np.dtype:
    return array.dtype if isinstance(array, np.ndarray) else np.dtype(array.dtype)
