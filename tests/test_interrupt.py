"""Ctrl-C and SIGTERM during `pipeline train` / `pipeline sweep`: the step finishes, a checkpoint is
written, one line says where and how to resume (exit 130 / 143), and the resumed run continues its
metrics and its W&B run as if it had never stopped."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.lock import LOCK_FILE
from tests.cli import ROOT, cli_env
from trainer import interrupt
from trainer.interrupt import Interrupted, StopOnSignal
from tests.builders import sparse_cache


def signal_after_first_line(args: list[str], metrics: Path, signum: int, env: dict) -> tuple[int, str]:
    """Run `args`, send `signum` once `metrics` has a line; (exit status, stderr)."""
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (metrics.is_file() and metrics.read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no metrics line before exit: {proc.communicate()[1][-2000:]}")
        time.sleep(0.02)
    proc.send_signal(signum)
    return proc.wait(timeout=240), proc.stderr.read()


def resume_command(stderr: str) -> list[str]:
    """The command the interrupted run printed."""
    line = stderr.strip().splitlines()[-1]
    assert "; resume with: " in line, stderr[-2000:]
    return shlex.split(line.split("; resume with: ", 1)[1])


def steps(metrics: Path) -> list[int]:
    return [json.loads(line)["step"] for line in metrics.read_text().splitlines()]


@pytest.mark.slow
def test_ctrl_c_checkpoints_and_the_resumed_run_equals_a_straight_one(tmp_path, cli):
    sparse_cache(tmp_path / "c", rows=8000)
    env = cli_env(tmp_path)
    base = [sys.executable, "-m", "pipeline", "train", "--cache", str(tmp_path / "c"), "--d-sae", "2048", "--k", "3",
            "--lr", "3e-3", "--batch-size", "1000", "--tokens", str(1000 * 200), "--log-every", "5",
            "--checkpoint-every", "1000"]
    code, err, _ = cli(*base[3:], "--out", tmp_path / "a", "--no-wandb")  # no signal: in this process
    assert code == 0, err[-2000:]

    run = tmp_path / "b" / "topk-d2048-k3"
    code, err = signal_after_first_line(base + ["--out", str(tmp_path / "b")], run / "metrics.jsonl",
                                        signal.SIGINT, env)
    assert code == 130, err[-2000:]
    stopped = json.loads((run / "checkpoint" / "state.json").read_text())["step"]
    assert 5 <= stopped < 200
    assert f"interrupted (SIGINT) after step {stopped} of 200: checkpoint in {run / 'checkpoint'}; resume with:" in err
    assert "Traceback" not in err
    command = resume_command(err)
    assert command == base + ["--out", str(tmp_path / "b"), "--resume"]
    assert max(steps(run / "metrics.jsonl")) <= stopped
    assert not (run / LOCK_FILE).exists()  # given back on the way out

    more = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert more.returncode == 0, more.stderr[-2000:]
    said = more.stdout.splitlines()
    assert any(x.startswith(f"resumed from step {stopped} of 200 (") for x in said[:3]), said[:3]  # before any step
    assert steps(run / "metrics.jsonl") == list(range(5, 201, 5))  # no step twice, none missing
    a = load_file(str(tmp_path / "a" / "topk-d2048-k3" / "sae_weights.safetensors"))
    b = load_file(str(run / "sae_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The resumed run logs to the same W&B run (offline here: a second folder of the same id).
    run_id = (run / "wandb_run_id").read_text().strip()
    assert sorted(p.name.rsplit("-", 1)[1] for p in (run / "wandb").glob("offline-run-*")) == [run_id, run_id]


@pytest.mark.slow
def test_sigterm_stops_a_sweep_with_a_checkpoint_and_it_resumes(tmp_path, cli):
    sparse_cache(tmp_path / "c", rows=8000, eval_rows=1000)
    toml = tmp_path / "sweep.toml"
    toml.write_text(f'[base]\ncache = "{tmp_path / "c"}"\nout = "{tmp_path / "s"}"\nd_sae = 1024\nbatch_size = 1000\n'
                    f'tokens = {1000 * 150}\nlog_every = 5\ncheckpoint_every = 1000\nlr = 3e-3\n'
                    '[sweep]\narch = ["topk", "standard"]\nk = [3]\nl1 = [0.5]\n')
    args = [sys.executable, "-m", "pipeline", "sweep", "--config", str(toml), "--no-wandb"]
    code, err = signal_after_first_line(args, tmp_path / "s" / "topk-d1024-k3" / "metrics.jsonl", signal.SIGTERM,
                                        cli_env(tmp_path))
    assert code == 143, err[-2000:]
    assert "interrupted (SIGTERM) after step " in err and f"checkpoint in {tmp_path / 's' / '_sweep' / 'checkpoint'}" in err
    assert not (tmp_path / "s" / "_sweep" / LOCK_FILE).exists()
    command = resume_command(err)
    assert command[:3] == [sys.executable, "-m", "pipeline"], command
    code, err, _ = cli(*command[3:])  # the resume takes no signal: in this process
    assert code == 0, err[-2000:]
    for name in ("topk-d1024-k3", "standard-d1024-l1_0.5"):
        assert steps(tmp_path / "s" / name / "metrics.jsonl") == list(range(5, 151, 5)), name


def test_resume_drops_metrics_lines_logged_after_the_checkpoint(tmp_path):
    """A kill leaves lines past the last checkpoint (and maybe a torn one): the resumed run logs
    those steps again, once."""
    from pipeline.loader import ActivationLoader
    from trainer.sae_topk import TopKConfig, TopKSAE
    from trainer.train import LoopConfig, train_stack

    sparse_cache(tmp_path / "c", rows=4000)
    metrics = tmp_path / "run" / "metrics.jsonl"
    metrics.parent.mkdir()
    loop = LoopConfig(lr=3e-3, total_steps=60, log_every=10, metrics_path=str(metrics))

    def train(**kw):
        model = TopKSAE([TopKConfig(d_in=32, d_sae=64, k=3)])
        loader = ActivationLoader(tmp_path / "c", batch_size=250, tokens=250 * 60)  # 16 whole batches an epoch
        train_stack(model, loader, loop, log=None, run_dir=tmp_path / "run", **kw)

    train(max_steps=30)
    last = json.loads(metrics.read_text().splitlines()[-1])
    with open(metrics, "a") as f:  # what a SIGKILL at step 45 would have left: step 40, a torn line
        f.write(json.dumps({**last, "step": 40, "tokens": last["tokens"] + 2500}) + '\n{"mse": [0.1], "st')
    train()
    assert steps(metrics) == [10, 20, 30, 40, 50, 60]


def test_a_first_signal_stops_after_the_item_a_second_aborts(monkeypatch):
    aborted = []

    def fake_abort(signum):  # the real one leaves the process at once
        aborted.append(signum)
        raise SystemExit(128 + signum)

    monkeypatch.setattr(interrupt, "_abort", fake_abort)
    # What was there before (a job started in the background has SIGINT ignored, not Python's handler).
    before = signal.getsignal(signal.SIGTERM)
    before_int = signal.getsignal(signal.SIGINT)
    stop = StopOnSignal()
    items = stop.until(range(10))
    assert next(items) == 0
    os.kill(os.getpid(), signal.SIGTERM)  # delivered to this thread before the next bytecode
    assert stop.signum == signal.SIGTERM
    assert list(items) == []  # the loop ends after the item it was on
    with pytest.raises(SystemExit) as e:
        os.kill(os.getpid(), signal.SIGINT)
    assert e.value.code == 130 and aborted == [signal.SIGINT]
    with pytest.raises(Interrupted, match=re.escape("interrupted (SIGTERM) after step 1 of 9: checkpoint in x")) as e:
        stop.end(1, Path("x"), 9)
    assert e.value.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) == before and signal.getsignal(signal.SIGINT) == before_int


class Unhandled(Exception):
    """SIGTERM reached the test's own handler: the command line left it unhandled."""


@pytest.mark.parametrize("when", ["refuse_inconsistent", "finish_export"])
def test_sigterm_before_the_loop_or_during_the_export_is_one_line(tmp_path, monkeypatch, capsys, when):
    """Outside the training loop (its first second, the final export) SIGTERM stops the command where
    it is: locks are given back and one line says how to continue, exit status 143."""
    import trainer.run
    from pipeline.cli import main

    sparse_cache(tmp_path / "c", rows=2000)
    monkeypatch.setattr(trainer.run, when, lambda *a, **k: os.kill(os.getpid(), signal.SIGTERM))
    argv = ["pipeline", "train", "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "r"), "--name", "r",
            "--d-sae", "32", "--k", "2", "--batch-size", "200", "--tokens", "800", "--no-wandb"]
    monkeypatch.setattr(sys, "argv", argv)

    def unhandled(signum, frame):
        raise Unhandled()

    previous = signal.signal(signal.SIGTERM, unhandled)  # the default would end pytest itself
    try:
        with pytest.raises(SystemExit) as e:
            main()
        assert signal.getsignal(signal.SIGTERM) is unhandled  # main gives the handler back
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert e.value.code == 143
    assert capsys.readouterr().err == f"stopped (SIGTERM); what was finished is kept; rerun with: " \
                                      f"{shlex.join(argv + ['--resume'])}\n"
    run = tmp_path / "r" / "r"
    assert not (run / LOCK_FILE).exists() and run.is_dir() == (when == "finish_export")
    assert (run / "checkpoint").is_dir() == (when == "finish_export")
