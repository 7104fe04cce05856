"""Shard checksums: the one check of a file against its manifest entry, remembered per file, and the
loader's background verifier built on it (`pipeline verify` uses the same check).

What the loader guarantees (`ShardVerifier`): a batch is yielded only after every shard it reads
rows from has been verified, i.e. each file of that shard's tables for the loader's hooks has the
manifest's size and xxh3-64 checksum, checked in this process or recorded as checked by an earlier
one for the same path, size, mtime_ns and checksum. A bad shard stops the run with a one-line
`CacheFormatError` naming it, or, with `skip_bad_shards`, is left out of the shuffle plan before
the first batch (the plan must know it, so the loader then waits for every shard's check).

Hashing runs in a background thread, in the order the epoch's plan first touches the shards, while
the caller sets up (model, optimiser); a batch waits only for shards not yet done (the reading
thread hashes such a shard itself rather than queue behind others). On a cache never checked
before, the first buffer touches most shards of a large split (the block shuffle spans all of
them), so its first batch waits for about one read of the split at disk speed; results are kept
in `VERIFIED_FILE` in the cache (or under ~/.cache/sae-pipeline/verified when the cache is read
only), so later runs hash only files that changed. Caches without checksums (SAELens's) are not
verified. A file altered without changing its size or mtime after its check is not re-read:
`pipeline verify` always re-reads everything.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Iterable

import xxhash

from pipeline.backends import shard_entry_name
from pipeline.errors import CacheFormatError

VERIFIED_FILE = ".verified.json"
"""Per cache: files already checked, {relative path: {bytes, mtime_ns, xxh3_64, problem}}; safe to delete."""
HOME_DIR = Path("~/.cache/sae-pipeline/verified")
MISSING = "file is missing"
SAVE_EVERY_S = 2.0  # the record of checked files is rewritten at most this often while hashing


class BadShardWarning(UserWarning):
    """A shard failed its checksum and is left out (skip_bad_shards)."""


def file_checksum(path: Path) -> str:
    """A file's xxh3-64 (what the manifest records for every file of a shard)."""
    h = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            h.update(chunk)
    return h.hexdigest()


def file_problem(path: Path, expect: dict) -> str | None:
    """Why a shard file differs from its manifest entry (`bytes`, `xxh3_64`), or None when it matches."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return MISSING
    except OSError as e:
        return f"unreadable ({e.strerror})"
    if size != expect["bytes"]:
        return f"{size} bytes, expected {expect['bytes']} (truncated?)"
    try:
        checksum = file_checksum(path)
    except OSError as e:
        return f"unreadable ({e.strerror})"
    return None if checksum == expect["xxh3_64"] else "checksum mismatch (corrupt)"


class VerifiedRecord:
    """The files of one cache already checked, kept in the cache directory if it is writable, else
    under ~/.cache/sae-pipeline/verified; an entry counts only while size, mtime and checksum match."""

    def __init__(self, cache_dir: str | Path):
        self.cache_dir = Path(cache_dir)
        absolute = str(self.cache_dir.resolve())
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", absolute).strip("_")[-60:]
        self.places = [self.cache_dir / VERIFIED_FILE,
                       HOME_DIR.expanduser() / f"{slug}-{hashlib.sha256(absolute.encode()).hexdigest()[:12]}.json"]
        self.entries: dict[str, dict] = {}
        for place in reversed(self.places):  # the cache's own record wins
            self.entries.update(_load(place))
        self.lock = threading.Lock()
        self.dirty = False

    @staticmethod
    def _key(st: os.stat_result, expect: dict) -> dict:
        return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "xxh3_64": expect["xxh3_64"]}

    def lookup(self, rel: str, st: os.stat_result, expect: dict) -> tuple[bool, str | None]:
        """(known, problem): whether this file, as it is now, was checked, and what was found."""
        entry = self.entries.get(rel)
        if entry is None or {k: entry.get(k) for k in ("bytes", "mtime_ns", "xxh3_64")} != self._key(st, expect):
            return False, None
        return True, entry.get("problem")

    def record(self, rel: str, st: os.stat_result, expect: dict, problem: str | None) -> None:
        with self.lock:
            self.entries[rel] = {**self._key(st, expect), "problem": problem}
            self.dirty = True

    def save(self) -> None:
        """Merge into the file on disk (another process may have added entries); best effort."""
        with self.lock:
            if not self.dirty:
                return
            for place in self.places:
                try:
                    merged = {**_load(place), **self.entries}
                    place.parent.mkdir(parents=True, exist_ok=True)
                    # A name of its own: ranks and sweeps of one cache may save at the same time.
                    tmp = place.with_name(f"{place.name}.{os.getpid()}-{threading.get_ident()}.tmp")
                    tmp.write_text(json.dumps(merged, indent=0, sort_keys=True))
                    os.replace(tmp, place)
                    self.dirty = False
                    return
                except OSError:
                    continue  # read-only cache: try the next place; nowhere: results stay in memory


def _load(place: Path) -> dict:
    try:
        data = json.loads(place.read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, dict)} if isinstance(data, dict) else {}


# Checks done or under way in this process, by (file, size, mtime_ns, checksum): two loaders over
# one cache (training and evaluation) never hash a file twice, nor at the same time.
_done: dict[tuple, str | None] = {}
_running: dict[tuple, threading.Event] = {}
_lock = threading.Lock()


def check_file(record: VerifiedRecord, rel: str, expect: dict, reuse: bool = True) -> str | None:
    """`file_problem`, unless this file as it is now was already checked (here or in an earlier run);
    `reuse=False` always hashes it. The result is recorded for later runs."""
    path = record.cache_dir / rel
    try:
        st = path.stat()
    except OSError:
        return file_problem(path, expect)
    if st.st_size != expect["bytes"]:
        return file_problem(path, expect)
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, expect["xxh3_64"])
    while True:
        with _lock:
            if reuse and key in _done:
                return _done[key]
            known, problem = record.lookup(rel, st, expect) if reuse else (False, None)
            if known:
                _done[key] = problem
                return problem
            event = _running.get(key)
            if event is None:
                _running[key] = threading.Event()
                break
        event.wait()  # another thread is hashing this file: take its result
    try:
        problem = file_problem(path, expect)
    except BaseException:
        with _lock:  # no result: a waiting thread takes the file over
            _running.pop(key).set()
        raise
    record.record(rel, st, expect, problem)
    with _lock:
        _done[key] = problem
        _running.pop(key).set()
    return problem


class ShardVerifier:
    """Checks the shards of one split, for the tables of `hooks`, ahead of the loader's reads.

    `order` (called once, in the background thread) gives the shard indexes in the order the plan
    first reads them; `require(shards)` returns once those are verified, raising on a bad one;
    `usable_rows` is what `skip_bad_shards` plans with.
    """

    def __init__(self, source, split: str, hooks: list[str], order: Callable[[], Iterable[int]] | None = None):
        self.source, self.split = source, split
        entries = source.shards(split)
        self.names = [e["name"] for e in entries]
        backend = getattr(source, "backend", None)
        self.files: list[list[tuple[str, dict]]] = []
        for e in entries:
            heads = [f"hooks/{h}/{split}/{shard_entry_name(backend, e['name'])}" for h in hooks]
            self.files.append([(rel, meta) for rel, meta in (e.get("files") or {}).items()
                               if any(rel == head or rel.startswith(head + "/") for head in heads)])
        self.results: dict[int, str | None] = {}
        self.record = VerifiedRecord(source.path) if any(self.files) else None
        self._order = order
        self._stop = threading.Event()
        self._thread = None
        if self.record is not None:
            self._thread = threading.Thread(target=self._run, name="shard-verifier", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        try:
            order, self._order = self._order, None  # do not keep the loader alive through its plan
            shards = list(dict.fromkeys(order())) if order is not None else list(range(len(self.files)))
            del order
            last, missing = time.monotonic(), []
            for s in shards:
                if self._stop.is_set():
                    break
                if self.check(s) is not None and s not in self.results:
                    missing.append(s)  # a file not there yet (a remote mirror fetches on first use)
                if time.monotonic() - last > SAVE_EVERY_S:
                    self.record.save()
                    last = time.monotonic()
            for s in missing:
                if self._stop.is_set():
                    break
                self.check(s)
        except Exception:  # noqa: BLE001 - only a head start: `require` checks (and raises) itself
            pass
        finally:
            self.record.save()

    def check(self, shard: int) -> str | None:
        """The shard's problem ('<file>: checksum mismatch (corrupt)') or None; hashes it if no thread has."""
        if shard in self.results:
            return self.results[shard]
        for rel, meta in self.files[shard]:
            found = check_file(self.record, rel, meta)
            if found == MISSING:
                return f"{rel}: {found}"  # not kept: a file fetched on first use may come
            if found is not None:
                self.results[shard] = f"{rel}: {found}"
                return self.results[shard]
        self.results[shard] = None
        return None

    def label(self, shard: int) -> str:
        return f"{self.split}/{self.names[shard]}"

    def require(self, shards: Iterable[int]) -> None:
        """Return once every shard in `shards` is verified; a bad one raises a one-line CacheFormatError."""
        if self.record is None:
            return
        for s in sorted(set(int(s) for s in shards)):
            problem = self.check(s)
            if problem is not None:
                self.record.save()
                raise CacheFormatError(
                    f"shard {self.label(s)} of {self.source.path} is corrupt ({problem}); run "
                    f"`pipeline verify {self.source.path}` to list every bad shard, rewrite the cache (or pull it "
                    "again), or pass --skip-bad-shards to train without it"
                )

    def usable_rows(self, rows: list[int]) -> list[int]:
        """Row counts with the bad shards' set to 0 (waits for every shard's check), saying which."""
        if self.record is None:
            return list(rows)
        out = list(rows)
        for s in range(len(out)):
            problem = self.check(s)
            if problem is not None:
                warnings.warn(f"skipping shard {self.label(s)} of {self.source.path} ({problem}): its "
                              f"{rows[s]:,} rows are left out (--skip-bad-shards)", BadShardWarning, stacklevel=3)
                out[s] = 0
        self.record.save()
        return out

    def close(self) -> None:
        """Stop the background hashing after the file under way, and save what was found."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
