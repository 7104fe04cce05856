"""One cache from the parts several processes wrote (`torchrun ... -m pipeline cache`).

Each rank writes its own shards (`rank00001-shard-00000`, ...) into the cache's tables, with its
own manifest in `ranks/rank-00001/` (its progress: resume works per rank). Once every rank has
closed, rank 0 assembles `manifest.json`: the shards of rank 0, then rank 1, ... per split, the
hooks' statistics summed, and the `sequence` column of `tokens/<split>/rows` re-indexed from the
rank's own numbering to the split-wide one (docs/FORMAT.md), with new checksums.

Re-indexing rewrites files that a rank's manifest lists with their original checksums, and the
offset to add changes when a cache is extended (earlier ranks gain sequences). So what offset a
file holds is told by its checksum: the rank's own (offset 0) or one recorded in
`ranks/reindex.json` *before* the rewritten file is renamed into place; a crash at any point leaves
a state the next assembly recognises.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np

from pipeline.backends import (
    TMP_SUFFIX, files_of_entry, fsync_entry, read_table, remove_entry, stage_table, write_table_index,
)
from pipeline.errors import CacheFormatError, PipelineError
from pipeline.manifest import (
    MANIFEST_FILE, SPLITS, atomic_write_bytes, empty_stats, fsync_dir, read_manifest, write_manifest,
)
from pipeline.integrity import file_checksum
from pipeline.lock import holds_nothing
from pipeline.stats import merge_stats
from pipeline.writer import PARTS_DIR, TOKEN_COLUMNS, part_dir, table_templates

WORLD_FILE = "world.json"
REINDEX_FILE = "reindex.json"


def prepare(path: str | Path, world_size: int, resume: bool, overwrite: bool) -> None:
    """Rank 0, before any rank opens its writer: check, wipe or create the cache directory."""
    path = Path(path)
    parts = path / PARTS_DIR
    ours = (path / MANIFEST_FILE).exists() or (parts / WORLD_FILE).exists()
    if ours and overwrite:
        if (path / MANIFEST_FILE).exists():
            read_manifest(path)  # only ever delete something that is a cache of ours
        for child in ("hooks", "tokens", PARTS_DIR):
            if (path / child).exists():
                shutil.rmtree(path / child)
        (path / MANIFEST_FILE).unlink(missing_ok=True)
    elif ours and resume:
        if not (parts / WORLD_FILE).exists():
            raise PipelineError(f"{path} was written by one process; resume it without torchrun")
        written = json.loads((parts / WORLD_FILE).read_text())["world_size"]
        if written != world_size:
            raise PipelineError(f"{path} was written by {written} processes, this run has {world_size}; "
                                f"resume with a world size of {written} (torchrun --nproc-per-node/--nnodes)")
        _recover(path)
        return
    elif ours:
        raise PipelineError(f"{path} already holds a cache; pass --resume to continue or extend it, "
                            "or --overwrite to replace it")
    elif not holds_nothing(path):
        raise PipelineError(f"{path} is not empty and holds no cache; choose a new or empty directory for --out")
    parts.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(parts / WORLD_FILE, json.dumps({"world_size": world_size}).encode())


def assemble(path: str | Path, world_size: int, complete: bool, batch_size: int | None = None) -> dict:
    """Rank 0, when no rank is committing: write `manifest.json` from the ranks' manifests.

    `batch_size` (sequences per forward batch, batch b on rank b % world_size) turns each shard's
    `units_start` into its position in the source; without it they stay the rank's own."""
    path = Path(path)
    parts = [read_manifest(part_dir(path, r)) for r in range(world_size)]
    m = copy.deepcopy(parts[0])
    m["complete"] = bool(complete and all(p["complete"] for p in parts))
    for hook, info in m["hooks"].items():
        info["stats"] = empty_stats(info["shape"][0])
        for p in parts:
            merge_stats(info["stats"], p["hooks"][hook]["stats"], sign=1)
    reindex = _load_reindex(path)
    groups_before = 0
    for split in SPLITS:
        m["splits"][split] = {"rows": 0, "sequences": 0, "shards": []}
    for r, p in enumerate(parts):
        for split in SPLITS:
            out = m["splits"][split]
            base = out["sequences"]  # the rank's rows count from 0: they move past the earlier ranks'
            for shard in p["splits"][split]["shards"]:
                entry = copy.deepcopy(shard)
                entry["group"] = groups_before + shard["group"]
                if batch_size:
                    u = shard["units_start"]
                    entry["units_start"] = (r + (u // batch_size) * world_size) * batch_size + u % batch_size
                if m["has_tokens"]:
                    entry["files"].update(_reindex(path, m, split, shard, base, reindex))
                out["shards"].append(entry)
                out["rows"] += shard["rows"]
                out["sequences"] += shard["sequences"]
        groups_before += p["progress"]["groups"]
    m["progress"] = {"units": sum(p["progress"]["units"] for p in parts), "groups": groups_before,
                     "final_partial": any(p["progress"]["final_partial"] for p in parts)}
    if m["backend"] == "arrow":
        for split in SPLITS:
            names = [s["name"] for s in m["splits"][split]["shards"]]
            templates = table_templates({h: v["shape"][0] for h, v in m["hooks"].items()}, m["dtype"],
                                        m["has_tokens"], split, m["context_size"])
            for table, columns in templates.items():
                if (path / table).is_dir():
                    write_table_index("arrow", path, table, names, columns)
    write_manifest(path, m)
    return m


# ----------------------------------------------------------------------------------- re-indexing


def _load_reindex(path: Path) -> dict:
    f = path / PARTS_DIR / REINDEX_FILE
    return json.loads(f.read_text()) if f.exists() else {}


def _save_reindex(path: Path, reindex: dict) -> None:
    atomic_write_bytes(path / PARTS_DIR / REINDEX_FILE, json.dumps(reindex, indent=1).encode())


def _rows_files(shard: dict, split: str) -> dict[str, dict]:
    prefix = f"tokens/{split}/rows/"
    return {rel: v for rel, v in shard["files"].items() if rel.startswith(prefix)}


def _reindex(path: Path, m: dict, split: str, shard: dict, offset: int, reindex: dict) -> dict[str, dict]:
    """Make the shard's token rows hold split-wide sequence indices (the rank's own + `offset`);
    returns their files' sizes and checksums."""
    key = f"{split}/{shard['name']}"
    original = _rows_files(shard, split)
    on_disk = {rel: {"bytes": (path / rel).stat().st_size, "xxh3_64": file_checksum(path / rel)}
               for rel in original if (path / rel).is_file()}
    versions = [{"offset": 0, "files": original}] + reindex.get(key, [])
    applied = next((v["offset"] for v in versions if v["files"] == on_disk), None)
    if applied is None:
        raise CacheFormatError(f"token rows of shard {key} in {path} match no version the writer made; "
                               "the cache is corrupt: rewrite it with --overwrite")
    if applied == offset:
        return on_disk
    table = f"tokens/{split}/rows"
    columns = {c: np.array(read_table(m["backend"], path, table, shard["name"], c, rows=shard["rows"]))
               for c in TOKEN_COLUMNS}
    columns["sequence"] += np.int32(offset - applied)
    tmp, final = stage_table(m["backend"], path, table, shard["name"], columns, m["compression"])
    fsync_entry(tmp)
    files = {}
    for f in files_of_entry(tmp):
        rel = (final / f.relative_to(tmp)) if tmp.is_dir() else final
        files[rel.relative_to(path).as_posix()] = {"bytes": f.stat().st_size, "xxh3_64": file_checksum(f)}
    # Recorded before the swap: whichever version a crash leaves on disk is one we know.
    reindex[key] = [v for v in reindex.get(key, []) if v["offset"] != offset] + [{"offset": offset, "files": files}]
    _save_reindex(path, reindex)
    remove_entry(final)
    tmp.rename(final)
    fsync_dir(final.parent)
    return files


def _recover(path: Path) -> None:
    """Finish a swap a crash interrupted (the old rows removed, the new ones still under *.tmp)."""
    reindex = _load_reindex(path)
    for split in SPLITS:
        directory = path / "tokens" / split / "rows"
        if not directory.is_dir():
            continue
        for tmp in directory.glob(f"rank*{TMP_SUFFIX}"):
            final = tmp.with_name(tmp.name[: -len(TMP_SUFFIX)])
            name = final.name.removesuffix(".arrow")
            if final.exists() or f"{split}/{name}" not in reindex:
                continue  # a rank's own uncommitted shard: its writer removes it on resume
            known = [v["files"] for v in reindex[f"{split}/{name}"]]
            files = {}
            for f in files_of_entry(tmp):
                rel = (final / f.relative_to(tmp)) if tmp.is_dir() else final
                files[rel.relative_to(path).as_posix()] = {"bytes": f.stat().st_size, "xxh3_64": file_checksum(f)}
            if files in known:
                tmp.rename(final)
                fsync_dir(directory)
