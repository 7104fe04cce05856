"""Read activation caches written by SAELens's `CacheActivationsRunner` as a row source.

A SAELens cache is a Hugging Face `datasets` `save_to_disk` directory:

```
CACHE/
  state.json              # "_data_files": [{"filename": "data-00000-of-00002.arrow"}, ...] in order
  dataset_info.json       # "features": {<hook>: Array2D(shape=(context_size, d_in), dtype), "token_ids": ...}
  data-00000-of-00002.arrow, ...   # Arrow IPC *stream* files, one per SAELens buffer
```

One dataset row is one context: each hook column holds a (context_size, d_in) block (stored as
`list<list<float>>`, i.e. variable-size lists with offsets, tagged with the `datasets`
`Array2DExtensionType`), and `token_ids` holds the context's token ids. `datasets.save_to_disk`
writes each file as several record batches (at most 1000 rows, fewer when that would exceed
~100 MB), so **every record batch is exposed as its own shard**: its activations are a zero-copy
view, shape (n_contexts * context_size, d_in), of the memory-mapped file's leaf values buffer.

Differences from our own cache (`pipeline.reader.Cache`), whose interface this class duck-types:

* There is no manifest, so the statistics `hook_stats` returns (count, mean, mean_norm, ...) are
  computed when the cache is opened, by streaming over every row in chunks (float64 accumulation).
* There is no eval split: `shards("eval")` is empty and `rows("eval")` is 0. Hold out data for
  evaluation some other way (e.g. a second SAELens cache, or one of ours).
* Row order is the file order. `CacheActivationsRunner(shuffle=True)` shuffles only the dataset it
  returns in memory (an indices mapping); the files on disk stay in generation order.
* SAELens stores `float32` or `float16` (it cannot write `bfloat16`: Arrow has no such type).
"""

from __future__ import annotations

import json
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np

from pipeline.errors import CacheFormatError, PipelineError

try:  # an ndarray view that carries (file, byte offset of row 0), for the loader's read-ahead
    from pipeline.backends import MappedRows
except ImportError:  # pragma: no cover - older pipeline.backends
    MappedRows = None

STATE_FILE = "state.json"
INFO_FILE = "dataset_info.json"
TOKENS_COLUMN = "token_ids"
SUPPORTED_DTYPES = ("float32", "float16")
SPLITS = ("train", "eval")
# Rows per statistics chunk are chosen so that one float64 chunk is about this many bytes.
STATS_CHUNK_BYTES = 32 * 2**20
# Files whose record batches are kept (their memory maps stay alive only through returned arrays).
_OPEN_FILES = 4


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CacheFormatError(f"{path} is unreadable ({e})") from None


def _array2d_features(info: dict) -> dict[str, dict]:
    features = info.get("features") or {}
    if not isinstance(features, dict):
        return {}
    return {name: f for name, f in features.items() if isinstance(f, dict) and f.get("_type") == "Array2D"}


def is_saelens_cache(path: str | Path) -> bool:
    """Whether `path` looks like a SAELens activation cache (a `datasets` directory with Array2D columns)."""
    path = Path(path)
    try:
        if not (path / STATE_FILE).is_file() or not (path / INFO_FILE).is_file():
            return False
        state = json.loads((path / STATE_FILE).read_text())
        info = json.loads((path / INFO_FILE).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    return (isinstance(state, dict) and isinstance(state.get("_data_files"), list)
            and isinstance(info, dict) and bool(_array2d_features(info)))


class SAELensCache:
    """A SAELens `CacheActivationsRunner` cache, read through the same interface as `pipeline.reader.Cache`.

    Attributes: `path`, `hooks` (hook -> d_in), `dtype` ("float32" or "float16"), `context_size`,
    `files` (the Arrow files in order). Each shard (one record batch of one file) is a dict with
    `name` ("<file>#<batch>"), `rows` (contexts * context_size), `sequences` (contexts), `file`, `batch`.

    `compute_stats=False` postpones the statistics pass to the first `hook_stats` call;
    `verbose=False` silences the one-line message printed (to stderr) when it runs.
    """

    def __init__(self, path: str | Path, compute_stats: bool = True, verbose: bool = True):
        self.path = Path(path)
        self.verbose = verbose
        if not is_saelens_cache(self.path):
            raise CacheFormatError(
                f"{self.path} is not a SAELens activation cache (expected a `datasets` save_to_disk directory "
                f"with {STATE_FILE}, {INFO_FILE} and Array2D activation columns)"
            )
        state = _read_json(self.path / STATE_FILE)
        info = _read_json(self.path / INFO_FILE)
        features = _array2d_features(info)

        shapes = {name: tuple(int(s) for s in f["shape"]) for name, f in features.items()}
        dtypes = {name: str(f.get("dtype")) for name, f in features.items()}
        if len({s[0] for s in shapes.values()}) != 1 or len(set(dtypes.values())) != 1:
            raise CacheFormatError(
                f"SAELens cache {self.path}: activation columns disagree on context size or dtype: "
                + ", ".join(f"{n} {shapes[n]} {dtypes[n]}" for n in features)
            )
        self.dtype: str = next(iter(dtypes.values()))
        if self.dtype not in SUPPORTED_DTYPES:
            raise PipelineError(
                f"SAELens cache {self.path} stores {self.dtype} activations; only {', '.join(SUPPORTED_DTYPES)} "
                "are supported"
            )
        self.context_size: int = next(iter(shapes.values()))[0]
        self.hooks: dict[str, int] = {name: shape[1] for name, shape in shapes.items()}

        try:
            self.files = [self.path / str(entry["filename"]) for entry in state["_data_files"]]
        except (KeyError, TypeError):
            raise CacheFormatError(f"{self.path / STATE_FILE} has a malformed `_data_files` list") from None
        self._batches: OrderedDict[int, tuple[list, int]] = OrderedDict()  # file -> (batches, map address)
        self._shards: list[dict] = []
        self._where: list[tuple[int, int]] = []  # (file index, batch index) of each shard
        for file_index, file in enumerate(self.files):
            batches, _ = self._file_batches(file_index)
            for batch_index, batch in enumerate(batches):
                if batch.num_rows == 0:
                    continue
                self._shards.append({
                    "name": f"{file.name}#{batch_index}",
                    "rows": batch.num_rows * self.context_size,
                    "sequences": batch.num_rows,
                    "file": file.name,
                    "batch": batch_index,
                })
                self._where.append((file_index, batch_index))
        self._rows = sum(s["rows"] for s in self._shards)
        self._stats: dict[str, dict] | None = None
        if compute_stats:
            self._compute_stats()

    # ------------------------------------------------------------------------------- interface

    def check_hook(self, hook: str) -> str:
        if hook not in self.hooks:
            raise PipelineError(f"hook {hook!r} is not in SAELens cache {self.path}; it has: {', '.join(self.hooks)}")
        return hook

    def shards(self, split: str = "train") -> list[dict]:
        """The shards of a split: one per record batch for "train"; none for "eval" (SAELens has no eval split)."""
        self._check_split(split)
        return list(self._shards) if split == "train" else []

    def rows(self, split: str = "train") -> int:
        self._check_split(split)
        return self._rows if split == "train" else 0

    def activations(self, hook: str, split: str, shard: int) -> np.ndarray:
        """(contexts * context_size, d_in) of one record batch: a read-only zero-copy view of the memory map.

        A `pipeline.backends.MappedRows` view (with `filename` and `file_offset` of row 0) where available.
        """
        self.check_hook(hook)
        shards = self.shards(split)
        if not 0 <= shard < len(shards):
            raise PipelineError(f"shard {shard} is out of range: split {split!r} of {self.path} has {len(shards)}")
        file_index, batch_index = self._where[shard]
        batches, base = self._file_batches(file_index)
        batch = batches[batch_index]
        if hook not in batch.schema.names:
            raise CacheFormatError(f"{self.files[file_index]} has no column {hook!r}")
        values = self._leaf_values(batch.column(hook), batch.num_rows, hook, shards[shard]["name"])
        if MappedRows is not None:
            values = values.view(MappedRows)
            values.filename, values.file_offset = str(self.files[file_index]), values.ctypes.data - base
        return values

    def hook_stats(self, hook: str) -> dict:
        """Statistics over all rows, computed from the data (float64): count, sum_norm, sum_sq_norm, sum,
        mean_norm, mean (as in our manifest)."""
        self.check_hook(hook)
        if self._stats is None:
            self._compute_stats()
        return self._stats[hook]

    # ------------------------------------------------------------------------------- internals

    def _check_split(self, split: str) -> None:
        if split not in SPLITS:
            raise PipelineError(f"unknown split {split!r}; use 'train' or 'eval'")

    def _file_batches(self, file_index: int) -> tuple[list, int]:
        """All record batches of one file, read through a memory map (zero-copy), and the map's address.

        The map's file descriptor is closed right away; the mapping lives as long as an array uses it.
        """
        import pyarrow as pa

        if file_index in self._batches:
            self._batches.move_to_end(file_index)
            return self._batches[file_index]
        file = self.files[file_index]
        if not file.is_file():
            raise CacheFormatError(f"SAELens cache {self.path} lists {file.name} in {STATE_FILE}, but it is missing")
        try:
            source = pa.memory_map(str(file), "r")
            try:
                base = source.read_buffer(1).address if source.size() else 0
                source.seek(0)
                batches = list(pa.ipc.open_stream(source))
            finally:
                source.close()
        except (pa.ArrowInvalid, OSError) as e:
            raise CacheFormatError(f"{file} is truncated or not an Arrow IPC stream ({e})") from None
        missing = [h for h in self.hooks if batches and h not in batches[0].schema.names]
        if missing:
            raise CacheFormatError(f"{file} lacks the column(s) {', '.join(missing)} that {INFO_FILE} declares")
        self._batches[file_index] = (batches, base)
        while len(self._batches) > _OPEN_FILES:
            self._batches.popitem(last=False)
        return batches, base

    def _leaf_values(self, column, n_contexts: int, hook: str, shard_name: str) -> np.ndarray:
        """The contiguous float values under list<list<float>> (or fixed-size lists) as (rows, d), zero-copy."""
        import pyarrow as pa

        d = self.hooks[hook]
        array = column.storage if isinstance(column, pa.ExtensionArray) else column
        for size in (self.context_size, d):
            if array.null_count:
                raise CacheFormatError(f"shard {shard_name}: column {hook!r} has null entries")
            if pa.types.is_fixed_size_list(array.type):
                if array.type.list_size != size:
                    raise CacheFormatError(f"shard {shard_name}: column {hook!r} has lists of "
                                           f"{array.type.list_size}, expected {size}")
            elif pa.types.is_list(array.type) or pa.types.is_large_list(array.type):
                offsets = array.offsets.to_numpy(zero_copy_only=True)
                if len(offsets) > 1 and not (np.diff(offsets) == size).all():
                    raise CacheFormatError(f"shard {shard_name}: column {hook!r} has lists whose length is not {size}")
            else:
                raise CacheFormatError(f"shard {shard_name}: column {hook!r} has type {array.type}, "
                                       "expected nested lists")
            array = array.flatten()  # respects slicing offsets; zero-copy
        if array.null_count:
            raise CacheFormatError(f"shard {shard_name}: column {hook!r} has null values")
        values = array.to_numpy(zero_copy_only=True)
        if values.dtype != np.dtype(self.dtype) or values.size != n_contexts * self.context_size * d:
            raise CacheFormatError(
                f"shard {shard_name}: column {hook!r} holds {values.size} {values.dtype} values, expected "
                f"{n_contexts * self.context_size * d} {self.dtype}"
            )
        return values.reshape(n_contexts * self.context_size, d)

    def _compute_stats(self) -> None:
        n_shards = len(self._shards)
        if self.verbose:
            gb = self._rows * sum(self.hooks.values()) * np.dtype(self.dtype).itemsize / 1e9
            print(f"SAELens cache {self.path} has no manifest: computing statistics of {len(self.hooks)} hook(s) "
                  f"over {self._rows:,} rows ({gb:.2f} GB, {n_shards} shards)...", file=sys.stderr, flush=True)
        stats = {}
        for hook, d in self.hooks.items():
            total = np.zeros(d, dtype=np.float64)
            sum_norm = sum_sq_norm = 0.0
            chunk = max(1, STATS_CHUNK_BYTES // (8 * d))
            for i in range(n_shards):
                array = np.asarray(self.activations(hook, "train", i))
                for start in range(0, array.shape[0], chunk):
                    x = array[start:start + chunk].astype(np.float64)
                    total += x.sum(axis=0)
                    sq = np.einsum("ij,ij->i", x, x)
                    sum_sq_norm += float(sq.sum())
                    sum_norm += float(np.sqrt(sq).sum())
            count = self._rows
            stats[hook] = {
                "count": count,
                "sum_norm": sum_norm,
                "sum_sq_norm": sum_sq_norm,
                "sum": total.tolist(),
                "mean_norm": sum_norm / count if count else 0.0,
                "mean": (total / count).tolist() if count else [0.0] * d,
            }
        self._stats = stats
