"""Sharing on the Hugging Face Hub: push and pull caches, push SAEs, read caches remotely.

One import for the whole feature; each part lives in its own module:
- `hub.push`: upload plans (`plan_cache_push`, `plan_sae_push`), `push_cache`, `push_saes`, and
  `HubUploader` (uploads a cache while the writer commits it);
- `hub.pull`: `pull_cache` (all, or some hooks / one split / a shard range, verified);
- `hub.stream`: `open_remote_cache` (hf:// or any fsspec URL, shards fetched on first use);
- `hub.card`: the generated README.md cards; `hub.common`: token, redaction, remote listing.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.hub.common import parse_shards, resolve_token
from pipeline.hub.pull import pull_cache
from pipeline.hub.push import (
    HubUploader, PushConfig, PushPlan, find_saes, plan_cache_push, plan_sae_push, push_cache, push_saes,
)
from pipeline.hub.stream import RemoteCache, is_remote, open_remote_cache
from pipeline.manifest import MANIFEST_FILE

HF_PREFIX = "hf://datasets/"

__all__ = [
    "HubUploader", "PushConfig", "PushPlan", "RemoteCache", "find_saes", "hub_repo_of", "is_cache", "is_remote",
    "open_remote_cache", "parse_shards", "plan", "plan_cache_push", "plan_sae_push", "pull_cache", "push",
    "push_cache", "push_saes", "resolve_token",
]


def hub_repo_of(out: str) -> str | None:
    """'ORG/NAME' for an `--out hf://datasets/ORG/NAME`, else None (a local directory)."""
    return out[len(HF_PREFIX):].strip("/") if out.startswith(HF_PREFIX) else None


def is_cache(path: str | Path) -> bool:
    """Whether `path` is a cache directory (else it should hold SAE exports)."""
    return (Path(path) / MANIFEST_FILE).is_file()


def plan(path: str | Path, repo_id: str, config: PushConfig | None = None) -> PushPlan:
    """What a first push of a cache or of SAE exports would send (nothing is contacted)."""
    if is_cache(path):
        return plan_cache_push(path, repo_id, {}, config=config)
    return plan_sae_push(path, repo_id, {}, config=config)


def push(path: str | Path, repo_id: str, **kwargs) -> PushPlan:
    """Push a cache (a directory with manifest.json) or SAE exports (cfg.json + weights), detected."""
    if is_cache(path):
        return push_cache(path, repo_id, **kwargs)
    return push_saes(path, repo_id, **kwargs)
