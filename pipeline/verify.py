"""`pipeline verify` and `pipeline info`: check every shard against the manifest; show a cache."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from pipeline.backends import files_of_entry, shard_entry_name
from pipeline.errors import CacheFormatError, PipelineError
from pipeline.integrity import VerifiedRecord, check_file
from pipeline.manifest import MANIFEST_FILE, SPLITS, read_manifest

INDEX_FILES = ("state.json", "dataset_info.json")  # an Arrow table's `datasets` index, not a shard
SHARD_NAME = re.compile(r"^(?P<prefix>.*)shard-(?P<index>\d+)$")


def verify_cache(path: str | Path) -> tuple[list[str], dict]:
    """Check every claimed file's size and xxh3 checksum, then the manifest against itself and the
    directory (`manifest_problems`). Returns (problems, manifest)."""
    path = Path(path)
    manifest = read_manifest(path)
    record = VerifiedRecord(path)  # what is found here spares the loader hashing the files again
    problems, bad = [], set()
    for split, info in manifest["splits"].items():
        for shard in info["shards"]:
            for rel, expect in shard["files"].items():
                problem = check_file(record, rel, expect, reuse=False)
                if problem is not None:
                    problems.append(f"shard {split}/{shard['name']} ({rel}): {problem}")
                    bad.add((split, shard["name"]))
    record.save()
    return problems + manifest_problems(path, manifest, bad), manifest


def manifest_problems(path: Path, manifest: dict, bad: set[tuple[str, str]] = frozenset()) -> list[str]:
    """What the manifest claims that it or the directory contradicts (`consistency_problems`), and
    token rows outside their shard's contexts. Shards in `bad` (failed checksums) are not read."""
    from pipeline.reader import Cache

    problems = consistency_problems(path, manifest)
    cache = Cache(path)
    for split in SPLITS:
        offset = 0
        for i, shard in enumerate(manifest["splits"][split]["shards"]):
            start = shard.get("sequence_offset", offset)
            offset += shard["sequences"]
            if (split, shard["name"]) not in bad:
                problems += _shard_content(cache, split, i, shard, start)
    return problems


def consistency_problems(path: Path, manifest: dict) -> list[str]:
    """What the manifest and the directory listing say against each other, with no shard read: gaps
    in shard names, files and folders the manifest does not list (in a complete cache), totals and
    statistics that do not add up. A partial pull is a range of shards with the full cache's
    statistics: names and statistics are not checked."""
    problems = []
    partial = bool(manifest.get("partial"))
    for split in SPLITS:
        info = manifest["splits"][split]
        shards = info["shards"]
        for key in ("rows", "sequences"):
            total = sum(s[key] for s in shards)
            if total != info[key]:
                problems.append(f"split {split}: its shards hold {total:,} {key}, "
                                f"the manifest's total says {info[key]:,}")
        if not partial:
            problems += _name_gaps(split, [s["name"] for s in shards])
        if manifest["complete"] and not partial:  # a pull leaves out (and may keep) shards that failed
            problems += _unlisted_files(path, manifest, split)
    if manifest["complete"] and not partial:
        problems += _unlisted_folders(path, manifest)
    if not partial:
        rows = manifest["splits"]["train"]["rows"]
        for hook, h in manifest["hooks"].items():
            stats = h["stats"]
            if stats.get("count") != rows:
                problems.append(f"hook {hook}: statistics count {stats.get('count')!r} rows, "
                                f"the train split has {rows:,}")
            if stats.get("sum") is not None and len(stats["sum"]) != h["shape"][0]:
                problems.append(f"hook {hook}: statistics sum has {len(stats['sum'])} values, "
                                f"rows have {h['shape'][0]}")
    return problems


def refuse_inconsistent(path: str | Path) -> None:
    """Refuse to train on a cache of ours whose manifest contradicts itself or its directory (a
    shard dropped from it, edited counts): the cheap part of `pipeline verify`, no shard read."""
    path = Path(path)
    if not (path / MANIFEST_FILE).is_file():
        return  # not a cache of ours (a SAELens cache): the loader knows what to do
    problems = consistency_problems(path, read_manifest(path))
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CacheFormatError(f"cache {path} contradicts its manifest: {problems[0]}{more}; "
                               f"`pipeline verify {path}` lists every problem")


def _unlisted_folders(path: Path, manifest: dict) -> list[str]:
    """Folders where a cache has only its own: a run or a cache written inside it (`--out` into a
    cache). Files at the top (a Hub card) and hidden folders (the Hub's download cache) are left be."""
    from pipeline.writer import PARTS_DIR  # here: `pipeline info` and `verify` load no torch before they must

    expected = {"": {"hooks", "tokens", PARTS_DIR}, "hooks": set(manifest["hooks"]),
                "tokens": set(SPLITS) if manifest["has_tokens"] else set()}
    expected.update({f"hooks/{h}": set(SPLITS) for h in manifest["hooks"]})
    problems = []
    for where, names in expected.items():
        directory = path / where
        if not directory.is_dir():
            continue
        for entry in sorted(directory.iterdir()):
            if entry.is_dir() and entry.name not in names and not (where == "" and entry.name.startswith(".")):
                rel = f"{where}/{entry.name}" if where else entry.name
                problems.append(f"{rel}/ is a folder the cache does not have (something written inside the "
                                "cache: move it out)")
    return problems


def _name_gaps(split: str, names: list[str]) -> list[str]:
    """Shard names must count up from shard-00000 (per rank prefix, for caches written by several ranks)."""
    problems, expected = [], {}
    for name in names:
        m = SHARD_NAME.match(name)
        if m is None:
            problems.append(f"split {split}: shard name {name!r} is not of the form shard-NNNNN")
            continue
        prefix, index = m["prefix"], int(m["index"])
        want = expected.get(prefix, 0)
        if index != want:
            problems.append(f"split {split}: shard {name} follows {prefix}shard-{want - 1:05d} in the manifest "
                            f"(expected {prefix}shard-{want:05d}: shards are missing from the manifest "
                            "or out of order)")
        expected[prefix] = index + 1
    return problems


def _unlisted_files(path: Path, manifest: dict, split: str) -> list[str]:
    """Shard entries and files in the tables' directories that the manifest does not list."""
    backend = manifest["backend"]
    listed = {rel for s in manifest["splits"][split]["shards"] for rel in s["files"]}
    claimed = {shard_entry_name(backend, s["name"]) for s in manifest["splits"][split]["shards"]}
    tables = [f"hooks/{d.name}/{split}" for d in sorted((path / "hooks").glob("*")) if d.is_dir()]
    tables += [f"tokens/{split}/rows", f"tokens/{split}/sequences"]
    problems = []
    for table in tables:
        directory = path / table
        if not directory.is_dir():
            continue
        for entry in sorted(directory.iterdir()):
            if entry.name in INDEX_FILES:
                continue
            if entry.name not in claimed:
                problems.append(f"{table}/{entry.name} is on disk but not in the manifest (a shard the manifest "
                                "lost, or a leftover: remove it)")
                continue
            extra = [f for f in files_of_entry(entry) if f.relative_to(path).as_posix() not in listed]
            if extra:
                problems.append(f"{table}/{entry.name}: {len(extra)} file(s) the manifest does not list "
                                f"(e.g. {extra[0].relative_to(path).as_posix()})")
    return problems


def _shard_content(cache, split: str, index: int, shard: dict, start: int) -> list[str]:
    """The shard's tables hold its rows, and its token rows point inside its own contexts."""
    label = f"shard {split}/{shard['name']}"
    tables = {rel.split("/" + split + "/")[0] for rel in shard["files"]}
    try:
        for hook in cache.hooks:
            if f"hooks/{hook}" in tables:
                cache.activations(hook, split, index)  # the manifest's row count against the file's
        if not cache.manifest["has_tokens"] or "tokens" not in tables:
            return []
        tok = np.asarray(cache.tokens(split, index))
        seqs = np.asarray(cache.sequences(split, index))
    except PipelineError as e:
        return [f"{label}: {e}"]
    context = cache.manifest["context_size"]
    if seqs.shape != (shard["sequences"], context):
        return [f"{label}: its sequences table is {seqs.shape}, the manifest says ({shard['sequences']}, {context})"]
    local = tok[:, 1].astype(np.int64) - start
    outside = (local < 0) | (local >= len(seqs)) | (tok[:, 2] < 0) | (tok[:, 2] >= context)
    if outside.any():
        r = int(np.flatnonzero(outside)[0])
        return [f"{label}: {int(outside.sum()):,} token rows point outside its contexts (sequences "
                f"{start:,}..{start + len(seqs) - 1:,}, positions 0..{context - 1}; e.g. row {r}: sequence "
                f"{int(tok[r, 1]):,}, position {int(tok[r, 2])})"]
    wrong = seqs[local, tok[:, 2]] != tok[:, 0]
    if wrong.any():
        return [f"{label}: {int(wrong.sum()):,} token rows disagree with the token at their sequence and position"]
    return []


def render_info(path: str | Path) -> None:
    """Print a cache's manifest as readable tables."""
    from rich.table import Table

    from pipeline.console import log_console

    manifest = read_manifest(path)
    console = log_console()
    prov = manifest["provenance"]
    head = Table(title=f"cache {path}", show_header=False)
    head.add_column(style="bold")
    head.add_column()
    rows = [
        ("format", f"{manifest['format']} v{manifest['format_version']} ({manifest['backend']}"
                   f"{', ' + manifest['compression'] if manifest['compression'] else ''})"),
        ("complete", str(manifest["complete"])),
        ("dtype", manifest["dtype"]),
        ("model", str((prov.get("model") or {}).get("name"))),
        ("dataset", str((prov.get("dataset") or {}).get("name"))),
        ("context size", str(manifest.get("context_size"))),
        ("created", manifest["created"]),
        ("package version", manifest["package_version"]),
        ("command", str(prov.get("command"))),
    ]
    for k, v in rows:
        head.add_row(k, v)
    console.print(head)
    hooks = Table(title="hooks")
    for col in ("hook", "d", "dtype", "mean norm", "train rows"):
        hooks.add_column(col)
    for name, h in manifest["hooks"].items():
        mn = h["stats"]["mean_norm"]
        mean_norm = "-" if mn is None else f"{mn:.4g}"
        hooks.add_row(name, str(h["shape"][0]), h["dtype"], mean_norm, str(h["stats"]["count"]))
    console.print(hooks)
    splits = Table(title="splits")
    for col in ("split", "rows", "sequences", "shards", "bytes"):
        splits.add_column(col)
    for split, info in manifest["splits"].items():
        size = sum(f["bytes"] for s in info["shards"] for f in s["files"].values())
        splits.add_row(split, f"{info['rows']:,}", f"{info['sequences']:,}", str(len(info["shards"])), f"{size:,}")
    console.print(splits)
