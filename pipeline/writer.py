"""The cache writer API: any iterator of activation blocks in, a committed, checksummed cache out.

Producers (a language model, synthetic data, another model) hand `ActivationBlock`s to
`CacheWriter.put`; a background thread converts, checks, shuffles and commits them in shards, so
the producer never waits on the disk unless the bounded queue is full.

Commit protocol (why a crash never leaves a claimed shard missing): all files of a shard group are
written under `*.tmp` names and fsynced, renamed, and only then is the manifest replaced
atomically. Anything on disk that the manifest does not list is removed on resume.
"""

from __future__ import annotations

import errno
import queue
import shutil
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import xxhash

from pipeline.backends import (
    TMP_SUFFIX, check_backend, files_of_entry, read_table, remove_entry, shard_entry_name, stage_table,
    write_table_index,
)
from pipeline.errors import CacheWriteError, PipelineError
from pipeline.manifest import (
    DTYPES, MANIFEST_FILE, SPLITS, config_differences, empty_stats, fsync_dir, new_manifest, read_manifest,
    write_manifest,
)

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
TOKEN_COLUMNS = ("token_id", "sequence", "position")


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


def file_checksum(path: Path) -> str:
    h = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            h.update(chunk)
    return h.hexdigest()


def estimate_bytes(rows: int, hooks: dict[str, int], dtype: str, has_tokens: bool, context_size: int | None) -> int:
    per_row = sum(hooks.values()) * ITEMSIZE[dtype] + (12 if has_tokens else 0)
    sequences = (rows // context_size + 1) * context_size * 4 if (has_tokens and context_size) else 0
    return rows * per_row + sequences


def check_disk_space(path: Path, needed: int) -> None:
    """Refuse before writing when the disk cannot hold the cache (5% margin)."""
    probe = path if path.exists() else path.parent
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed * 1.05 > free:
        raise CacheWriteError(
            f"not enough disk space for the cache in {path}: it needs ~{needed / 2**30:.2f} GiB, "
            f"{free / 2**30:.2f} GiB are free; free space, choose another --out, or cache fewer --tokens"
        )


def to_stored(x: Any, dtype: str, hook: str) -> tuple[np.ndarray, torch.Tensor]:
    """Convert a block of one hook to the stored dtype: (numpy array as stored, float tensor for stats)."""
    t = torch.as_tensor(x).detach()
    if t.ndim != 2:
        raise PipelineError(f"hook {hook}: a block must be (rows, d), got shape {tuple(t.shape)}")
    t = t.to("cpu")
    converted = t.to(TORCH_DTYPES[dtype])
    if not bool(torch.isfinite(converted).all()):
        bad = int((~torch.isfinite(converted)).sum())
        if not bool(torch.isfinite(t).all()):
            raise CacheWriteError(f"hook {hook} produced {bad} NaN/inf values; the model or input is broken")
        raise CacheWriteError(
            f"hook {hook}: {bad} values overflow {dtype} (largest |x| = {float(t.abs().max()):.4g}); "
            "write with --dtype float32 or bfloat16"
        )
    contiguous = converted.contiguous()
    if dtype == "bfloat16":
        array = contiguous.view(torch.int16).numpy().view(np.uint16)
    else:
        array = contiguous.numpy()
    return array, converted


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
    ):
        self.path = Path(path)
        self.config = config or WriterConfig()
        self.hooks = dict(hooks)
        if not self.hooks:
            raise PipelineError("no hooks to write; name at least one hook")
        if self.config.dtype not in DTYPES:
            raise PipelineError(f"unknown dtype {self.config.dtype!r}; use one of: {', '.join(DTYPES)}")
        check_backend(self.config.format, self.config.compression)
        self.has_tokens = has_tokens
        provenance = dict(provenance or {})
        content_config = {"layout": self.config.layout(), "hooks": self.hooks, "has_tokens": has_tokens,
                          "source": source_config or {}}
        self.manifest = self._open(content_config, provenance, resume, overwrite)
        self.resume_units = self.manifest["progress"]["units"]
        if expected_rows is not None:
            done = sum(s["rows"] for s in self.manifest["splits"].values())
            check_disk_space(self.path, estimate_bytes(max(0, expected_rows - done), self.hooks,
                                                       self.config.dtype, has_tokens,
                                                       provenance.get("context_size")))
        row_bytes = sum(self.hooks.values()) * ITEMSIZE[self.config.dtype] / len(self.hooks)
        self.shard_rows = max(1, int(self.config.shard_mb * 2**20 / row_bytes))
        self._pending = {s: _Pending() for s in SPLITS}
        self._pending_units = 0
        self._queue: queue.Queue = queue.Queue(maxsize=self.config.queue_blocks)
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="cache-writer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------- opening / resume

    def _open(self, content_config: dict, provenance: dict, resume: bool, overwrite: bool) -> dict:
        path = self.path
        if (path / MANIFEST_FILE).exists():
            if overwrite:
                self._wipe()
            elif resume:
                manifest = read_manifest(path)
                diffs = config_differences(manifest["config"], content_config)
                if diffs:
                    raise PipelineError(
                        f"cannot resume {path}: its config differs ({'; '.join(diffs)}); "
                        "resume with the cache's settings or use --overwrite"
                    )
                self._drop_uncommitted(manifest)
                if manifest["progress"]["final_partial"]:
                    self._drop_last_group(manifest)
                manifest["complete"] = False
                write_manifest(path, manifest)
                return manifest
            else:
                manifest = read_manifest(path)
                rows = sum(s["rows"] for s in manifest["splits"].values())
                raise PipelineError(
                    f"{path} already holds a cache ({rows} rows); pass --resume to continue or extend it, "
                    "or --overwrite to replace it"
                )
        elif path.exists() and any(path.iterdir()):
            raise PipelineError(
                f"{path} is not empty and holds no cache; choose a new or empty directory for --out"
            )
        path.mkdir(parents=True, exist_ok=True)
        manifest = new_manifest(
            backend=self.config.format, dtype=self.config.dtype, hooks=self.hooks, config=content_config,
            provenance=provenance, compression=self.config.compression, has_tokens=self.has_tokens,
        )
        write_manifest(path, manifest)
        return manifest

    def _wipe(self) -> None:
        read_manifest(self.path)  # only ever delete something that is a cache of ours
        for child in ("hooks", "tokens"):
            if (self.path / child).exists():
                shutil.rmtree(self.path / child)
        (self.path / MANIFEST_FILE).unlink()

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
                    is_index = entry.name in ("state.json", "dataset_info.json")
                    if entry.name.endswith(TMP_SUFFIX) or (not is_index and entry.name not in claimed):
                        remove_entry(entry)
            self._rewrite_indexes(manifest, split)

    def _drop_last_group(self, manifest: dict) -> None:
        """Undo the final partial shard group, so an extended cache equals one written straight through."""
        group = manifest["progress"]["groups"] - 1
        for split in SPLITS:
            info = manifest["splits"][split]
            while info["shards"] and info["shards"][-1]["group"] == group:
                shard = info["shards"].pop()
                info["rows"] -= shard["rows"]
                info["sequences"] -= shard["sequences"]
                manifest["progress"]["units"] = shard["units_start"]
                if split == "train":  # the manifest keeps train statistics: take this shard's back out
                    for hook in self.hooks:
                        stored = read_table(self.config.format, self.path, f"hooks/{hook}/{split}",
                                            shard["name"], hook, rows=shard["rows"])
                        part = _new_block_stats(self.hooks[hook])
                        _accumulate_stats(part, from_stored(stored, self.config.dtype))
                        _merge_stats(manifest["hooks"][hook]["stats"], part, sign=-1)
                for table in self._tables(split):
                    remove_entry(self.path / table / shard_entry_name(self.config.format, shard["name"]))
            self._rewrite_indexes(manifest, split)
        manifest["progress"]["groups"] = group
        manifest["progress"]["final_partial"] = False

    def _rewrite_indexes(self, manifest: dict, split: str) -> None:
        if self.config.format != "arrow":
            return
        names = [s["name"] for s in manifest["splits"][split]["shards"]]
        for table, columns in self._table_templates(split).items():
            if (self.path / table).is_dir():
                write_table_index("arrow", self.path, table, names, columns)

    def _table_templates(self, split: str) -> dict[str, dict[str, np.ndarray]]:
        """Empty columns with each table's dtypes and widths (for index files)."""
        store = np.uint16 if self.config.dtype == "bfloat16" else np.dtype(self.config.dtype)
        out = {f"hooks/{h}/{split}": {h: np.zeros((0, d), store)} for h, d in self.hooks.items()}
        if self.has_tokens:
            ctx = self.manifest_context_size or 1
            out[f"tokens/{split}/rows"] = {c: np.zeros(0, np.int32) for c in TOKEN_COLUMNS}
            out[f"tokens/{split}/sequences"] = {"token_ids": np.zeros((0, ctx), np.int32)}
        return out

    @property
    def manifest_context_size(self) -> int | None:
        m = getattr(self, "manifest", None)
        return m.get("context_size") if m else None

    # ------------------------------------------------------------------------- producer side

    def put(self, blocks: ActivationBlock | Iterable[ActivationBlock]) -> None:
        """Queue one source step (one or more blocks, e.g. its train and eval parts). Blocks if full."""
        if self._closed:
            raise PipelineError("the cache writer is closed")
        blocks = [blocks] if isinstance(blocks, ActivationBlock) else list(blocks)
        for block in blocks:
            self._validate(block)
        while True:
            self._raise_if_failed()
            try:
                self._queue.put(("step", blocks), timeout=0.2)
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

    def close(self, complete: bool = True) -> dict:
        """Commit what is pending, mark the cache complete (or not), stop the thread; returns the manifest."""
        if not self._closed:
            self._closed = True
            self._queue.put(("close", complete))
            self._thread.join()
        self._raise_if_failed()
        return self.manifest

    def abort(self) -> None:
        """Stop without committing pending rows: the cache stays as of its last commit, resumable."""
        if not self._closed:
            self._closed = True
            self._queue.put(("abort", None))
            self._thread.join()

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close(complete=False)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            err = self._error
            if isinstance(err, PipelineError):
                raise type(err)(str(err))
            raise CacheWriteError(f"the cache writer failed: {err!r}") from err

    # ------------------------------------------------------------------------- writer thread

    def _run(self) -> None:
        try:
            while True:
                kind, payload = self._queue.get()
                if kind == "step":
                    for block in payload:
                        self._add(block)
                    if sum(p.rows for p in self._pending.values()) >= self.shard_rows:
                        self._commit(final=False)
                elif kind == "close":
                    if any(p.rows for p in self._pending.values()):
                        self._commit(final=True)
                    if payload:
                        # The last group may end on a short step, whether or not it filled a shard:
                        # extending the cache redoes it, so extension equals one longer run.
                        self.manifest["progress"]["final_partial"] = self.manifest["progress"]["groups"] > 0
                        self.manifest["complete"] = True
                        write_manifest(self.path, self.manifest)
                    return
                else:
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the producer thread
            self._error = e
            # Unblock a producer waiting on a full queue; nothing more will be committed.
            while True:
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break

    def _add(self, block: ActivationBlock) -> None:
        p = self._pending[block.split]
        for hook, x in block.acts.items():
            array, converted = to_stored(x, self.config.dtype, hook)
            p.acts.setdefault(hook, []).append(array)
            _accumulate_stats(p.stats.setdefault(hook, _new_block_stats(self.hooks[hook])), converted)
        if self.has_tokens:
            seq = _as_int32(block.sequence) + p.n_sequences  # local -> index within this shard
            p.tokens.append(np.stack([_as_int32(block.token_ids), seq, _as_int32(block.position)], axis=1))
            sequences = _as_int32(block.sequences)
            p.sequences.append(sequences)
            p.n_sequences += sequences.shape[0]
        p.rows += block.rows
        n_units = block.units if block.units is not None else (
            int(block.sequences.shape[0]) if block.sequences is not None else block.rows)
        self._pending_units += n_units

    def _commit(self, final: bool) -> None:
        m = self.manifest
        group = m["progress"]["groups"]
        staged: list[tuple[Path, Path]] = []
        new_entries: dict[str, dict] = {}
        try:
            for split, p in self._pending.items():
                if p.rows == 0:
                    continue
                info = m["splits"][split]
                name = f"shard-{len(info['shards']):05d}"
                perm = self._permutation(split, len(info["shards"]), p.rows)
                tables: dict[str, dict[str, np.ndarray]] = {}
                for hook, parts in p.acts.items():
                    tables[f"hooks/{hook}/{split}"] = {hook: _take(np.concatenate(parts), perm)}
                if self.has_tokens:
                    tok = _take(np.concatenate(p.tokens), perm)
                    tok[:, 1] += info["sequences"]  # shard-local -> split-global sequence index
                    tables[f"tokens/{split}/rows"] = {c: np.ascontiguousarray(tok[:, i]) for i, c in enumerate(TOKEN_COLUMNS)}
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
                new_entries[split] = {
                    "name": name, "rows": p.rows, "sequences": p.n_sequences, "group": group,
                    "units_start": m["progress"]["units"], "files": files,
                }
            for tmp, final_path in staged:
                remove_entry(final_path)  # an unclaimed leftover of an earlier crash
                tmp.rename(final_path)
            for parent in {final_path.parent for _, final_path in staged}:
                fsync_dir(parent)
        except OSError as e:
            for tmp, _ in staged:
                remove_entry(tmp)
            committed = sum(len(s["shards"]) for s in m["splits"].values())
            what = "the disk is full (ENOSPC)" if e.errno == errno.ENOSPC else f"an I/O error ({e.strerror or e})"
            raise CacheWriteError(
                f"{what} while writing shard group {group} of {self.path}; the {committed} committed shards "
                "are intact: free space (or fix the disk) and rerun with --resume"
            ) from None
        for split, entry in new_entries.items():
            info = m["splits"][split]
            info["shards"].append(entry)
            info["rows"] += entry["rows"]
            info["sequences"] += entry["sequences"]
            if split == "train":
                for hook, s in self._pending[split].stats.items():
                    _merge_stats(m["hooks"][hook]["stats"], s, sign=1)
            self._rewrite_indexes(m, split)
        m["progress"]["units"] += self._pending_units
        m["progress"]["groups"] = group + 1
        m["progress"]["final_partial"] = final
        write_manifest(self.path, m)
        self._pending = {s: _Pending() for s in SPLITS}
        self._pending_units = 0

    def _permutation(self, split: str, shard_index: int, rows: int) -> np.ndarray | None:
        if not self.config.shuffle:
            return None
        rng = np.random.default_rng([self.config.seed, SPLITS.index(split), shard_index])
        return rng.permutation(rows)


def _as_int32(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.int32)


def _take(array: np.ndarray, perm: np.ndarray | None) -> np.ndarray:
    return array if perm is None else array[perm]


def _new_block_stats(d: int) -> dict:
    return {"count": 0, "sum": np.zeros(d, np.float64), "sum_norm": 0.0, "sum_sq_norm": 0.0}


def _accumulate_stats(st: dict, x: torch.Tensor) -> None:
    # A block's sums in float32 (fast, and exact enough over one block), the running totals in float64.
    xf = x.to(torch.float32)
    norms = torch.linalg.vector_norm(xf, dim=1)
    st["count"] += xf.shape[0]
    st["sum"] += xf.sum(0, dtype=torch.float64).numpy()
    st["sum_norm"] += float(norms.sum(dtype=torch.float64))
    st["sum_sq_norm"] += float((norms * norms).sum(dtype=torch.float64))


def from_stored(array: np.ndarray, dtype: str) -> torch.Tensor:
    """A stored array (bfloat16 as uint16 bit patterns) as a tensor of its real dtype, sharing memory."""
    with warnings.catch_warnings():
        # Memory-mapped shards are read-only on purpose; torch warns about any non-writable array.
        warnings.simplefilter("ignore", UserWarning)
        if dtype == "bfloat16":
            return torch.from_numpy(np.asarray(array).view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(np.asarray(array))


def _merge_stats(total: dict, part: dict, sign: int) -> None:
    """Add (or subtract) a shard's statistics to the hook's running totals, and refresh the means."""
    if total.get("sum") is None or len(total["sum"]) != len(part["sum"]):
        total.update(empty_stats(len(part["sum"])))
    total["count"] += sign * part["count"]
    total["sum_norm"] += sign * part["sum_norm"]
    total["sum_sq_norm"] += sign * part["sum_sq_norm"]
    total["sum"] = (np.asarray(total["sum"], np.float64) + sign * np.asarray(part["sum"])).tolist()
    n = total["count"]
    total["mean_norm"] = total["sum_norm"] / n if n else None
    total["mean"] = (np.asarray(total["sum"]) / n).tolist() if n else None
