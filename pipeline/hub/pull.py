"""Pull a cache (all of it, or some hooks / one split / a shard range) from a Hub dataset repo.

Files come through huggingface_hub's own cache (`hf_hub_download`, so HF_HUB_CACHE,
HF_HUB_OFFLINE, resumed downloads and tokens work as everywhere else) and are hard-linked into
OUT (copied across filesystems). Every file is checked against the manifest's size and xxh3: a bad
one is fetched again once; a shard still bad is named, and the good shards stay, listed in OUT's
manifest. A partial pull is a valid cache of its own: its manifest lists only what was pulled and
says so under `partial`.
"""

from __future__ import annotations

import concurrent.futures
import copy
import json
import os
import re
import shutil
from pathlib import Path

from pipeline.backends import shard_entry_name
from pipeline.errors import CacheFormatError, PipelineError
from pipeline.hub.common import CACHE_REPO_TYPE, optional_token, parse_shards
from pipeline.manifest import MANIFEST_FILE, SPLITS, atomic_write_bytes, read_manifest, write_manifest
from pipeline.integrity import file_checksum

COMMIT_HASH = re.compile(r"[0-9a-f]{40}")


def _download(repo_id: str, filename: str, revision: str | None, cache_dir: str | Path | None, token: str | None,
              force: bool = False) -> Path:
    import huggingface_hub

    # Looked up on the module at call time, so tests (and users) can wrap it.
    return Path(huggingface_hub.hf_hub_download(repo_id, filename, repo_type=CACHE_REPO_TYPE, revision=revision,
                                                cache_dir=cache_dir, token=token, force_download=force))


def fetch_manifest(repo_id: str, revision: str | None = None, cache_dir: str | Path | None = None,
                   token: str | None = None) -> tuple[dict, str | None]:
    """The repo's manifest (validated) and the commit it was read at (pins every later download)."""
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        path = _download(repo_id, MANIFEST_FILE, revision, cache_dir, token)
    except RepositoryNotFoundError:
        raise PipelineError(f"dataset repo {repo_id} not found (a private repo needs a login: "
                            "`hf auth login` or HF_TOKEN)") from None
    except LocalEntryNotFoundError as e:
        raise PipelineError(f"cannot fetch {repo_id}/{MANIFEST_FILE}: offline and not in the local Hub cache "
                            f"({str(e).splitlines()[0]}); go online or unset HF_HUB_OFFLINE") from None
    except EntryNotFoundError:
        raise PipelineError(f"repo {repo_id} has no {MANIFEST_FILE}: it is not an activation cache "
                            "(or its push has not finished: rerun `pipeline push`)") from None
    try:
        manifest = read_manifest(path.parent)
    except CacheFormatError as e:
        raise PipelineError(f"repo {repo_id}: {e}") from None
    commit = path.parent.name if COMMIT_HASH.fullmatch(path.parent.name) else revision
    return manifest, commit


def select(manifest: dict, hooks: list[str] | None, split: str | None, shards: str | None) -> dict:
    """The manifest of the requested part: hooks, splits and shards, each shard listing only its pulled files."""
    names = list(manifest["hooks"])
    hooks = names if hooks is None else ([hooks] if isinstance(hooks, str) else list(hooks))
    missing = [h for h in hooks if h not in manifest["hooks"]]
    if missing:
        raise PipelineError(f"the cache has no hook {', '.join(map(repr, missing))}; it has: {', '.join(names)}")
    if split is not None and split not in SPLITS:
        raise PipelineError(f"unknown split {split!r}; use 'train' or 'eval'")
    splits = SPLITS if split is None else (split,)
    span = parse_shards(shards)
    part = copy.deepcopy(manifest)
    part["hooks"] = {h: manifest["hooks"][h] for h in hooks}
    for s in SPLITS:
        offset, chosen = 0, []
        all_shards = manifest["splits"][s]["shards"]
        picked = set(range(len(all_shards))[span]) if s in splits else set()
        for i, shard in enumerate(all_shards):
            if i in picked:
                prefixes = tuple(f"hooks/{h}/{s}/" for h in hooks)
                prefixes += (f"tokens/{s}/",) if manifest["has_tokens"] else ()
                entry = dict(shard, files={r: m for r, m in shard["files"].items() if r.startswith(prefixes)})
                entry["sequence_offset"] = offset  # where its sequences sit in the full split's table
                chosen.append(entry)
            offset += shard["sequences"]
        part["splits"][s] = {"rows": sum(x["rows"] for x in chosen), "sequences": sum(x["sequences"] for x in chosen),
                             "shards": chosen}
    whole = set(hooks) == set(names) and len(splits) == len(SPLITS) and span == slice(None)
    part["partial"] = None if whole else {
        "hooks": hooks, "splits": list(splits), "shards": shards,
        "source": {s: {k: manifest["splits"][s][k] for k in ("rows", "sequences")}
                   | {"shards": len(manifest["splits"][s]["shards"])} for s in SPLITS},
        "note": "a part of a larger cache: hook statistics are the full cache's; a shard's tokens/<split>/rows "
                "`sequence` column indexes the full split's sequences (subtract the shard's sequence_offset)",
    }
    return part


def _check_out(out: Path, manifest: dict) -> None:
    if (out / MANIFEST_FILE).is_file():
        here = read_manifest(out)
        if here["config_hash"] != manifest["config_hash"]:
            raise PipelineError(f"{out} holds another cache (config hash {here['config_hash']}, the repo's "
                                f"{manifest['config_hash']}); pull into a new directory")
    elif out.exists() and any(out.iterdir()):
        raise PipelineError(f"{out} is not empty and holds no cache; pull into a new or empty directory")


def _place(src: Path, dest: Path) -> None:
    """Put a downloaded file at `dest`: a hard link to huggingface_hub's cached blob (no second copy)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(src.resolve(), tmp)
    except OSError:  # another filesystem, or links not allowed
        shutil.copyfile(src, tmp)
    os.replace(tmp, dest)


def _good(path: Path, meta: dict) -> bool:
    return path.is_file() and path.stat().st_size == meta["bytes"] and file_checksum(path) == meta["xxh3_64"]


def pull_cache(repo_id: str, out: str | Path, hooks: list[str] | str | None = None, split: str | None = None,
               shards: str | None = None, revision: str | None = None, *, token: str | None = None,
               hub_cache_dir: str | Path | None = None, max_workers: int = 8, log=print) -> Path:
    """Download a cache, or a part of it, from a Hub dataset repo into `out`; returns `out`.

    `hooks`: names (default all); `split`: 'train' or 'eval' (default both); `shards`: a range
    over each pulled split's shards, e.g. '0:10'. Rerunning skips files already in `out`.
    """
    out, token = Path(out), optional_token(token)
    manifest, commit = fetch_manifest(repo_id, revision, hub_cache_dir, token)
    part = select(manifest, hooks, split, shards)
    _check_out(out, manifest)
    out.mkdir(parents=True, exist_ok=True)
    wanted = [(s, i, rel, meta) for s in SPLITS for i, sh in enumerate(part["splits"][s]["shards"])
              for rel, meta in sh["files"].items()]

    def fetch(rel: str, meta: dict) -> str | None:
        """None when the file is in place and good, else why not (after one fresh download)."""
        dest = out / rel
        if _good(dest, meta):
            return None
        reasons = []
        for force in (False, True):  # a bad file is fetched again once, bypassing huggingface_hub's cache
            try:
                _place(_download(repo_id, rel, commit, hub_cache_dir, token, force=force), dest)
            except Exception as e:  # noqa: BLE001 - reported with the shard below
                first = str(e).splitlines()[0] if str(e) else ""
                reasons.append(f"{'fetching it again' if force else 'download'} failed ({type(e).__name__}: {first})")
                continue
            if _good(dest, meta):
                return None
            reasons.append("checksum mismatch" + (" after a fresh download" if force else ""))
            dest.unlink()
        return "; ".join(reasons)

    with concurrent.futures.ThreadPoolExecutor(max(1, max_workers)) as pool:
        results = list(pool.map(lambda w: fetch(w[2], w[3]), wanted))
    bad: dict[tuple[str, int], str] = {}
    for (s, i, rel, _), reason in zip(wanted, results):
        if reason is not None:
            bad.setdefault((s, i), f"{s}/{part['splits'][s]['shards'][i]['name']} ({rel}): {reason}")
    for s in SPLITS:  # keep the good shards: the manifest lists only them
        info = part["splits"][s]
        info["shards"] = [sh for i, sh in enumerate(info["shards"]) if (s, i) not in bad]
        info["rows"] = sum(sh["rows"] for sh in info["shards"])
        info["sequences"] = sum(sh["sequences"] for sh in info["shards"])
    if bad and part["partial"] is None:
        part["partial"] = {"hooks": list(part["hooks"]), "splits": list(SPLITS), "shards": None,
                           "note": "shards that failed their checksum are left out"}
    if part["partial"] is not None:
        part["partial"] |= {"repo": repo_id, "revision": commit}
    _write_arrow_indexes(repo_id, commit, hub_cache_dir, token, out, part)
    if part["partial"] is None:  # the whole cache: its manifest as published
        part.pop("partial")
        for s in SPLITS:
            for sh in part["splits"][s]["shards"]:
                sh.pop("sequence_offset")
    write_manifest(out, part)  # last: the pulled files exist before a manifest lists them
    if bad:
        kept = sum(len(part["splits"][s]["shards"]) for s in SPLITS)
        raise PipelineError(f"{len(bad)} shard(s) of {repo_id} failed verification: {'; '.join(bad.values())}; "
                            f"the {kept} good shards are in {out}; rerun `pipeline pull` to fetch the rest")
    if log:
        size = sum(m["bytes"] for _, _, _, m in wanted)
        log(f"pulled {repo_id}@{(commit or 'main')[:10]} into {out}: {len(wanted)} files, {size / 2**20:,.1f} MiB"
            + (" (partial)" if "partial" in part else ""))
    return out


def _write_arrow_indexes(repo_id: str, commit: str | None, cache_dir, token, out: Path, part: dict) -> None:
    """Arrow: the `datasets` index of every pulled table, listing the pulled shards only."""
    if part["backend"] != "arrow":
        return
    for s in SPLITS:
        names = [shard_entry_name("arrow", sh["name"]) for sh in part["splits"][s]["shards"]]
        if not names:
            continue
        tables = [f"hooks/{h}/{s}" for h in part["hooks"]]
        if part["has_tokens"]:
            tables += [f"tokens/{s}/rows", f"tokens/{s}/sequences"]
        for table in tables:
            state = json.loads(_download(repo_id, f"{table}/state.json", commit, cache_dir, token).read_text())
            state["_data_files"] = [{"filename": n} for n in names]
            state["_fingerprint"] = f"cache-{len(names)}"
            info = _download(repo_id, f"{table}/dataset_info.json", commit, cache_dir, token).read_bytes()
            (out / table).mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(out / table / "dataset_info.json", info)
            atomic_write_bytes(out / table / "state.json", json.dumps(state, indent=2).encode())
