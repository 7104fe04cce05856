"""The two on-disk backends of a cache: Zarr v3 arrays and Arrow IPC stream files.

A backend stores *tables*: a directory (`hooks/<hook>/<split>`, `tokens/<split>/rows`, ...) holding
one entry per shard. A table has named columns; a 2-D column is a fixed-size row vector. Writes go
to a temporary name; the writer renames them when the whole shard is ready (docs/FORMAT.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from pipeline.errors import CacheFormatError, PipelineError
from pipeline.manifest import atomic_write_bytes

BACKENDS = ("zarr", "arrow")
COMPRESSIONS = (None, "zstd", "blosc")
TMP_SUFFIX = ".tmp"
# Compressed Zarr shards are split into chunks of this many rows so readers decode only what they use.
COMPRESSED_CHUNK_ROWS = 4096


def check_backend(backend: str, compression: str | None) -> None:
    if backend not in BACKENDS:
        raise PipelineError(f"unknown cache format {backend!r}; use one of: {', '.join(BACKENDS)}")
    if compression not in COMPRESSIONS:
        raise PipelineError(f"unknown compression {compression!r}; use one of: none, zstd, blosc")
    if compression and backend != "zarr":
        raise PipelineError("compression is only available with --format zarr (Arrow shards stay memory-mappable)")


def shard_entry_name(backend: str, shard: str) -> str:
    """The file or directory name of a shard inside a table directory."""
    return f"{shard}.arrow" if backend == "arrow" else shard


# --------------------------------------------------------------------------------------- writing


def stage_table(backend: str, root: Path, table: str, shard: str, columns: dict[str, np.ndarray],
                compression: str | None = None) -> tuple[Path, Path]:
    """Write one shard of a table under a temporary name; return (temporary path, final path).

    Not yet durable: the writer fsyncs (`fsync_entry`) in a later stage, overlapping the next write.
    """
    final = root / table / shard_entry_name(backend, shard)
    tmp = final.with_name(final.name + TMP_SUFFIX)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    if tmp.exists():
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
    try:
        if backend == "zarr":
            _write_zarr(tmp, columns, compression)
        else:
            _write_arrow(tmp, columns)
    except BaseException:
        with contextlib.suppress(OSError):
            remove_entry(tmp)  # a full disk or an interrupt: no partial file stays behind
        raise
    return tmp, final


def _stack_columns(columns: dict[str, np.ndarray]) -> np.ndarray:
    if len(columns) == 1:
        return next(iter(columns.values()))
    # Several 1-D columns of one dtype are stored as one (rows, n_columns) array (e.g. token rows).
    return np.stack(list(columns.values()), axis=1)


def _write_zarr(path: Path, columns: dict[str, np.ndarray], compression: str | None) -> None:
    import zarr
    from zarr.codecs import BloscCodec, ZstdCodec

    array = np.ascontiguousarray(_stack_columns(columns))
    if compression is None:
        # One chunk per shard: the chunk file is the raw little-endian array, memory-mappable as is.
        chunks, compressors = array.shape, None
    else:
        chunks = (min(COMPRESSED_CHUNK_ROWS, max(1, array.shape[0])),) + array.shape[1:]
        compressors = (ZstdCodec(level=3) if compression == "zstd"
                       else BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"))
    z = zarr.create_array(
        store=str(path), shape=array.shape, chunks=chunks, dtype=array.dtype,
        compressors=compressors, filters=None, fill_value=0,
        attributes={"columns": list(columns)},
    )
    if compression is None and array.size:
        # With one chunk and only the little-endian `bytes` codec, the chunk file is the raw array:
        # write it directly (what zarr would write, without its per-call machinery on the hot path).
        chunk = path / "c" / "/".join("0" * array.ndim)
        chunk.parent.mkdir(parents=True, exist_ok=True)
        with open(chunk, "wb") as f:
            f.write(memoryview(array.astype(array.dtype.newbyteorder("<"), copy=False)).cast("B"))
    elif array.size:
        z[...] = array


def _arrow_schema(columns: dict[str, np.ndarray]):
    from datasets import Features, List, Value

    features = {}
    for name, col in columns.items():
        value = Value(col.dtype.name)
        features[name] = List(value, length=col.shape[1]) if col.ndim == 2 else value
    return Features(features)


def _arrow_table(columns: dict[str, np.ndarray]):
    import pyarrow as pa

    features = _arrow_schema(columns)
    arrays = []
    for col in columns.values():
        if col.ndim == 2:
            flat = pa.array(np.ascontiguousarray(col).reshape(-1))
            arrays.append(pa.FixedSizeListArray.from_arrays(flat, col.shape[1]))
        else:
            arrays.append(pa.array(col))
    return pa.Table.from_arrays(arrays, schema=features.arrow_schema), features


def _write_arrow(path: Path, columns: dict[str, np.ndarray]) -> None:
    import pyarrow as pa

    table, _ = _arrow_table(columns)
    with open(path, "wb") as f:
        with pa.ipc.new_stream(f, table.schema) as writer:
            writer.write_table(table, max_chunksize=max(1, table.num_rows))


def write_table_index(backend: str, root: Path, table: str, shards: list[str],
                      columns: dict[str, np.ndarray]) -> None:
    """Arrow: rewrite the `datasets` index (state.json, dataset_info.json) to list committed shards.

    This is what lets `datasets.load_from_disk(CACHE/hooks/<hook>/train)` open one hook alone.
    """
    if backend != "arrow":
        return
    directory = root / table
    directory.mkdir(parents=True, exist_ok=True)
    features = _arrow_schema(columns)
    info = {"citation": "", "description": "", "features": features.to_dict(), "homepage": "", "license": ""}
    state = {
        "_data_files": [{"filename": shard_entry_name(backend, s)} for s in shards],
        "_fingerprint": f"cache-{len(shards)}",
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": None,
    }
    atomic_write_bytes(directory / "dataset_info.json", json.dumps(info, indent=2).encode())
    atomic_write_bytes(directory / "state.json", json.dumps(state, indent=2).encode())


def fsync_entry(path: Path) -> None:
    """Flush every file of a staged shard entry to the disk (before it is renamed into place)."""
    for f in _files_under(path):
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def _files_under(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file())


def files_of_entry(path: Path) -> list[Path]:
    """Every file a shard entry (an Arrow file or a Zarr array directory) consists of."""
    return _files_under(path)


def remove_entry(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


# --------------------------------------------------------------------------------------- reading


def read_table(backend: str, root: Path, table: str, shard: str, column: str, rows: int | None = None) -> np.ndarray:
    """One column of one shard as a numpy array, memory-mapped where the storage allows it."""
    path = root / table / shard_entry_name(backend, shard)
    if not path.exists():
        raise CacheFormatError(f"shard {table}/{shard} is missing from {root}; run `pipeline verify {root}`")
    array = _read_zarr(path, column) if backend == "zarr" else _read_arrow(path, column)
    if rows is not None and array.shape[0] != rows:
        raise CacheFormatError(
            f"shard {table}/{shard} holds {array.shape[0]} rows, the manifest says {rows}; "
            f"the shard is truncated or corrupt (run `pipeline verify {root}`)"
        )
    return array


def zarr_array_meta(path: Path) -> dict:
    try:
        meta = json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError) as e:  # ValueError: bad JSON or bytes that are not UTF-8
        raise CacheFormatError(f"{path}/zarr.json is unreadable ({e}); the shard is corrupt "
                               f"(run `pipeline verify` on the cache)") from None
    if not isinstance(meta, dict):
        raise CacheFormatError(f"{path}/zarr.json is not a Zarr array's metadata; the shard is corrupt")
    return meta


def _read_zarr(path: Path, column: str) -> np.ndarray:
    meta = zarr_array_meta(path)
    try:
        shape = tuple(int(n) for n in meta["shape"])
        dtype = np.dtype(meta["data_type"]).newbyteorder("<")
        codecs = [c["name"] for c in meta["codecs"]]
        chunk_shape = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
        columns = (meta.get("attributes") or {}).get("columns", [column])
    except (KeyError, TypeError, ValueError) as e:
        raise CacheFormatError(f"{path}/zarr.json lacks or garbles a field ({type(e).__name__}: {e}); the shard is "
                               "corrupt (run `pipeline verify` on the cache)") from None
    if codecs == ["bytes"] and chunk_shape == shape:
        chunk = path / "c" / "/".join("0" * len(shape))
        expected = int(np.prod(shape)) * dtype.itemsize
        size = chunk.stat().st_size if chunk.exists() else -1
        if size != expected:
            raise CacheFormatError(
                f"shard {path} is truncated or corrupt: chunk file has {size} bytes, expected {expected}"
            )
        array = np.memmap(chunk, dtype=dtype, mode="r", shape=shape) if expected else np.zeros(shape, dtype)
    else:
        import zarr

        # Compressed: a lazy zarr array; slices decode only the chunks they touch.
        try:
            array = zarr.open_array(str(path), mode="r")
        except Exception as e:  # noqa: BLE001 - zarr's many ways of refusing metadata: one line
            raise CacheFormatError(f"shard {path} cannot be opened by zarr ({type(e).__name__}: {e}); the shard "
                                   "is corrupt (run `pipeline verify` on the cache)") from None
    if len(columns) > 1:
        if column not in columns:
            raise CacheFormatError(f"shard {path} has no column {column!r} (it has {columns}); the shard is corrupt")
        array = array[:, columns.index(column)]
    return array


def _read_arrow(path: Path, column: str) -> np.ndarray:
    import pyarrow as pa

    try:
        source = pa.memory_map(str(path), "r")
        table = pa.ipc.open_stream(source).read_all()
    except (pa.ArrowInvalid, OSError) as e:
        raise CacheFormatError(f"shard {path} is truncated or corrupt ({e})") from None
    if column not in table.column_names:
        raise CacheFormatError(f"shard {path} has no column {column!r} (it has {table.column_names}); the shard "
                               "is corrupt (run `pipeline verify` on the cache)")
    chunks = table.column(column).chunks
    zero_copy = len(chunks) == 1
    col = chunks[0] if zero_copy else pa.concat_arrays(chunks)
    if pa.types.is_fixed_size_list(col.type):
        values = col.values.to_numpy(zero_copy_only=True)
        array = values.reshape(len(col), col.type.list_size).view(MappedRows)
    else:
        array = col.to_numpy(zero_copy_only=True).view(MappedRows)
    # Where the rows lie in the file, so readers can ask the kernel to read ahead (posix_fadvise).
    source.seek(0)
    base = source.read_buffer(1).address if source.size() else 0
    array.filename, array.file_offset = str(path), (array.ctypes.data - base) if zero_copy else None
    return array


class MappedRows(np.ndarray):
    """A zero-copy view of rows in a memory-mapped file, with the file and byte offset of row 0."""

    filename: str | None = None
    file_offset: int | None = None


def file_region(array) -> tuple[str, int] | None:
    """(file, offset of row 0) for a memory-mapped shard array (np.memmap or Arrow), else None."""
    if isinstance(array, np.memmap) and array.filename:
        return array.filename, array.offset
    if isinstance(array, MappedRows) and array.filename and array.file_offset is not None:
        return array.filename, array.file_offset
    return None
