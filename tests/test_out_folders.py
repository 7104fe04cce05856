"""The folders commands write. Two processes on one folder: `pipeline train` holds its run folder, `pipeline sweep` its sweep
folder and `pipeline cache` the cache it writes; a second is refused in one line naming the holder,
a dead holder's lock is taken over with a note, and the lock goes when the command ends. No
command writes inside a cache."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.errors import PipelineError
from pipeline.lock import LOCK_FILE, DirLock
from tests.builders import sparse_cache


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("lock") / "c"
    sparse_cache(path, rows=2000, d=16)
    return path


@pytest.fixture
def live_pid():
    """A process that runs while the test does: a lock naming it is held."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def plant_lock(folder: Path, pid: int, command: str = "pipeline train") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_FILE).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "command": command,
                                                "since": "2026-01-01 00:00:00"}))


def train(cache: Path, out: Path, **kw) -> dict:
    from trainer.run import TrainConfig, run_train

    return run_train(TrainConfig(cache=str(cache), out=str(out), name="r", d_sae=32, k=2, batch_size=200,
                                 tokens=200 * 4, log_every=2, wandb=False, **kw))


def test_a_second_trainer_on_a_held_run_folder_is_refused_naming_the_holder(cache, tmp_path, live_pid):
    plant_lock(tmp_path / "r", live_pid)
    with pytest.raises(PipelineError) as e:
        train(cache, tmp_path)
    assert f"{tmp_path / 'r'} is in use by pipeline train (pid {live_pid} on {socket.gethostname()}" in str(e.value)
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == [LOCK_FILE]  # nothing of the holder's touched
    with pytest.raises(PipelineError, match="in use by pipeline train"):
        train(cache, tmp_path, resume=True)


def test_a_dead_holders_lock_is_taken_over_with_a_note_and_released_at_the_end(cache, tmp_path, capsys):
    pid = dead_pid()
    plant_lock(tmp_path / "r", pid)
    train(cache, tmp_path)
    err = capsys.readouterr().err
    assert f"note: taking over the lock of {tmp_path / 'r'} left by pid {pid} on {socket.gethostname()}" in err
    assert (tmp_path / "r" / "sae_weights.safetensors").is_file()
    assert not (tmp_path / "r" / LOCK_FILE).exists()


def test_the_lock_is_released_when_the_run_fails(cache, tmp_path):
    with pytest.raises(PipelineError):
        train(cache, tmp_path, hook="nope")
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "checkpoint").mkdir()  # refused after taking the lock: it is given back
    with pytest.raises(PipelineError, match="holds a checkpoint"):
        train(cache, tmp_path)
    assert not (tmp_path / "r" / LOCK_FILE).exists()


def test_a_sweep_folder_and_a_cache_being_written_are_held_too(cache, tmp_path, live_pid):
    from cache_writer.run import CacheConfig, run_cache
    from trainer.sweep import run_sweep

    plant_lock(tmp_path / "s" / "_sweep", live_pid, "pipeline sweep")
    spec = {"base": {"cache": str(cache), "out": str(tmp_path / "s"), "d_sae": 32, "batch_size": 200, "tokens": 800,
                     "wandb": False}, "sweep": {"k": [2, 4]}}
    with pytest.raises(PipelineError, match=rf"_sweep is in use by pipeline sweep \(pid {live_pid} "):
        run_sweep(spec, {})
    plant_lock(tmp_path / "c", live_pid, "pipeline cache")
    with pytest.raises(PipelineError, match=rf"c is in use by pipeline cache \(pid {live_pid} "):
        run_cache(CacheConfig(out=str(tmp_path / "c"), tokens=4000), progress=False)


def test_a_torn_lock_is_a_holder_still_writing_it_until_it_is_old(tmp_path, capsys):
    (tmp_path / "r").mkdir()
    torn = tmp_path / "r" / LOCK_FILE
    torn.write_text('{"pid": 12')  # a crash mid-write, or a holder between creating and writing it
    with pytest.raises(PipelineError, match=r"r is in use by another process \(pid \? on \?"):
        DirLock(tmp_path / "r", "x").acquire()
    os.utime(torn, (0, 0))  # long ago: a crash's
    lock = DirLock(tmp_path / "r", "x")
    lock.acquire()
    assert "left by an unreadable lock file, which is no longer running" in capsys.readouterr().err
    lock.release()
    assert not torn.exists()


def test_a_refused_command_leaves_no_folder_it_made_and_a_file_in_the_way_is_one_line(tmp_path, live_pid):
    lock = DirLock(tmp_path / "new" / "run", "x")
    lock.acquire()
    assert json.loads((tmp_path / "new" / "run" / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / "new" / "run").exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(PipelineError, match=rf"cannot make the folder {tmp_path / 'file' / 'r'}: {tmp_path / 'file'} "
                                            "is a file; choose another --out"):
        DirLock(tmp_path / "file" / "r", "x").acquire()


def test_output_inside_a_cache_is_refused_in_one_line(cache, tmp_path):
    from cache_writer.run import CacheConfig, run_cache
    from trainer.sweep import run_sweep

    with pytest.raises(PipelineError, match=rf"^--out {cache} is the cache; a cache's folder holds only its own"):
        train(cache, cache)
    inner = cache / "hooks"
    with pytest.raises(PipelineError, match=rf"^--out {inner} is inside the cache {cache}; .* choose a folder "
                                            "outside it$"):
        train(cache, inner)
    with pytest.raises(PipelineError, match=rf"^--out {inner / 'x' / 'inner'} is inside the cache {cache}"):
        run_cache(CacheConfig(out=str(inner / "x" / "inner"), tokens=4000), progress=False)
    with pytest.raises(PipelineError, match=rf"^--out {inner} is inside the cache {cache}"):
        run_sweep({"base": {"cache": str(cache), "out": str(inner), "d_sae": 32, "wandb": False},
                   "sweep": {"k": [2, 4]}}, {})
    assert sorted(p.name for p in inner.iterdir()) == ["x"]  # nothing written
