"""The memory-mapped, shuffled activation loader: the hot path of every SAE training run.

Shuffling happens at two levels, both seeded and deterministic from (seed, epoch):
1. blocks: each shard is cut into blocks of `block_rows` consecutive rows; one permutation of all
   blocks of the split (across shards) orders the epoch; rank r of W takes every W-th block;
2. buffer: consecutive blocks fill a buffer of about `buffer_rows` rows, which is permuted; full
   batches are cut from it and the rows left over join the next buffer.

The plan (which rows make which batch) is computed from row counts alone, with numpy arrays (no
Python object per block, so a billion-row cache plans an epoch in a second), and a restored
`state_dict()` resumes at the exact batch: only the rows of the batches still to come are read.

The host does contiguous work only. A background thread copies each buffer's blocks (whole 64-row
slices of the memory-mapped shards, at memcpy speed, over several threads) in the cache's stored
dtype into one slot of a reused staging ring (pinned when the target is a GPU); the slot goes to
the device with a non-blocking copy on a side CUDA stream, ahead of its use; the row permutation,
the dtype cast and the normalisation are done on the device. A bf16 cache thus sends half the bytes
of an fp32 one, and the host never gathers single rows.

`resident="yes"` (or `"auto"` when it fits the memory budget) copies the split once to the device
(the GPU, or RAM on a CPU) in the stored dtype, and every epoch is served from there: the disk is
read once, whatever the number of epochs. Both modes give the same batches.
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
from pipeline.stored import TORCH_DTYPES, from_stored, stored_numpy
from pipeline.transfer import to_device

DEFAULT_BLOCK_ROWS = 64
DEFAULT_BUFFER_BATCHES = 16
RESIDENT = ("no", "yes", "auto")


def open_source(path: str | Path):
    """Our cache (a manifest.json), a SAELens `CacheActivationsRunner` cache, or a remote cache
    (`hf://datasets/ORG/NAME`: shards fetched on first use into a local mirror)."""
    if isinstance(path, str) and "://" in path and not path.startswith("file://"):
        from pipeline.hub.stream import open_remote_cache

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


@dataclass
class Buffer:
    """One buffer of an epoch's plan: its blocks (arrays of shard, start, stop), the number of rows
    carried over from the previous buffer, the permutation of all its rows (carried first), the
    number of its first batch in the epoch, its batch sizes, and the rows its full batches serve
    (the permutation's rows past them are carried into the next buffer)."""

    number: int
    shard: np.ndarray
    start: np.ndarray
    stop: np.ndarray
    carried: int
    perm: np.ndarray
    first: int
    sizes: list[int]
    full_rows: int


class ActivationLoader:
    """Iterate shuffled batches of activation rows from a cache.

    `hooks`: None (the cache's hooks: a tensor if it has one, a dict if several), a hook name
    (tensor batches), or a list of names (dict hook -> tensor, rows aligned across hooks).
    Iterating yields one epoch (or, with `tokens`, epochs until that many rows). `resident`:
    "no" (stream from disk), "yes" (copy the split to `device` once; refused, with the numbers, when
    it does not fit `resident_budget` bytes), "auto" (resident when it fits, else streamed).
    `resident_budget` defaults to half the device's free memory (RAM on a CPU).
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
        prefetch: int | None = None,
        normalize: bool = False,
        drop_last: bool = False,
        resident: str = "no",
        resident_budget: int | None = None,
        threads: int | None = None,
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
        # Buffers prepared ahead: on a GPU one more, so a host-to-device copy is always under way.
        self.prefetch = max(1, int(prefetch)) if prefetch is not None else (2 if self.device.type == "cuda" else 1)
        self.drop_last = drop_last
        if not 0 <= self.rank < self.world_size:
            raise PipelineError(f"rank {rank} is outside world size {world_size}")
        if self.batch_size < 1 or self.block_rows < 1:
            raise PipelineError("batch_size and block_rows must be positive")
        if resident not in RESIDENT:
            raise PipelineError(f"resident={resident!r}: use one of {', '.join(RESIDENT)}")
        shards = self.source.shards(split)
        self.shard_rows = np.array([int(s["rows"]) for s in shards], dtype=np.int64)
        # Checksums are checked in the background, ahead of the reads (guarantees: pipeline.integrity).
        # Leaving bad shards out changes the plan, which then waits for every check.
        self.verifier: ShardVerifier | None = None
        if skip_bad_shards:
            self.verifier = ShardVerifier(self.source, split, self.hooks)
            self.shard_rows = np.array(self.verifier.usable_rows(self.shard_rows.tolist()), dtype=np.int64)
        total = int(self.shard_rows.sum())
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
        self._stored_torch = TORCH_DTYPES[self._stored]
        self._threads = max(1, min(16, os.cpu_count() or 1) if threads is None else int(threads))
        self._pool = concurrent.futures.ThreadPoolExecutor(self._threads, thread_name_prefix="loader-copy")
        self._regions = {h: [self._open_region(a) for a in arrs] for h, arrs in self._arrays.items()}
        if any(not isinstance(a, np.ndarray) for arrs in self._arrays.values() for a in arrs):
            warnings.warn(f"cache {self.path} is compressed: blocks are decoded by zarr, slower than "
                          "memory-mapped reads", stacklevel=2)
        # Blocks of the split: shard s holds blocks [first_block[s], first_block[s + 1]).
        blocks = -(-self.shard_rows // self.block_rows)
        self._first_block = np.concatenate([[0], np.cumsum(blocks)])
        self._first_row = np.concatenate([[0], np.cumsum(self.shard_rows)])  # a row's id in the split
        if self.verifier is None:  # hashing follows the plan's first reads
            self.verifier = ShardVerifier(self.source, split, self.hooks, order=self._first_reads)
        self.scale = {h: 1.0 for h in self.hooks}
        """Per-hook factor applied to every row (normalisation), to be folded into exported SAEs."""
        if normalize:
            for h in self.hooks:
                mean_norm = self.source.hook_stats(h)["mean_norm"]
                self.scale[h] = math.sqrt(self.source.hooks[h]) / mean_norm
        self.state = LoaderState()
        self.resident_bytes = total * sum(self.source.hooks[h] for h in self.hooks) * self._stored_torch.itemsize
        self.resident = self._resident_mode(resident, resident_budget)
        self._resident: dict[str, torch.Tensor] | None = None

    @staticmethod
    def _open_region(array) -> tuple[int, int] | None:
        region = file_region(array)
        if region is None:
            return None
        return os.open(region[0], os.O_RDONLY), region[1]

    def _resident_mode(self, resident: str, budget: int | None) -> bool:
        """Whether the split is held on the device: "yes" when it fits the budget (else a PipelineError
        with the numbers), "auto" when it fits, "no" never."""
        if resident == "no":
            return False
        budget = default_resident_budget(self.device) if budget is None else int(budget)
        fits = self.resident_bytes <= budget
        if resident == "yes" and not fits:
            raise PipelineError(
                f"the {self.split} split of {self.path} ({', '.join(self.hooks)}) needs "
                f"{self.resident_bytes / 2**30:.2f} GiB on {self.device} in its stored dtype ({self._stored}); "
                f"the budget is {budget / 2**30:.2f} GiB; use --resident auto (streams when it does not fit) or no")
        return fits

    def close(self) -> None:
        """Release file descriptors, threads and a resident copy (also done when garbage collected)."""
        for regions in getattr(self, "_regions", {}).values():
            for r in regions:
                if r is not None:
                    os.close(r[0])
        self._regions = {}
        self._resident = None
        if getattr(self, "verifier", None) is not None:
            self.verifier.close()
        if hasattr(self, "_pool"):
            self._pool.shutdown(wait=False)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - at interpreter shutdown, modules may already be gone
            pass

    # ----------------------------------------------------------------------------- the plan

    def _order(self, epoch: int) -> np.ndarray:
        """This rank's blocks (global block ids) for an epoch, in shuffled order."""
        n = int(self._first_block[-1])
        order = np.random.default_rng([self.seed, epoch]).permutation(n)
        return order[self.rank::self.world_size]

    def _plan(self, epoch: int) -> Iterator[Buffer]:
        """The epoch's buffers in order (rows are never named here, only counted)."""
        order = self._order(epoch)
        per_buffer = max(1, math.ceil(self.buffer_rows / self.block_rows))
        carried, first = 0, 0
        for c in range(0, len(order), per_buffer):
            ids = order[c:c + per_buffer]
            shard = np.searchsorted(self._first_block, ids, side="right") - 1
            start = (ids - self._first_block[shard]) * self.block_rows
            stop = np.minimum(start + self.block_rows, self.shard_rows[shard])
            n = carried + int((stop - start).sum())
            perm = np.random.default_rng([self.seed, epoch, self.rank, c]).permutation(n)
            full = n // self.batch_size
            sizes = [self.batch_size] * full
            last = c + per_buffer >= len(order)
            if last and n % self.batch_size and not self.drop_last:
                sizes.append(n % self.batch_size)  # the epoch's tail: every row once
            yield Buffer(c // per_buffer, shard, start, stop, carried, perm, first, sizes, full * self.batch_size)
            first += len(sizes)
            carried = 0 if last else n - full * self.batch_size

    def _first_reads(self) -> np.ndarray:
        """Shard indexes in the order epoch 0's plan first reads them (the verifier's order)."""
        shards = np.searchsorted(self._first_block, self._order(0), side="right") - 1
        _, first = np.unique(shards, return_index=True)
        return shards[np.sort(first)]

    def batches_per_epoch(self) -> int:
        return sum(len(b.sizes) for b in self._plan(0))

    def _row_ids(self, buf: Buffer) -> np.ndarray:
        """Split-wide ids of the buffer's block rows, in buffer order (after the carried ones)."""
        lengths = buf.stop - buf.start
        offsets = np.repeat(self._first_row[buf.shard] + buf.start - np.cumsum(np.r_[0, lengths[:-1]]), lengths)
        return offsets + np.arange(int(lengths.sum()), dtype=np.int64)

    def _carried_ids(self, epoch: int, upto: int) -> np.ndarray:
        """Split-wide ids of the rows carried into buffer number `upto` (counted from 0) of an epoch,
        by replaying the plan's permutations (no reads): what a resumed run must read by id."""
        carried = np.zeros(0, dtype=np.int64)
        for i, buf in enumerate(self._plan(epoch)):
            if i == upto:
                return carried
            ids = np.concatenate([carried, self._row_ids(buf)])
            carried = ids[buf.perm[buf.full_rows:]]
        return carried

    # ----------------------------------------------------------------------------- reading

    def _locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard, row within the shard) of split-wide row ids."""
        shard = np.searchsorted(self._first_row, ids, side="right") - 1
        return shard, ids - self._first_row[shard]

    def _fill(self, hook: str, out: np.ndarray, buf: Buffer, carried_ids: np.ndarray | None) -> int:
        """Copy the buffer's rows of `hook` into `out` (the carried rows first when their ids are
        given, read by id: a resumed run), block by block; returns the rows written."""
        arrays = self._arrays[hook]
        at = 0
        if carried_ids is not None and len(carried_ids):
            shard, row = self._locate(carried_ids)
            self.verifier.require(np.unique(shard))
            for s in np.unique(shard):
                pick = np.flatnonzero(shard == s)
                out[at + pick] = _rows(arrays[s], row[pick])
            at += len(carried_ids)
        lengths = (buf.stop - buf.start).astype(np.int64)
        dest = at + np.concatenate([[0], np.cumsum(lengths)[:-1]])
        # Whole blocks (contiguous slices: memcpy speed), split over the copy threads.
        parts = np.array_split(np.arange(len(lengths)), min(self._threads, max(1, len(lengths) // 16)))

        def copy(part: np.ndarray) -> None:
            for i in part:
                a, lo, hi = arrays[buf.shard[i]], int(buf.start[i]), int(buf.stop[i])
                out[dest[i]:dest[i] + hi - lo] = a[lo:hi]

        list(self._pool.map(copy, parts)) if len(parts) > 1 else copy(parts[0])
        return at + int(lengths.sum())

    def _prefetch_blocks(self, buf: Buffer) -> None:
        """Ask the kernel to read the buffer's blocks ahead: sequential reads instead of page faults."""
        for hook in self.hooks:
            arrays = self._arrays[hook]
            for s, start, stop in zip(buf.shard.tolist(), buf.start.tolist(), buf.stop.tolist()):
                region = self._regions[hook][s]
                if region is None:
                    continue
                fd, offset = region
                row_bytes = arrays[s].strides[0]
                os.posix_fadvise(fd, offset + start * row_bytes, (stop - start) * row_bytes, os.POSIX_FADV_WILLNEED)

    def _make_resident(self) -> dict[str, torch.Tensor]:
        """The split of every hook on the device in its stored dtype, copied shard by shard."""
        if self._resident is None:
            self.verifier.require(np.flatnonzero(self.shard_rows))  # a skipped bad shard has 0 rows here
            out = {}
            for h in self.hooks:
                t = torch.empty(int(self._first_row[-1]), self.source.hooks[h], dtype=self._stored_torch,
                                device=self.device)
                for s, a in enumerate(self._arrays[h]):
                    lo, hi = int(self._first_row[s]), int(self._first_row[s + 1])
                    if hi == lo:
                        continue
                    t[lo:hi].copy_(from_stored(np.array(a[:]), self._stored))  # a copy: the map is read-only
                out[h] = t
            self._resident = out
        return self._resident

    # ----------------------------------------------------------------------------- iteration

    def _epochs(self, state: LoaderState) -> Iterator[tuple[int, Buffer, int, bool]]:
        """(epoch, buffer, batches of it to skip, whether its carried rows must be read by id) from
        `state` on; an epoch ends with (epoch, None, 0, False)."""
        epoch, skip = state.epoch, state.batch
        while True:
            first_buffer = True
            for buf in self._plan(epoch):
                if buf.first + len(buf.sizes) <= skip:
                    continue
                yield epoch, buf, max(0, skip - buf.first), first_buffer and buf.carried > 0
                first_buffer = False
            yield epoch, None, 0, False
            epoch, skip = epoch + 1, 0

    def _producer(self, ready: queue.Queue, free: queue.Queue, stop: threading.Event, state: LoaderState) -> None:
        """Fills staging slots with each buffer's rows (host memcpy only) until stopped."""
        try:
            for epoch, buf, skip, by_id in self._epochs(state):
                if buf is None:
                    ready.put(("epoch_end", epoch, None, None))
                    continue
                carried = self._carried_ids(epoch, buf.number) if by_id else None
                while True:
                    try:
                        slot, event = free.get(timeout=0.1)
                        break
                    except queue.Empty:
                        if stop.is_set():
                            return
                if stop.is_set():
                    return
                if event is not None:
                    event.synchronize()  # its last host-to-device copy is done: the slot may be refilled
                self._prefetch_blocks(buf)
                self.verifier.require(np.unique(buf.shard))  # waits only for shards whose check is not done
                n = {h: self._fill(h, self._slot_arrays[slot][h][self.batch_size:], buf, carried) for h in self.hooks}
                ready.put(("buffer", epoch, buf, (slot, skip, next(iter(n.values())), carried is not None)))
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            ready.put(("error", 0, None, e))

    def _staging(self) -> None:
        """The staging ring: `prefetch + 1` slots, pinned when the target is a GPU (a pageable copy
        would first be staged by the driver). A slot holds a buffer's new rows after `batch_size` rows
        of head room, where a CPU consumer puts the rows carried from the previous buffer (fewer
        than a batch): the buffer is then one contiguous view, with no copy of its new rows."""
        buffer = max(1, math.ceil(self.buffer_rows / self.block_rows)) * self.block_rows
        rows = self.batch_size + buffer + self.batch_size
        pin = self.device.type == "cuda"
        self._slots = [{h: torch.empty(rows, self.source.hooks[h], dtype=self._stored_torch, pin_memory=pin)
                        for h in self.hooks} for _ in range(self.prefetch + 1)]
        self._slot_arrays = [{h: stored_numpy(t, self._stored) for h, t in slot.items()} for slot in self._slots]

    def _send(self, slot: int, n: int) -> tuple[dict[str, torch.Tensor], torch.cuda.Event | None]:
        """A filled slot's n new rows where the batches are gathered, and the event after which the
        slot may be refilled. On a GPU: copied on the side stream (the compute stream will wait for the
        copy on the device; the host does not). On a CPU: the slot itself (None: it is free once its
        buffer has been served)."""
        head = self.batch_size  # the slot's head room (`_staging`)
        if self.device.type != "cuda":
            return {h: t[head:head + n] for h, t in self._slots[slot].items()}, None
        with torch.cuda.stream(self._side):
            data = {h: t[head:head + n].to(self.device, non_blocking=True) for h, t in self._slots[slot].items()}
            event = torch.cuda.Event()
            event.record(self._side)
        return data, event

    def _with_carried(self, slot: int, new: dict[str, torch.Tensor], event: torch.cuda.Event | None,
                      carried: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """A buffer's rows: the rows carried from the previous buffer, then its new ones."""
        if self.device.type != "cuda":
            # In the slot's head room, just before its new rows: one view, no copy of the buffer.
            head = self.batch_size
            c = 0 if carried is None else len(next(iter(carried.values())))
            out = {}
            for h, t in self._slots[slot].items():
                if c:
                    t[head - c:head].copy_(carried[h])
                out[h] = t[head - c:head + len(new[h])]
            return out
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(event)  # on the device: the host does not wait
        for t in new.values():
            t.record_stream(compute)
        if carried is None:
            return new
        return {h: torch.cat([carried[h], new[h]]) for h in self.hooks}  # on the device: ~50 us per 100 MB

    def _serve(self, rows: dict[str, torch.Tensor], order: torch.Tensor, sizes: list[int], skip: int
               ) -> Iterator[dict[str, torch.Tensor]]:
        """Batches of `sizes` (after the first `skip`) of the rows at `order` (a device index), cast
        and scaled on the device."""
        at = sum(sizes[:skip])
        for size in sizes[skip:]:
            idx = order[at:at + size]
            at += size
            batch = {}
            for h, t in rows.items():
                b = t.index_select(0, idx).to(self.dtype)
                batch[h] = b.mul_(self.scale[h]) if self.scale[h] != 1.0 else b
            yield batch

    def _buffers(self, state: LoaderState) -> Iterator[tuple[str, Buffer | None, int, tuple | None]]:
        """("buffer", buf, skip, (rows, order)) per buffer: its batches are `rows` at `order`, a device
        index; ("epoch_end", None, 0, None) between epochs. Streamed (the buffer's rows on the device,
        carried rows first) or from a resident copy (the split, indexed by row id)."""
        if self.resident:
            resident = self._make_resident()
            carried_ids = np.zeros(0, dtype=np.int64)
            for epoch, buf, skip, by_id in self._epochs(state):
                if buf is None:
                    carried_ids = np.zeros(0, dtype=np.int64)
                    yield "epoch_end", None, 0, None
                    continue
                if by_id:
                    carried_ids = self._carried_ids(epoch, buf.number)
                ids = np.concatenate([carried_ids, self._row_ids(buf)])
                ordered = ids[buf.perm]
                carried_ids = ordered[buf.full_rows:]
                yield "buffer", buf, skip, (resident, to_device(torch.from_numpy(ordered), self.device))
            return
        if self.device.type == "cuda":
            self._side = torch.cuda.Stream(self.device)
        self._staging()
        ready: queue.Queue = queue.Queue()
        free: queue.Queue = queue.Queue()
        for slot in range(len(self._slots)):
            free.put((slot, None))
        stop = threading.Event()
        thread = threading.Thread(target=self._producer, args=(ready, free, stop, state), name="activation-loader",
                                  daemon=True)
        thread.start()
        carried: dict[str, torch.Tensor] | None = None
        ahead: list[tuple] = []  # the next buffer, its copy to the device already under way

        def sent(entry: tuple) -> tuple:
            """A ready-queue entry as (kind, buffer, item), a buffer's rows sent to the device."""
            kind, _, buf, item = entry
            if kind == "buffer":
                slot, skip, n, by_id = item
                new, event = self._send(slot, n)
                if event is not None:  # on a GPU the slot is free once its copy is done (the producer waits)
                    free.put((slot, event))
                item = (slot, skip, by_id, new, event)
            return kind, buf, item

        try:
            while True:
                kind, buf, item = ahead.pop() if ahead else sent(ready.get())
                if kind == "error":
                    raise item
                if kind == "epoch_end":
                    carried = None
                    yield "epoch_end", None, 0, None
                    continue
                slot, skip, by_id, new, event = item
                # Send the next buffer now, so that its copy to a GPU overlaps this buffer's steps (on
                # a CPU it is only taken early, the same code path).
                try:
                    ahead.append(sent(ready.get_nowait()))
                except queue.Empty:
                    pass
                data = self._with_carried(slot, new, event, None if by_id else carried)
                perm = to_device(torch.from_numpy(buf.perm), self.device)
                # The rows left over for the next buffer, copied now: the slot will be refilled.
                carried = {h: t.index_select(0, perm[buf.full_rows:]) for h, t in data.items()}
                yield "buffer", buf, skip, (data, perm)
                if event is None:  # on a CPU the slot was the data: free once the buffer has been served
                    free.put((slot, None))
        finally:
            stop.set()
            thread.join()

    def __iter__(self) -> Iterator[torch.Tensor | dict[str, torch.Tensor]]:
        if self.tokens is not None and self.state.tokens >= self.tokens:
            return
        buffers = self._buffers(LoaderState(**asdict(self.state)))
        try:
            for kind, buf, skip, data in buffers:
                if kind == "epoch_end":
                    self.state = LoaderState(self.state.epoch + 1, 0, self.state.tokens)
                    if self.tokens is None:
                        return
                    continue
                for batch in self._serve(*data, buf.sizes, skip):
                    if self.tokens is not None:
                        room = self.tokens - self.state.tokens
                        if room <= 0:
                            return
                        batch = {h: t[:room] for h, t in batch.items()}
                    rows = len(next(iter(batch.values())))
                    self.state = LoaderState(self.state.epoch, self.state.batch + 1, self.state.tokens + rows)
                    yield batch[self.hooks[0]] if self.single else batch
                if self.tokens is not None and self.state.tokens >= self.tokens:
                    return
        finally:
            buffers.close()

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


def default_resident_budget(device: torch.device) -> int:
    """Half the device's free memory: a GPU's (`cuda.mem_get_info`), or the host's available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 2
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024 // 2
    except (OSError, KeyError, ValueError):
        return 0


def _rows(array, rows: np.ndarray) -> np.ndarray:
    """Rows by index from a shard array (memory-mapped, or a compressed zarr array)."""
    if isinstance(array, np.ndarray):
        return np.take(array, rows, axis=0)
    return array.get_orthogonal_selection((rows, slice(None)))

