"""The folders a command writes: made (`make_dir`), never inside a cache (`refuse_inside_cache`),
and held by a lock file that keeps two processes from writing one at once (`DirLock`).

Two `pipeline train` runs on one run folder (or two sweeps, or two cache writers) would interleave
their checkpoints and metrics lines. The first takes `DIR/.pipeline.lock` (created exclusively,
holding its pid, host and command); a second is refused in one line naming the holder. A lock left
by a process that no longer runs on this host (a SIGKILL, a crash) is taken over, with a note; one
from another host cannot be checked from here and is reported as held.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.manifest import MANIFEST_FILE

LOCK_FILE = ".pipeline.lock"
TORN_AFTER_S = 5.0
"""An empty or torn lock file this old is a crash's, not a holder's still being written."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _read(path: Path) -> dict:
    """The holder a lock file names; {} when unreadable (torn by a crash while it was written)."""
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _stale(path: Path, holder: dict) -> bool:
    """A lock whose holder is gone: a dead pid on this host, or a file too torn to name anyone that is
    not being written this moment (a holder creates it, then writes it)."""
    if not isinstance(holder.get("pid"), int):
        try:
            return time.time() - path.stat().st_mtime > TORN_AFTER_S
        except FileNotFoundError:
            return True
    return holder.get("host") == socket.gethostname() and not _alive(holder["pid"])


def refuse_inside_cache(path: str | Path, option: str = "--out", itself: bool = True) -> None:
    """Refuse to write into a cache (`itself`: `path` being one counts too): a run among its shards
    would make `pipeline verify` call it BAD, and a cache inside a cache would be pushed with it."""
    path = Path(path)
    here = path.absolute()
    for folder in ((here,) if itself else ()) + tuple(here.parents):
        if (folder / MANIFEST_FILE).is_file() and (folder / "hooks").is_dir():
            what = "is the cache" if folder == here else f"is inside the cache {folder}"
            raise PipelineError(f"{option} {path} {what}; a cache's folder holds only its own files: choose a "
                                "folder outside it")


def holds_nothing(path: Path) -> bool:
    """Whether `path` is missing or holds nothing but a lock: a folder a new cache may be written to."""
    return not path.exists() or all(p.name == LOCK_FILE for p in path.iterdir())


def refuse_file_in_way(path: str | Path, option: str = "--out") -> None:
    """Refuse, before any work, a folder to write that a file stands in the way of (`--out FILE`)."""
    path = Path(path)
    blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise PipelineError(f"cannot make the folder {path}: {blocker} is a file; choose another {option}")


def make_dir(path: Path) -> None:
    """`mkdir -p path`, refused in one line where a file stands in its way (`--out FILE`)."""
    refuse_file_in_way(path)
    path.mkdir(parents=True, exist_ok=True)


class DirLock:
    """`with DirLock(directory, "pipeline train"):` holds `directory` (created if missing) for this
    process; released on leaving, by an exception too (the command line turns SIGTERM into one).
    An empty directory it created is removed again on release, so a refused command leaves nothing."""

    def __init__(self, directory: str | Path, command: str, note=None):
        self.directory, self.command = Path(directory), command
        self.path = self.directory / LOCK_FILE
        self.note = note or (lambda line: print(line, file=sys.stderr, flush=True))
        self.created = False
        self.held = False

    def __enter__(self) -> "DirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        self.created = not self.directory.is_dir()
        make_dir(self.directory)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
              "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):  # a takeover raced by another process's: try again against the new holder
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read(self.path)
                if not _stale(self.path, holder):
                    self._remove_created()
                    who = {k: holder.get(k, "?") for k in ("pid", "host", "since")}
                    raise PipelineError(
                        f"{self.directory} is in use by {holder.get('command', 'another process')} (pid "
                        f"{who['pid']} on {who['host']}, since {who['since']}); wait for it to end or choose "
                        f"another --out (a dead holder's lock: delete {self.path})")
                self._take_over(holder)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me))
            self.held = True
            return
        raise PipelineError(f"could not take the lock {self.path}: other processes keep replacing it")

    def _take_over(self, holder: dict) -> None:
        """Move a stale lock aside (one rename: of two processes taking it over, one does)."""
        aside = self.path.with_name(f"{LOCK_FILE}.stale-{os.getpid()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # another process took it over first
        if not _stale(aside, _read(aside)):  # a live holder's lock slipped in between read and rename
            os.rename(aside, self.path)
            return
        aside.unlink()
        who = f"pid {holder['pid']} on {holder.get('host')}" if "pid" in holder else "an unreadable lock file"
        self.note(f"note: taking over the lock of {self.directory} left by {who}, which is no longer running")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        if _read(self.path).get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self._remove_created()

    def _remove_created(self) -> None:
        if self.created:
            try:
                self.directory.rmdir()  # only when empty
            except OSError:
                pass
