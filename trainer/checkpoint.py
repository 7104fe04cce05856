"""Checkpoints of a training stack: weights and buffers, optimizer state, loop and loader position.

Tensors go to safetensors, the rest to JSON; nothing is pickled. A checkpoint directory is
written under a temporary name and renamed into place, so a crash leaves the previous one whole.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file

from pipeline.errors import PipelineError
from pipeline.files import save_safetensors
from pipeline.manifest import fsync_dir

CHECKPOINT = "checkpoint"
LOOP_TENSORS = "loop.safetensors"


def _flat(named: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One dict of tensors for every stack, keys prefixed with the stack's name ("" for none)."""
    return {(f"{name}.{k}" if name else k): v.detach().to("cpu").contiguous()
            for name, part in named.items() for k, v in part.items()}


def _split(flat: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    if not name:
        return flat
    prefix = name + "."
    return {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}


def save_checkpoint(run_dir: str | Path, stacks: Mapping[str, tuple], state: dict,
                    tensors: Mapping[str, Mapping[str, torch.Tensor]] | None = None) -> Path:
    """Write `run_dir/checkpoint` atomically: `stacks` maps a name to (model, optimizer) — several
    stacks (a sweep) share one checkpoint, so they always resume from the same step; `state` is
    JSON (step, tokens, loader state, config); `tensors` maps a stack's name to the loop's own
    tensors (its logging window's firing counts), which `load_checkpoint` returns as state["tensors"]."""
    run_dir = Path(run_dir)
    final, tmp = run_dir / CHECKPOINT, run_dir / (CHECKPOINT + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_safetensors(_flat({n: m.state_dict() for n, (m, _) in stacks.items()}), str(tmp / "model.safetensors"))
    save_safetensors(_flat({n: o.state_dict() for n, (_, o) in stacks.items()}), str(tmp / "optimizer.safetensors"))
    if tensors:
        save_safetensors(_flat(tensors), str(tmp / LOOP_TENSORS))
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    old = run_dir / (CHECKPOINT + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    fsync_dir(run_dir)
    shutil.rmtree(old, ignore_errors=True)
    return final


def has_checkpoint(run_dir: str | Path) -> bool:
    """Whether `run_dir` holds a checkpoint that `load_checkpoint` resumes (.old included)."""
    return any((Path(run_dir) / name / "state.json").is_file() for name in (CHECKPOINT, CHECKPOINT + ".old"))


def load_checkpoint(run_dir: str | Path, stacks: Mapping[str, tuple], config: dict) -> dict | None:
    """Restore a checkpoint into each (model, optimizer) of `stacks`; returns its state, or None if
    there is none.

    A checkpoint written with another config is refused, naming the first field that differs.
    """
    path = Path(run_dir) / CHECKPOINT
    if not (path / "state.json").is_file():
        # A kill between save_checkpoint's two renames leaves the previous checkpoint only as .old:
        # named back, so that a resume with no step left to take (no new checkpoint) leaves it right.
        old = Path(run_dir) / (CHECKPOINT + ".old")
        if (old / "state.json").is_file() and not path.exists():
            try:
                old.rename(path)
                fsync_dir(Path(run_dir))
            except OSError:  # another rank of a data-parallel run named it back first
                pass
        if not (path / "state.json").is_file():
            path = old
            if not (path / "state.json").is_file():
                return None
    state = json.loads((path / "state.json").read_text())
    for key in sorted(set(config) | set(state.get("config", {}))):
        if key not in ("tokens", "log_every") and config.get(key) != state.get("config", {}).get(key):
            raise PipelineError(
                f"checkpoint in {run_dir} is from another config ({key}: checkpoint "
                f"{state.get('config', {}).get(key)!r}, now {config.get(key)!r}); "
                "use another --out or the same settings"
            )
    models, opts = load_file(str(path / "model.safetensors")), load_file(str(path / "optimizer.safetensors"))
    for name, (model, opt) in stacks.items():
        device = next(model.parameters()).device
        model.load_state_dict({k: v.to(device) for k, v in _split(models, name).items()})
        opt.load_state_dict({k: v.to(device) for k, v in _split(opts, name).items()})
    loop = load_file(str(path / LOOP_TENSORS)) if (path / LOOP_TENSORS).is_file() else {}
    state["tensors"] = {name: _split(loop, name) for name in stacks}  # empty from a checkpoint before them
    return state


def truncate_metrics(path: str | Path, tokens: int) -> None:
    """Keep the lines of a metrics JSONL file up to `tokens` (the checkpoint a run resumes from; 0
    for a fresh run): later ones were logged by steps the resumed run takes again, and a kill
    mid-write leaves a torn last line. Rewritten atomically, only when something goes."""
    path = Path(path)
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    keep = []
    for line in lines:
        try:
            if json.loads(line)["tokens"] <= tokens:
                keep.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue  # torn
    if len(keep) == len(lines):
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(keep))
    os.replace(tmp, path)
