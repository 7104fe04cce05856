"""Deterministic synthetic activation blocks for format tests (a stand-in for a model)."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.writer import ActivationBlock, CacheWriter, WriterConfig

HOOKS = {"blocks.0.hook_resid_post": 16, "blocks.1.hook_mlp_out": 8}
CONTEXT = 8


def step_blocks(step: int, seqs: int = 3, hooks: dict[str, int] = HOOKS, context: int = CONTEXT,
                scale: float = 1.0) -> list[ActivationBlock]:
    """Source step `step`: `seqs` sequences; every third one goes to eval. Same step, same data."""
    rng = np.random.default_rng(step)
    blocks = []
    ids = [i for i in range(seqs)]
    for split in ("train", "eval"):
        mine = [i for i in ids if (split == "eval") == ((step * seqs + i) % 3 == 2)]
        if not mine:
            continue
        n = len(mine)
        sequences = rng.integers(0, 1000, size=(n, context)).astype(np.int32)
        keep = rng.random((n, context)) > 0.2  # some positions have no row (like BOS)
        seq, pos = np.nonzero(keep)
        acts = {h: torch.from_numpy(rng.standard_normal((len(seq), d)).astype(np.float32) * scale)
                for h, d in hooks.items()}
        blocks.append(ActivationBlock(acts=acts, split=split, token_ids=sequences[seq, pos], sequence=seq,
                                      position=pos, sequences=sequences, units=n))
    return blocks


def write_synthetic(path, n_steps: int, config: WriterConfig | None = None, resume: bool = False,
                    seqs: int = 3, **kwargs) -> dict:
    """Write steps [resume point, n_steps) to a cache; returns the manifest."""
    writer = CacheWriter(path, HOOKS, config or WriterConfig(shard_mb=0.002), has_tokens=True,
                         provenance={"context_size": CONTEXT, "model": None}, resume=resume, **kwargs)
    start = writer.resume_units // seqs
    for step in range(start, n_steps):
        writer.put(step_blocks(step, seqs))
    return writer.close(complete=True)
