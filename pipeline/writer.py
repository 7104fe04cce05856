"""The cache writer API: any iterator of activation blocks in, a committed, checksummed cache out.

Producers (a language model, synthetic data, another model) hand `ActivationBlock`s to
`CacheWriter.put`; a background thread converts, checks, shuffles and commits them in shards, so
the producer never waits on the disk unless the bounded queue is full.

Commit protocol (why a crash never leaves a claimed shard missing): all files of a shard group are
written under `*.tmp` names and fsynced, renamed, and only then is the manifest replaced
atomically. Anything on disk that the manifest does not list is removed on resume.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import errno
import os
import queue
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from pipeline.backends import (
    TMP_SUFFIX, check_backend, files_of_entry, fsync_entry, read_table, remove_entry, shard_entry_name,
    stage_table, write_table_index,
)
from pipeline.config import check_sizes
from pipeline.errors import CacheWriteError, PipelineError
from pipeline.integrity import file_checksum
from pipeline.lock import holds_nothing
from pipeline.manifest import (
    DTYPES, MANIFEST_FILE, SPLITS, config_differences, fsync_dir, new_manifest, read_manifest,
    write_manifest,
)
from pipeline.stats import accumulate_stats, merge_stats, new_block_stats
from pipeline.stored import ITEMSIZE, TORCH_DTYPES, from_stored, nonfinite_error, stored_numpy, to_stored

TOKEN_COLUMNS = ("token_id", "sequence", "position")
PARTS_DIR = "ranks"  # per-rank manifests of a cache written by several processes


@dataclass
class ActivationBlock:
    """Rows of activations from one source step, for one split. Row i of every hook is the same token."""

    acts: dict[str, Any]
    """hook name -> (rows, d) tensor or array."""
    split: str = "train"
    """'train' or 'eval'."""
    token_ids: Any = None
    """(rows,) token id of each row, or None for sources without tokens."""
    sequence: Any = None
    """(rows,) index of each row's context in `sequences` (local to this block)."""
    position: Any = None
    """(rows,) position of each row inside its context."""
    sequences: Any = None
    """(n_sequences, context_size) token ids of the whole contexts the rows come from."""
    units: int | None = None
    """Source units this block consumed (for resume); defaults to n_sequences, else rows."""
    device_stats: dict | None = None
    """Set by the writer for GPU blocks: hook -> [rows, sum_norm, sum_sq_norm, non-finite, max |x|, sum...]."""

    @property
    def rows(self) -> int:
        return int(next(iter(self.acts.values())).shape[0])


@dataclass
class WriterConfig:
    """How a cache is laid out on disk; part of the config a resume must match."""

    format: str = "zarr"
    """Backend: 'zarr' (Zarr v3) or 'arrow' (datasets save_to_disk directories)."""
    dtype: str = "float32"
    """Stored dtype: float32, float16 or bfloat16 (stored as uint16 bit patterns)."""
    compression: str | None = None
    """Zarr only: None (memory-mappable), 'zstd' or 'blosc'."""
    shard_mb: float = 256.0
    """Target size of one hook's shard in MiB (a shard group is cut at a step boundary past it)."""
    shuffle: bool = True
    """Permute the rows of each shard (seeded) before committing, so the cache on disk is mixed."""
    seed: int = 0
    """Seed of the on-disk shuffle."""
    queue_blocks: int = 8
    """Blocks the producer may run ahead of the disk."""

    def __post_init__(self) -> None:
        check_sizes(self, positive=("shard_mb", "queue_blocks"))

    def layout(self) -> dict:
        return {"format": self.format, "dtype": self.dtype, "compression": self.compression,
                "shard_mb": self.shard_mb, "shuffle": self.shuffle, "seed": self.seed}


@dataclass
class _Pending:
    acts: dict[str, list[np.ndarray]] = field(default_factory=dict)
    tokens: list[np.ndarray] = field(default_factory=list)
    sequences: list[np.ndarray] = field(default_factory=list)
    n_sequences: int = 0
    rows: int = 0
    stats: dict[str, dict] = field(default_factory=dict)


def estimate_bytes(rows: int, hooks: dict[str, int], dtype: str, has_tokens: bool, context_size: int | None) -> int:
    per_row = sum(hooks.values()) * ITEMSIZE[dtype] + (12 if has_tokens else 0)
    sequences = (rows // context_size + 1) * context_size * 4 if (has_tokens and context_size) else 0
    return rows * per_row + sequences


def check_disk_space(path: Path, needed: int, freed: int = 0) -> tuple[int, int]:
    """Refuse before writing when the disk cannot hold the cache (5% margin); `freed`: bytes the
    write deletes first (the cache an --overwrite replaces). Returns (bytes needed, bytes free)."""
    probe = path if path.exists() else path.parent
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free + freed
    if needed * 1.05 > free:
        raise CacheWriteError(
            f"not enough disk space for the cache in {path}: it needs ~{needed / 2**30:.2f} GiB, "
            f"{free / 2**30:.2f} GiB are free; free space, choose another --out, or cache fewer --tokens"
        )
    return needed, free


class CacheWriter:
    """Writes activation blocks into a cache directory; resumable and crash-safe.

    Use `resume_units` to skip what a resumed cache already holds, `put(...)` each step's blocks,
    and `close(complete=True)` at the end (or `abort()` on failure: committed shards stay).
    """

    def __init__(
        self,
        path: str | Path,
        hooks: dict[str, int],
        config: WriterConfig | None = None,
        *,
        source_config: dict | None = None,
        provenance: dict | None = None,
        has_tokens: bool = False,
        resume: bool = False,
        overwrite: bool = False,
        expected_rows: int | None = None,
        part: tuple[int, int] | None = None,
        on_commit: Callable[[dict], None] | None = None,
    ):
        self.path = Path(path)
        # Called with the manifest after every commit (on the fsync thread): e.g. a Hub upload of
        # the shards it lists (pipeline.hub.HubUploader); an exception fails the writer.
        self._on_commit = on_commit
        # A part (rank, world size) of a cache written by several processes (pipeline.assemble): its
        # shards carry the rank as a prefix, its manifest lives in ranks/rank-NNNNN/ and only rank 0
        # writes the cache's own manifest, after every rank has closed.
        self.part = part
        self.manifest_dir = self.path if part is None else part_dir(self.path, part[0])
        self.shard_prefix = "" if part is None else f"rank{part[0]:05d}-"
        self.config = config or WriterConfig()
        self.hooks = dict(hooks)
        if not self.hooks:
            raise PipelineError("no hooks to write; name at least one hook")
        if self.config.dtype not in DTYPES:
            raise PipelineError(f"unknown dtype {self.config.dtype!r}; use one of: {', '.join(DTYPES)}")
        check_backend(self.config.format, self.config.compression)
        self.has_tokens = has_tokens
        provenance = dict(provenance or {})
        if has_tokens and not provenance.get("context_size"):
            raise PipelineError("a cache that stores tokens needs provenance['context_size'] (the sequences' length)")
        content_config = {"layout": self.config.layout(), "hooks": self.hooks, "has_tokens": has_tokens,
                          "source": source_config or {}}
        self._space_needed = (expected_rows, provenance.get("context_size"))
        self.disk_plan: tuple[int, int] | None = None
        """(bytes still to write, bytes free on the disk), checked before the first write (None: no estimate)."""
        try:
            self.manifest = self._open(content_config, provenance, resume, overwrite)
        except OSError as e:  # a read-only cache or mount, permissions: one line, not a traceback
            where = f" ({e.filename})" if e.filename else ""
            raise CacheWriteError(
                f"cannot {'resume' if resume else 'write'} the cache in {self.path}: {e.strerror or e}{where}; "
                "the cache directory must be writable and have room: check its permissions, mount and free "
                "space, or choose another --out"
            ) from None
        self.resume_units = self.manifest["progress"]["units"]
        row_bytes = sum(self.hooks.values()) * ITEMSIZE[self.config.dtype] / len(self.hooks)
        self.shard_rows = max(1, int(self.config.shard_mb * 2**20 / row_bytes))
        self.seconds: collections.Counter = collections.Counter()
        """Busy seconds per stage ('convert', 'commit', 'wait' = producer blocked on a full queue)."""
        self._queue: queue.Queue = queue.Queue(maxsize=self.config.queue_blocks)
        self._commits: queue.Queue = queue.Queue(maxsize=1)  # one group in flight: memory <= 2 groups
        self._durable: queue.Queue = queue.Queue(maxsize=1)
        self._buffers: dict[str, np.ndarray] = {}  # the committer's reused shard buffers
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1))
        m = self.manifest
        self._next = {  # the committer's view: where the next group goes (ahead of the manifest)
            "group": m["progress"]["groups"], "units": m["progress"]["units"],
            "shards": {s: len(m["splits"][s]["shards"]) for s in SPLITS},
            "sequences": {s: m["splits"][s]["sequences"] for s in SPLITS},
        }
        self._error: BaseException | None = None
        self._stats_before_last: dict | None = None  # hook statistics before the last committed group
        self._side_stream = None  # a CUDA stream for conversion, statistics and device-to-host copies
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="cache-writer", daemon=True)
        self._committer = threading.Thread(target=self._commit_loop, name="cache-committer", daemon=True)
        self._syncer = threading.Thread(target=self._durable_loop, name="cache-fsync", daemon=True)
        self._thread.start()
        self._committer.start()
        self._syncer.start()

    # ------------------------------------------------------------------------- opening / resume

    def _open(self, content_config: dict, provenance: dict, resume: bool, overwrite: bool) -> dict:
        path = self.manifest_dir
        if self.part is not None and not (path / MANIFEST_FILE).exists():
            pass  # a rank's first run: rank 0 has already checked, wiped or created the cache directory
        elif (path / MANIFEST_FILE).exists():
            if overwrite and self.part is None:
                old = read_manifest(path)
                self._check_space(None, freed=sum(f["bytes"] for info in old["splits"].values()
                                                  for sh in info["shards"] for f in sh["files"].values()))
                self._wipe()
            elif resume:
                if self.part is None and (self.path / PARTS_DIR).is_dir():
                    raise PipelineError(
                        f"{self.path} was written by several processes; resume it with torchrun and the same "
                        "--nproc-per-node (and --nnodes)"
                    )
                manifest = read_manifest(path)
                if manifest.get("partial"):
                    raise PipelineError(
                        f"cannot resume {path}: it is a partial pull of "
                        f"{manifest['partial'].get('repo', 'a Hub cache')} "
                        "(some hooks, splits or shards only); pull it whole (pipeline pull without --hook/--split/"
                        "--shards) or write a new cache"
                    )
                diffs = config_differences(manifest["config"], content_config)
                if diffs:
                    raise PipelineError(
                        f"cannot resume {path}: its config differs ({'; '.join(diffs)}); "
                        "resume with the cache's settings or use --overwrite"
                    )
                self._check_space(manifest)
                self._drop_uncommitted(manifest)
                if manifest["progress"]["final_partial"]:
                    self._drop_last_group(manifest)
                manifest["complete"] = False
                write_manifest(path, manifest)
                return manifest
            elif self.part is not None:  # overwrite: rank 0 wiped the cache, this part is stale
                pass
            else:
                manifest = read_manifest(path)
                rows = sum(s["rows"] for s in manifest["splits"].values())
                raise PipelineError(
                    f"{path} already holds a cache ({rows} rows); pass --resume to continue or extend it, "
                    "or --overwrite to replace it"
                )
        elif not holds_nothing(path):
            raise PipelineError(
                f"{path} is not empty and holds no cache; choose a new or empty directory for --out"
            )
        self._check_space(None)
        path.mkdir(parents=True, exist_ok=True)
        self.path.mkdir(parents=True, exist_ok=True)
        manifest = new_manifest(
            backend=self.config.format, dtype=self.config.dtype, hooks=self.hooks, config=content_config,
            provenance=provenance, compression=self.config.compression, has_tokens=self.has_tokens,
        )
        write_manifest(path, manifest)
        return manifest

    def _check_space(self, manifest: dict | None, freed: int = 0) -> None:
        """Before the first write: refuse when the disk cannot hold the rows still to write."""
        expected_rows, context_size = self._space_needed
        if expected_rows is None:
            return
        done = sum(s["rows"] for s in manifest["splits"].values()) if manifest else 0
        self.disk_plan = check_disk_space(self.path, estimate_bytes(max(0, expected_rows - done), self.hooks,
                                                                    self.config.dtype, self.has_tokens, context_size),
                                          freed)

    def _wipe(self) -> None:
        wipe_cache(self.path)

    def _tables(self, split: str) -> list[str]:
        tables = [f"hooks/{h}/{split}" for h in self.hooks]
        if self.has_tokens:
            tables += [f"tokens/{split}/rows", f"tokens/{split}/sequences"]
        return tables

    def _drop_uncommitted(self, manifest: dict) -> None:
        """Remove temporary files and shards the manifest does not claim (a crash mid-commit)."""
        for split in SPLITS:
            claimed = {shard_entry_name(self.config.format, s["name"]) for s in manifest["splits"][split]["shards"]}
            for table in self._tables(split):
                directory = self.path / table
                if not directory.is_dir():
                    continue
                for entry in directory.iterdir():
                    if not entry.name.startswith(self.shard_prefix):
                        continue  # another rank's shard (a part only ever cleans up its own)
                    is_index = entry.name in ("state.json", "dataset_info.json")
                    if entry.name.endswith(TMP_SUFFIX) or (not is_index and entry.name not in claimed):
                        remove_entry(entry)
            self._rewrite_indexes(manifest, split)

    def _drop_last_group(self, manifest: dict) -> None:
        """Undo the final partial shard group, so an extended cache equals one written straight through."""
        group = manifest["progress"]["groups"] - 1
        before = manifest["progress"].pop("stats_before_final", None)
        if before is not None:
            for hook, stats in before.items():
                manifest["hooks"][hook]["stats"] = stats
        for split in SPLITS:
            info = manifest["splits"][split]
            while info["shards"] and info["shards"][-1]["group"] == group:
                shard = info["shards"].pop()
                info["rows"] -= shard["rows"]
                info["sequences"] -= shard["sequences"]
                manifest["progress"]["units"] = shard["units_start"]
                if split == "train" and before is None:  # a cache of an earlier version: take them back out
                    for hook in self.hooks:
                        stored = read_table(self.config.format, self.path, f"hooks/{hook}/{split}",
                                            shard["name"], hook, rows=shard["rows"])
                        part = new_block_stats(self.hooks[hook])
                        accumulate_stats(part, from_stored(stored, self.config.dtype).float().numpy())
                        merge_stats(manifest["hooks"][hook]["stats"], part, sign=-1)
                for table in self._tables(split):
                    remove_entry(self.path / table / shard_entry_name(self.config.format, shard["name"]))
            self._rewrite_indexes(manifest, split)
        manifest["progress"]["groups"] = group
        manifest["progress"]["final_partial"] = False

    def _rewrite_indexes(self, manifest: dict, split: str) -> None:
        if self.config.format != "arrow" or self.part is not None:
            return  # parts: rank 0 writes the index of every rank's shards when it assembles them
        names = [s["name"] for s in manifest["splits"][split]["shards"]]
        for table, columns in self._table_templates(split, manifest["context_size"]).items():
            if (self.path / table).is_dir():
                write_table_index("arrow", self.path, table, names, columns)

    def _table_templates(self, split: str, context_size: int | None) -> dict[str, dict[str, np.ndarray]]:
        return table_templates(self.hooks, self.config.dtype, self.has_tokens, split, context_size)

    # ------------------------------------------------------------------------- producer side

    def put(self, blocks: ActivationBlock | Iterable[ActivationBlock]) -> None:
        """Queue one source step (one or more blocks, e.g. its train and eval parts). Blocks if full."""
        if self._closed:
            raise PipelineError("the cache writer is closed")
        blocks = [blocks] if isinstance(blocks, ActivationBlock) else list(blocks)
        for block in blocks:
            self._validate(block)
        ready = None
        cuda = [a for b in blocks for a in b.acts.values() if isinstance(a, torch.Tensor) and a.is_cuda]
        if cuda:
            # Conversion, statistics and copies to the host on a side stream: the next forward pass
            # runs beside them instead of after them.
            device = cuda[0].device
            if self._side_stream is None:
                self._side_stream = torch.cuda.Stream(device)
            self._side_stream.wait_stream(torch.cuda.current_stream(device))
            for a in cuda:
                a.record_stream(self._side_stream)  # made on the compute stream, read on the side one
            with torch.cuda.stream(self._side_stream):
                blocks = [self._copy_to_host(b) for b in blocks]
                ready = torch.cuda.Event()
                ready.record(self._side_stream)
        t0 = time.perf_counter()
        while True:
            self._raise_if_failed()
            try:
                self._queue.put(("step", (blocks, ready)), timeout=0.2)
                self.seconds["wait"] += time.perf_counter() - t0
                return
            except queue.Full:
                continue

    def _validate(self, block: ActivationBlock) -> None:
        if block.split not in SPLITS:
            raise PipelineError(f"unknown split {block.split!r}; use 'train' or 'eval'")
        if set(block.acts) != set(self.hooks):
            raise PipelineError(
                f"block hooks {sorted(block.acts)} differ from the cache's hooks {sorted(self.hooks)}"
            )
        rows = {h: int(a.shape[0]) for h, a in block.acts.items()}
        if len(set(rows.values())) > 1:
            raise PipelineError(
                "block hooks disagree in row count: " + ", ".join(f"{h}={n}" for h, n in rows.items())
                + "; every hook must have one row per token"
            )
        n = block.rows
        for hook, a in block.acts.items():
            if a.ndim != 2 or a.shape[1] != self.hooks[hook]:
                raise PipelineError(
                    f"hook {hook}: block has shape {tuple(a.shape)}, the cache stores rows of d={self.hooks[hook]}"
                )
        if self.has_tokens:
            for name in ("token_ids", "sequence", "position", "sequences"):
                if getattr(block, name) is None:
                    raise PipelineError(f"this cache stores tokens: every block needs `{name}`")
            for name in ("token_ids", "sequence", "position"):
                if len(getattr(block, name)) != n:
                    raise PipelineError(f"block `{name}` has {len(getattr(block, name))} rows, activations have {n}")

    def _copy_to_host(self, block: ActivationBlock) -> ActivationBlock:
        """Start the GPU -> pinned host copies (in the stored dtype) without waiting for them.

        The check and the statistics are computed on the GPU too, so the accumulator thread only
        waits on the step's CUDA event and collects; the producer goes straight on to the next
        forward pass.
        """
        acts, stats = {}, {}
        for hook, a in block.acts.items():
            if isinstance(a, torch.Tensor) and a.is_cuda:
                a = a.detach()
                converted = a.to(TORCH_DTYPES[self.config.dtype])
                x = converted.float()
                sq = (x * x).sum(1)
                summary = torch.stack([
                    torch.full((), float(x.shape[0]), device=a.device, dtype=torch.float64),  # no host copy
                    sq.sqrt().sum(dtype=torch.float64), sq.sum(dtype=torch.float64),
                    (~torch.isfinite(x)).sum().double(),
                    a.abs().amax().double() if a.numel() else torch.zeros((), device=a.device, dtype=torch.float64),
                ])
                summary = torch.cat([summary, x.sum(0, dtype=torch.float64)])
                stats[hook] = torch.empty(summary.shape, dtype=torch.float64, pin_memory=True)
                stats[hook].copy_(summary, non_blocking=True)
                host = torch.empty(converted.shape, dtype=converted.dtype, pin_memory=True)
                host.copy_(converted, non_blocking=True)
                a = host
            acts[hook] = a
        return dataclasses.replace(block, acts=acts, device_stats=stats)

    def close(self, complete: bool = True) -> dict:
        """Commit what is pending, mark the cache complete (or not), stop the threads; returns the manifest."""
        if not self._closed:
            self._closed = True
            self._put(self._queue, ("close", complete))
            self._thread.join()
            self._committer.join()
            self._syncer.join()
            self._pool.shutdown()
        self._raise_if_failed()
        return self.manifest

    def abort(self) -> None:
        """Stop without committing pending rows: the cache stays as of its last commit, resumable."""
        if not self._closed:
            self._closed = True
            self._put(self._queue, ("abort", None))
            self._thread.join()
            self._committer.join()
            self._syncer.join()
            self._pool.shutdown()

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close(complete=False)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            self.abort()  # let the other stages settle (a group in flight still commits) first
            err = self._error
            if isinstance(err, PipelineError):
                raise type(err)(str(err))
            raise CacheWriteError(f"the cache writer failed: {err!r}") from err

    # ------------------------------------------------------------------------- background threads
    # Two stages, so the producer never waits for a commit: the accumulator converts, checks and
    # collects blocks into a shard group while the committer writes the previous group to disk.

    def _fail(self, e: BaseException, q: queue.Queue) -> None:
        if self._error is None:
            self._error = e
        while True:  # unblock whoever waits on this queue; nothing more will be committed
            try:
                q.get_nowait()
            except queue.Empty:
                break

    def _put(self, q: queue.Queue, item: tuple) -> None:
        """Put, unless a stage has failed (then nothing downstream will take it)."""
        while self._error is None:
            try:
                q.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def _get(self, q: queue.Queue) -> tuple:
        """Get, or ('abort', None) once any stage has failed."""
        while True:
            try:
                return q.get(timeout=0.2)
            except queue.Empty:
                if self._error is not None:
                    return ("abort", None)

    def _run(self) -> None:
        try:
            pending, units = {s: _Pending() for s in SPLITS}, 0
            while self._error is None:
                kind, payload = self._get(self._queue)
                if kind == "step":
                    t0 = time.perf_counter()
                    payload, ready = payload
                    if ready is not None:
                        ready.synchronize()
                    for block in payload:
                        units += self._add(pending, block)
                    self.seconds["convert"] += time.perf_counter() - t0
                    if sum(p.rows for p in pending.values()) >= self.shard_rows:
                        self._put(self._commits, ("group", (pending, units)))
                        pending, units = {s: _Pending() for s in SPLITS}, 0
                    continue
                if kind == "close" and any(p.rows for p in pending.values()):
                    self._put(self._commits, ("group", (pending, units)))
                self._put(self._commits, (kind, payload))
                return
        except BaseException as e:  # noqa: BLE001 - handed to the producer thread
            self._fail(e, self._queue)

    def _commit_loop(self) -> None:
        """Stage 2: order the group's rows and write its files under temporary names."""
        try:
            while True:
                kind, payload = self._get(self._commits)
                if kind == "group":
                    t0 = time.perf_counter()
                    written = self._write_group(*payload)
                    self.seconds["commit"] += time.perf_counter() - t0
                    self._put(self._durable, ("group", written))
                else:
                    self._put(self._durable, (kind, payload))
                    return
        except BaseException as e:  # noqa: BLE001
            self._fail(e, self._commits)
            self._fail(e, self._queue)

    def _durable_loop(self) -> None:
        """Stage 3: fsync, rename into place, then list the group in the manifest (the commit point)."""
        try:
            while True:
                kind, payload = self._get(self._durable)
                if kind == "group":
                    t0 = time.perf_counter()
                    self._make_durable(*payload)
                    self.seconds["fsync"] += time.perf_counter() - t0
                elif kind == "close":
                    if payload:
                        # The last group may end on a short step, whether or not it filled a shard:
                        # extending the cache redoes it, so extension equals one longer run.
                        progress = self.manifest["progress"]
                        progress["final_partial"] = progress["groups"] > 0
                        if progress["final_partial"] and self._stats_before_last is not None:
                            # restored as they are when the group is redone: no float subtraction
                            progress["stats_before_final"] = self._stats_before_last
                        self.manifest["complete"] = True
                        write_manifest(self.manifest_dir, self.manifest)
                        if self._on_commit:
                            self._on_commit(self.manifest)
                    return
                else:
                    return
        except BaseException as e:  # noqa: BLE001
            self._fail(e, self._durable)
            self._fail(e, self._commits)
            self._fail(e, self._queue)

    def _add(self, pending: dict[str, _Pending], block: ActivationBlock) -> int:
        """Convert, check and collect one block; returns the source units it consumed."""
        p = pending[block.split]
        for hook, x in block.acts.items():
            stats = p.stats.setdefault(hook, new_block_stats(self.hooks[hook]))
            summary = (block.device_stats or {}).get(hook)
            if summary is None:
                p.acts.setdefault(hook, []).append(to_stored(x, self.config.dtype, hook, stats))
                continue
            v = summary.numpy()
            if v[3] > 0:
                raise nonfinite_error(hook, int(v[3]), float(v[4]), self.config.dtype)
            stats["count"] += int(v[0])
            stats["sum_norm"] += float(v[1])
            stats["sum_sq_norm"] += float(v[2])
            stats["sum"] += v[5:]
            p.acts.setdefault(hook, []).append(stored_numpy(x, self.config.dtype))
        if self.has_tokens:
            seq = _as_int32(block.sequence) + p.n_sequences  # local -> index within this shard
            p.tokens.append(np.stack([_as_int32(block.token_ids), seq, _as_int32(block.position)], axis=1))
            sequences = _as_int32(block.sequences)
            p.sequences.append(sequences)
            p.n_sequences += sequences.shape[0]
        p.rows += block.rows
        if block.units is not None:
            return block.units
        return int(block.sequences.shape[0]) if block.sequences is not None else block.rows

    def _io_error(self, e: OSError, group: int, staged: list[tuple[Path, Path]]) -> CacheWriteError:
        for tmp, _ in staged:
            remove_entry(tmp)
        committed = sum(len(s["shards"]) for s in self.manifest["splits"].values())
        what = "the disk is full (ENOSPC)" if e.errno == errno.ENOSPC else f"an I/O error ({e.strerror or e})"
        return CacheWriteError(
            f"{what} while writing shard group {group} of {self.path}; the {committed} committed shards "
            "are intact: free space (or fix the disk) and rerun with --resume"
        )

    def _write_group(self, pending: dict[str, _Pending], units: int) -> tuple:
        nxt = self._next
        group = nxt["group"]
        staged: list[tuple[Path, Path]] = []
        entries: dict[str, dict] = {}
        try:
            for split, p in pending.items():
                if p.rows == 0:
                    continue
                index = nxt["shards"][split]
                name = f"{self.shard_prefix}shard-{index:05d}"
                dest = self._destinations(split, index, p.rows)
                tables: dict[str, dict[str, np.ndarray]] = {}
                for hook, parts in p.acts.items():
                    tables[f"hooks/{hook}/{split}"] = {hook: self._gather(hook, parts, dest)}
                if self.has_tokens:
                    tok = self._gather("tokens", p.tokens, dest)
                    tok[:, 1] += nxt["sequences"][split]  # shard-local -> split-global sequence index
                    tables[f"tokens/{split}/rows"] = {c: np.ascontiguousarray(tok[:, i])
                                                      for i, c in enumerate(TOKEN_COLUMNS)}
                    tables[f"tokens/{split}/sequences"] = {"token_ids": np.concatenate(p.sequences)}
                files = {}
                for table, columns in tables.items():
                    tmp, final_path = stage_table(self.config.format, self.path, table, name, columns,
                                                  self.config.compression)
                    staged.append((tmp, final_path))
                    for f in files_of_entry(tmp):
                        rel = (final_path / f.relative_to(tmp)) if tmp.is_dir() else final_path
                        files[rel.relative_to(self.path).as_posix()] = {
                            "bytes": f.stat().st_size, "xxh3_64": file_checksum(f)}
                entries[split] = {
                    "name": name, "rows": p.rows, "sequences": p.n_sequences, "group": group,
                    "units_start": nxt["units"], "files": files,
                }
        except OSError as e:
            raise self._io_error(e, group, staged) from None
        for split, entry in entries.items():
            nxt["shards"][split] += 1
            nxt["sequences"][split] += entry["sequences"]
        nxt["group"] += 1
        nxt["units"] += units
        return staged, entries, {s: p.stats for s, p in pending.items()}, units

    def _make_durable(self, staged: list[tuple[Path, Path]], entries: dict[str, dict], stats: dict,
                      units: int) -> None:
        m = self.manifest
        group = m["progress"]["groups"]
        try:
            for tmp, _ in staged:
                fsync_entry(tmp)
            for tmp, final_path in staged:
                remove_entry(final_path)  # an unclaimed leftover of an earlier crash
                tmp.rename(final_path)
            for parent in {final_path.parent for _, final_path in staged}:
                fsync_dir(parent)
        except OSError as e:
            raise self._io_error(e, group, staged) from None
        self._stats_before_last = {h: dict(v["stats"]) for h, v in m["hooks"].items()}  # merging replaces, not mutates
        for split, entry in entries.items():
            info = m["splits"][split]
            info["shards"].append(entry)
            info["rows"] += entry["rows"]
            info["sequences"] += entry["sequences"]
            if split == "train":
                for hook, s in stats[split].items():
                    merge_stats(m["hooks"][hook]["stats"], s, sign=1)
            self._rewrite_indexes(m, split)
        m["progress"]["units"] += units
        m["progress"]["groups"] = group + 1
        m["progress"]["final_partial"] = False
        m["progress"].pop("stats_before_final", None)
        write_manifest(self.manifest_dir, m)
        if self._on_commit:
            self._on_commit(m)

    def _destinations(self, split: str, shard_index: int, rows: int) -> np.ndarray | None:
        """Where each collected row goes in the shard: the inverse of the shard's seeded permutation.

        Stored row j is collected row perm[j] (docs/FORMAT.md); scattering row i to dest[i] builds
        that order in one pass, without concatenating the blocks first.
        """
        if not self.config.shuffle:
            return None
        key = [self.config.seed, SPLITS.index(split), shard_index] + ([self.part[0]] if self.part else [])
        perm = np.random.default_rng(key).permutation(rows)
        dest = np.empty(rows, dtype=np.int64)
        dest[perm] = np.arange(rows)
        return dest

    def _gather(self, key: str, parts: list[np.ndarray], dest: np.ndarray | None) -> np.ndarray:
        """The shard's rows in stored order, in a buffer the committer reuses from shard to shard.

        Reuse matters: fresh 256 MiB arrays are page-faulted in on every commit, which cost more
        than the copying itself on the machines we measured.
        """
        rows = sum(len(x) for x in parts)
        shape, dtype = parts[0].shape[1:], parts[0].dtype
        buf = self._buffers.get(key)
        if buf is None or buf.shape[0] < rows or buf.shape[1:] != shape or buf.dtype != dtype:
            buf = self._buffers[key] = np.empty((int(rows * 1.1) + 1,) + shape, dtype)
        out = buf[:rows]
        starts = np.cumsum([0] + [len(x) for x in parts[:-1]])

        def copy(i: int) -> None:  # parts go to disjoint rows: safe in parallel (numpy drops the GIL)
            x, start = parts[i], starts[i]
            if dest is None:
                out[start:start + len(x)] = x
            else:
                out[dest[start:start + len(x)]] = x

        list(self._pool.map(copy, range(len(parts))))
        return out


def table_templates(hooks: dict[str, int], dtype: str, has_tokens: bool, split: str,
                    context_size: int | None) -> dict[str, dict[str, np.ndarray]]:
    """Empty columns with each table's dtypes and widths (for index files)."""
    store = np.uint16 if dtype == "bfloat16" else np.dtype(dtype)
    out = {f"hooks/{h}/{split}": {h: np.zeros((0, d), store)} for h, d in hooks.items()}
    if has_tokens:
        out[f"tokens/{split}/rows"] = {c: np.zeros(0, np.int32) for c in TOKEN_COLUMNS}
        out[f"tokens/{split}/sequences"] = {"token_ids": np.zeros((0, context_size), np.int32)}
    return out


def part_dir(path: Path, rank: int) -> Path:
    """Where rank `rank` of a multi-process cache keeps its own manifest (its progress, for resume)."""
    return Path(path) / PARTS_DIR / f"rank-{rank:05d}"


def wipe_cache(path: Path) -> None:
    """Delete a cache of ours (--overwrite): its tables, its ranks' parts and its manifest."""
    read_manifest(path)  # only ever delete something that is a cache of ours
    for child in ("hooks", "tokens", PARTS_DIR):
        if (path / child).exists():
            shutil.rmtree(path / child)
    (path / MANIFEST_FILE).unlink()


def _as_int32(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.int32)
