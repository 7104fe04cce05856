"""The cache's `manifest.json`: schema, versioning, atomic writes and validation.

The manifest is the single source of truth for what a cache holds: a shard exists for readers
only once the manifest lists it (see docs/FORMAT.md for every field).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.errors import CacheFormatError

FORMAT_NAME = "sae-activation-cache"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
SPLITS = ("train", "eval")
DTYPES = ("float32", "float16", "bfloat16")


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old or the new file, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)  # a full disk: the old file stays, no partial one beside it
        raise
    fsync_dir(path.parent)


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def config_hash(config: dict) -> str:
    """A short stable hash of a JSON-able config (what the cache's content depends on)."""
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()[:16]


def config_differences(stored: dict, given: dict, prefix: str = "") -> list[str]:
    """Fields whose values differ between two configs, as 'field: cache X, now Y'."""
    diffs = []
    for key in sorted(set(stored) | set(given)):
        a, b = stored.get(key), given.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += config_differences(a, b, prefix=name + ".")
        elif a != b:
            diffs.append(f"{name}: cache {a!r}, now {b!r}")
    return diffs


def new_manifest(
    *,
    backend: str,
    dtype: str,
    hooks: dict[str, int],
    config: dict,
    provenance: dict,
    compression: str | None,
    has_tokens: bool,
) -> dict:
    """A manifest for an empty cache: no shards, not complete."""
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "backend": backend,
        "compression": compression,
        "dtype": dtype,
        "complete": False,
        "config": config,
        "config_hash": config_hash(config),
        "provenance": provenance,
        "has_tokens": has_tokens,
        "context_size": provenance.get("context_size"),
        "hooks": {
            name: {"shape": [d], "dtype": dtype, "stats": empty_stats(d)} for name, d in hooks.items()
        },
        "splits": {split: {"rows": 0, "sequences": 0, "shards": []} for split in SPLITS},
        "progress": {"units": 0, "groups": 0, "final_partial": False},
    }


def empty_stats(d: int) -> dict:
    return {"count": 0, "sum_norm": 0.0, "sum_sq_norm": 0.0, "sum": [0.0] * d, "mean_norm": None, "mean": None}


def read_manifest(cache_dir: str | Path) -> dict:
    """Load and validate a cache's manifest, with a one-line error for every way it can be wrong."""
    cache_dir = Path(cache_dir)
    path = cache_dir / MANIFEST_FILE
    if not cache_dir.is_dir():
        raise CacheFormatError(f"{cache_dir} does not exist or is not a directory; pass a cache directory")
    if not path.is_file():
        raise CacheFormatError(
            f"{cache_dir} is not an activation cache (no {MANIFEST_FILE}); "
            "write one with `pipeline cache --out DIR`"
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheFormatError(f"{path} is not valid JSON ({e}); the manifest is corrupt") from None
    return validate_manifest(manifest, path)


# The manifest's shape (docs/FORMAT.md): a type (or tuple of types) per field; a dict is a nested
# object, {"*": schema} an object of any keys, [schema] a list. Fields not named here are free.
_NUMBER = (int, float)
_STATS = {"count": int, "sum_norm": _NUMBER, "sum_sq_norm": _NUMBER, "sum": [_NUMBER],
          "mean_norm": (int, float, type(None)), "mean": ([_NUMBER], type(None))}
_SHARD = {"name": str, "rows": int, "sequences": int, "group": int, "units_start": int,
          "files": {"*": {"bytes": int, "xxh3_64": str}}}
_SPLIT = {"rows": int, "sequences": int, "shards": [_SHARD]}
SCHEMA = {
    "format": str, "format_version": int, "package_version": str, "created": str, "backend": str,
    "compression": (str, type(None)), "dtype": str, "complete": bool, "config": dict, "config_hash": str,
    "provenance": dict, "has_tokens": bool, "context_size": (int, type(None)),
    "hooks": {"*": {"shape": [int], "dtype": str, "stats": _STATS}},
    "splits": {split: _SPLIT for split in SPLITS},
    "progress": {"units": int, "groups": int, "final_partial": bool},
}


def _schema_error(value: Any, schema: Any, where: str) -> str | None:
    """The first place where `value` does not have the shape `schema` describes, as a sentence."""
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            return f"`{where}` is {_kind(value)}, expected an object"
        items = [(k, schema["*"]) for k in value] if "*" in schema else list(schema.items())
        for key, sub in items:
            if key not in value:
                return f"`{where}.{key}` is missing"
            error = _schema_error(value[key], sub, f"{where}.{key}")
            if error:
                return error
        return None
    if isinstance(schema, list):
        if not isinstance(value, list):
            return f"`{where}` is {_kind(value)}, expected a list"
        for i, item in enumerate(value):
            error = _schema_error(item, schema[0], f"{where}[{i}]")
            if error:
                return error
        return None
    if isinstance(schema, tuple) and any(isinstance(s, (list, dict)) for s in schema):
        errors = [_schema_error(value, s, where) for s in schema]
        return None if None in errors else errors[0]
    types = schema if isinstance(schema, tuple) else (schema,)
    if isinstance(value, bool) and bool not in types:  # JSON true is not a number here
        return f"`{where}` is {_kind(value)}, expected {' or '.join(_kind_name(t) for t in types)}"
    if not isinstance(value, types):
        return f"`{where}` is {_kind(value)}, expected {' or '.join(_kind_name(t) for t in types)}"
    return None


def _kind_name(t: type) -> str:
    return {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number",
            bool: "true/false", type(None): "null"}.get(t, t.__name__)


def _kind(value: Any) -> str:
    return "null" if value is None else _kind_name(type(value))


def validate_manifest(manifest: Any, where: str | Path) -> dict:
    """Check a loaded manifest's format, version and shape; a one-line CacheFormatError names the first fault."""
    if not isinstance(manifest, dict):
        raise CacheFormatError(f"{where} is not a {FORMAT_NAME} manifest (it holds {_kind(manifest)}, not an "
                               "object); the manifest is corrupt")
    if manifest.get("format") != FORMAT_NAME:
        raise CacheFormatError(f"{where} is not a {FORMAT_NAME} manifest (format={manifest.get('format')!r})")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise CacheFormatError(
            f"{str(where).rsplit('/', 1)[0]} has cache format version {version}, this package (v{__version__}) reads "
            f"version {FORMAT_VERSION}; use a matching package version or rewrite the cache"
        )
    if manifest.get("dtype") not in DTYPES:
        raise CacheFormatError(f"{where}: unknown dtype {manifest.get('dtype')!r}; expected one of {', '.join(DTYPES)}")
    error = _schema_error(manifest, SCHEMA, "manifest")
    if error is None and manifest["backend"] not in ("zarr", "arrow"):
        error = f"`manifest.backend` is {manifest['backend']!r}, expected 'zarr' or 'arrow'"
    if error:
        raise CacheFormatError(f"{where}: {error}; the manifest is corrupt (restore it, or write the cache again)")
    return manifest


def write_manifest(cache_dir: Path, manifest: dict) -> None:
    atomic_write_bytes(Path(cache_dir) / MANIFEST_FILE, (json.dumps(manifest, indent=1) + "\n").encode())


def manifest_hash(manifest: dict) -> str:
    """Identifies a cache's content (config and shard checksums) for provenance of what trains on it."""
    content = {
        "config": manifest["config"],
        "splits": {s: [sh["files"] for sh in v["shards"]] for s, v in manifest["splits"].items()},
    }
    return hashlib.sha256(canonical_json(content).encode()).hexdigest()[:16]
