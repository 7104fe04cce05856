"""Read a cache straight from a remote filesystem (`hf://datasets/ORG/NAME`, or any fsspec URL).

`open_remote_cache(url)` downloads the manifest and returns a `RemoteCache`: a `pipeline.reader.Cache`
over a local mirror directory that fetches each shard's files on first access (through the fsspec
filesystem: `HfFileSystem` for hf://), checks them against the manifest's xxh3, and keeps them. So
only the hooks and split a loader asks for are ever downloaded, and a second run reads from disk.

Whole files, not fsspec's "blockcache": the loader memory-maps shards, which needs real files laid
out as the cache (fsspec's "filecache" stores files under hashed names, which Zarr directories and
`np.memmap` cannot use). The mirror is that file cache, keyed by URL.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from pathlib import Path

import numpy as np

from pipeline.backends import shard_entry_name
from pipeline.errors import CacheFormatError, PipelineError
from pipeline.manifest import MANIFEST_FILE, SPLITS, atomic_write_bytes, validate_manifest
from pipeline.reader import Cache
from pipeline.integrity import file_checksum

DEFAULT_MIRROR_ROOT = Path("~/.cache/sae-pipeline/remote")


def is_remote(path) -> bool:
    """Whether a cache path names a remote filesystem (hf://, s3://, memory://, ...) rather than a directory."""
    return isinstance(path, str) and "://" in path and not path.startswith("file://")


def mirror_dir(url: str, root: str | Path | None = None) -> Path:
    """Where a remote cache's files are kept locally: a readable name plus a hash of the URL."""
    root = Path(root or os.environ.get("SAE_PIPELINE_REMOTE_CACHE") or DEFAULT_MIRROR_ROOT).expanduser()
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", url.split("://", 1)[-1]).strip("_")[-80:]
    return root / f"{slug}-{hashlib.sha256(url.encode()).hexdigest()[:12]}"


def _listed(manifest: dict) -> dict[str, dict]:
    return {rel: meta for s in SPLITS for sh in manifest["splits"][s]["shards"] for rel, meta in sh["files"].items()}


class RemoteCache(Cache):
    """A cache whose shards live on a remote filesystem, fetched whole into `path` on first use."""

    def __init__(self, local: Path, fs, root: str, url: str):
        super().__init__(local)
        self.fs, self.root, self.url = fs, root.rstrip("/"), url
        self._lock = threading.Lock()

    def activations(self, hook: str, split: str, shard: int) -> np.ndarray:
        self._ensure(f"hooks/{self.check_hook(hook)}/{split}", split, shard)
        return super().activations(hook, split, shard)

    def tokens(self, split: str, shard: int) -> np.ndarray:
        self._ensure(f"tokens/{split}/rows", split, shard)
        return super().tokens(split, shard)

    def sequences(self, split: str, shard: int) -> np.ndarray:
        self._ensure(f"tokens/{split}/sequences", split, shard)
        return super().sequences(split, shard)

    def _ensure(self, table: str, split: str, shard: int) -> None:
        """Fetch the files of one table's shard that the mirror lacks (verified, then renamed into place)."""
        entry = self.shards(split)[shard]
        head = f"{table}/{shard_entry_name(self.backend, entry['name'])}"
        with self._lock:
            for rel, meta in entry["files"].items():
                if (rel == head or rel.startswith(head + "/")) and not (self.path / rel).is_file():
                    self._fetch(rel, meta, f"{split}/{entry['name']}")

    def _fetch(self, rel: str, meta: dict, label: str) -> None:
        dest = self.path / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".tmp")
        for attempt in range(2):  # a bad transfer is fetched again once
            try:
                self.fs.get_file(f"{self.root}/{rel}", str(tmp))
            except FileNotFoundError:
                raise PipelineError(f"shard {label} of {self.url}: {rel} is missing on the remote; "
                                    "the cache there is incomplete (push it again)") from None
            if tmp.stat().st_size == meta["bytes"] and file_checksum(tmp) == meta["xxh3_64"]:
                os.replace(tmp, dest)
                return
        tmp.unlink()
        raise PipelineError(f"shard {label} of {self.url}: {rel} fails its checksum after two downloads; "
                            "the remote copy is corrupt (push it again)")


def open_remote_cache(url: str, fs=None, cache_dir: str | Path | None = None) -> RemoteCache:
    """Open a remote cache for reading: `pipeline.loader`'s `open_source` can return this for a URL.

    `fs` is an fsspec filesystem (tests pass `fsspec.filesystem("memory")` or "file"); by default
    it comes from the URL (`hf://` is huggingface_hub's `HfFileSystem`, which uses your login or
    HF_TOKEN for private repos). `cache_dir` is the local mirror (default under
    ~/.cache/sae-pipeline/remote, or $SAE_PIPELINE_REMOTE_CACHE).
    """
    import fsspec

    if fs is None:
        fs, root = fsspec.core.url_to_fs(url)
    else:
        root = fs._strip_protocol(url)
    local = Path(cache_dir) if cache_dir is not None else mirror_dir(url)
    try:
        data = fs.cat_file(f"{root.rstrip('/')}/{MANIFEST_FILE}")
    except FileNotFoundError:
        raise PipelineError(f"{url} is not an activation cache (no {MANIFEST_FILE}); check the URL, "
                            "or push the cache first (`pipeline push`)") from None
    except Exception as e:  # noqa: BLE001 - offline, no access, network: one line, not a traceback
        first = str(e).splitlines()[0] if str(e) else ""
        raise PipelineError(f"cannot read {url}/{MANIFEST_FILE} ({type(e).__name__}: {first}); check the network, "
                            "HF_HUB_OFFLINE, and your login for private repos (`hf auth login` or HF_TOKEN)") from None
    try:
        manifest = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheFormatError(f"{url}/{MANIFEST_FILE} is not valid JSON ({e}); the remote manifest is "
                               "corrupt") from None
    validate_manifest(manifest, f"{url}/{MANIFEST_FILE}")
    local.mkdir(parents=True, exist_ok=True)
    _drop_changed(local, manifest)
    atomic_write_bytes(local / MANIFEST_FILE, data)
    return RemoteCache(local, fs, root, url)


def _drop_changed(local: Path, manifest: dict) -> None:
    """Remove mirrored files the new manifest lists differently (or not at all), so a file present
    in the mirror is always one verified against the current manifest."""
    try:
        old = json.loads((local / MANIFEST_FILE).read_text())
        before = _listed(old)
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return
    now = _listed(manifest) if isinstance(manifest.get("splits"), dict) else {}
    for rel, meta in before.items():
        if now.get(rel) != meta and (local / rel).is_file():
            (local / rel).unlink()
