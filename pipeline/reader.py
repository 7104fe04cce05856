"""Read a cache's shards as arrays: the building block of the loader, `verify`, and evaluation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.backends import read_table
from pipeline.errors import PipelineError
from pipeline.manifest import SPLITS, read_manifest
from pipeline.stored import from_stored
from pipeline.writer import TOKEN_COLUMNS


class Cache:
    """An opened cache: its manifest and memory-mapped access to each shard."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.backend: str = self.manifest["backend"]
        self.dtype: str = self.manifest["dtype"]
        self.hooks: dict[str, int] = {h: v["shape"][0] for h, v in self.manifest["hooks"].items()}

    def check_hook(self, hook: str) -> str:
        if hook not in self.hooks:
            raise PipelineError(f"hook {hook!r} is not in cache {self.path}; it has: {', '.join(self.hooks)}")
        return hook

    def hook_stats(self, hook: str) -> dict:
        """Train-split statistics written with the cache: count, mean_norm, mean, ..."""
        return self.manifest["hooks"][self.check_hook(hook)]["stats"]

    def shards(self, split: str = "train") -> list[dict]:
        if split not in SPLITS:
            raise PipelineError(f"unknown split {split!r}; use 'train' or 'eval'")
        return self.manifest["splits"][split]["shards"]

    def rows(self, split: str = "train") -> int:
        return self.manifest["splits"][split]["rows"]

    def activations(self, hook: str, split: str, shard: int) -> np.ndarray:
        """(rows, d) as stored (bfloat16 as uint16 bit patterns), memory-mapped when uncompressed."""
        entry = self.shards(split)[shard]
        return read_table(self.backend, self.path, f"hooks/{self.check_hook(hook)}/{split}", entry["name"], hook,
                          rows=entry["rows"])

    def activations_tensor(self, hook: str, split: str, shard: int) -> torch.Tensor:
        """(rows, d) in the stored dtype as a torch tensor (bfloat16 viewed back from its bits)."""
        return from_stored(self.activations(hook, split, shard), self.dtype)

    def tokens(self, split: str, shard: int) -> np.ndarray:
        """(rows, 3) int32: token id, sequence index (into the split's sequences table), position."""
        self._need_tokens()
        entry = self.shards(split)[shard]
        cols = [read_table(self.backend, self.path, f"tokens/{split}/rows", entry["name"], c, rows=entry["rows"])
                for c in TOKEN_COLUMNS]
        return np.stack(cols, axis=1)

    def sequences(self, split: str, shard: int) -> np.ndarray:
        """(n_sequences, context_size) int32 token ids of the shard's whole contexts."""
        self._need_tokens()
        entry = self.shards(split)[shard]
        return read_table(self.backend, self.path, f"tokens/{split}/sequences", entry["name"], "token_ids")

    def read_split(self, hook: str, split: str = "train") -> torch.Tensor:
        """All rows of one hook in one split, in disk order (small caches, tests, evaluation)."""
        parts = [self.activations_tensor(hook, split, i) for i in range(len(self.shards(split)))]
        if not parts:
            return torch.zeros(0, self.hooks[hook])
        return torch.cat([p.clone() for p in parts])

    def _need_tokens(self) -> None:
        if not self.manifest["has_tokens"]:
            raise PipelineError(f"cache {self.path} stores no tokens (its source had none)")
