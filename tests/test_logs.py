"""What `pipeline train` and `pipeline sweep` print when their output goes to a file: lines that fit
100 columns (rich lays out for 80 there and wraps mid-field), whole tables, and W&B quiet."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.cli import ROOT, cli_env
from tests.builders import sparse_cache


def run_logged(args: list[str], tmp_path, name: str) -> list[str]:
    """Run a command with stdout and stderr into one file; its lines."""
    log = tmp_path / f"{name}.log"
    with open(log, "w") as f:
        code = subprocess.run(args, cwd=ROOT, env=cli_env(tmp_path), stdout=f, stderr=subprocess.STDOUT, timeout=300)
    text = log.read_text()
    assert code.returncode == 0, text[-3000:]
    return text.splitlines()


@pytest.mark.slow  # a process writing to a file is what is tested
def test_train_and_sweep_logs_in_a_file_fit_100_columns_with_whole_tables_and_quiet_wandb(tmp_path):
    sparse_cache(tmp_path / "c", rows=8000, eval_rows=1000)
    lines = run_logged([sys.executable, "-m", "pipeline", "train", "--cache", str(tmp_path / "c"), "--d-sae", "64",
                        "--k", "3", "--batch-size", "1000", "--tokens", "40000", "--log-every", "10",
                        "--eval-every", "20", "--out", str(tmp_path / "run")], tmp_path, "train")
    long = [x for x in lines if len(x) > 100 and str(tmp_path) not in x]  # a path is as long as it is
    assert not long, long
    heads = [x for x in lines if x.startswith("step ")]
    assert [x.split()[1] for x in heads] == ["10/40", "20/40", "30/40", "40/40"]  # one head a step, of the total
    assert heads[0].split()[2] == "(25%)" and " ETA " in heads[0] and " ETA " not in heads[-1]
    assert sum(x.lstrip().startswith("eval ") for x in lines) == 2  # and one for each evaluation
    assert sum("wandb" in x.lower() for x in lines) <= 1, lines

    toml = tmp_path / "sweep.toml"
    toml.write_text(f'[base]\ncache = "{tmp_path / "c"}"\nout = "{tmp_path / "s"}"\nd_sae = 64\nbatch_size = 1000\n'
                    'tokens = 20000\nlog_every = 10\nlr = 3e-3\n'
                    '[sweep]\narch = ["topk", "standard"]\nk = [3, 6]\nl1 = [0.5, 10.0]\n')
    lines = run_logged([sys.executable, "-m", "pipeline", "sweep", "--config", str(toml)], tmp_path, "sweep")
    assert lines[0] == "sweep: 20 steps, 20k tokens"  # at once: a short sweep logs its first line at its end
    table = lines[lines.index(next(x for x in lines if x.startswith("sweep summary"))):]
    logs = lines[: len(lines) - len(table)]
    long = [x for x in logs if len(x) > 100 and str(tmp_path) not in x]
    assert not long, long
    assert sum("wandb" in x.lower() for x in lines) <= 1, lines
    header = next(x for x in table if "run" in x and "status" in x)
    for column in ("arch", "k/coef", "L0", "EV", "tok/s", "status"):
        assert column in header.split(), header
    # What every run shares (the hook, d_sae) is said once under the table, which then fits too.
    assert any(x.startswith("every run: hook ") and "d_sae 64" in x for x in table), table
    assert not [x for x in table if len(x) > 100 and str(tmp_path) not in x]
    for run in ("topk-k3", "topk-k6", "standard-l1_0.5", "standard-l1_10"):
        assert any(f" {run} " in x for x in table), run
    assert not any("…" in x for x in lines)


def test_metric_lines_of_a_large_run_fit_100_columns():
    from trainer.logs import metric_lines

    n = 8
    m = {"step": 123_456, "tokens": 505_675_776, "tokens_per_s": 1_234_567.0, "mse": [1.2345e-05] * n,
         "explained_variance": [-0.12345] * n, "l0": [1234.56] * n, "dead_fraction": [0.123] * n,
         "dense_fraction": [0.5] * n, "failed": [3]}
    m.update({f"eval_{k}": v for k, v in m.items() if isinstance(v, list) and k != "failed"})
    one = metric_lines({k: (v[:1] if isinstance(v, list) and k != "failed" else v) for k, v in m.items()},
                       total_steps=999_999, total_tokens=4_095_995_904)
    assert len(one) == 3 and one[2].lstrip().startswith("eval")  # the head, the run's line, its eval line
    assert one[0] == "step 123456/999999 (12%)   506M tok  1.23M tok/s  ETA 48:28"
    names = ["standard-d16384-l1_10-lr0.0003"] + [f"topk-k{k}" for k in range(1, n)]
    lines = one + metric_lines(m, names, total_steps=999_999, total_tokens=4_095_995_904)
    assert max(map(len, lines)) <= 100, [x for x in lines if len(x) > 100]
    assert "stopped: loss NaN/Inf" in lines[3 + 1 + 2 * 3]


@pytest.mark.slow  # a process writing to a file is what is tested
def test_cache_log_in_a_file_is_whole_lines(tmp_path):
    """`pipeline cache` into a file: a line at every tenth of the way, not a bar of carriage returns."""
    (tmp_path / "docs.txt").write_text("\n".join(f"line {i} of a small document about caching" for i in range(2000)))
    lines = run_logged([sys.executable, "-m", "pipeline", "cache", "--model", "tiny", "--dataset",
                        str(tmp_path / "docs.txt"), "--tokens", "20000", "--out", str(tmp_path / "c")], tmp_path, "cache")
    assert not any("\r" in x for x in lines)
    progress = [x for x in lines if x.startswith("caching: ")]
    assert 5 <= len(progress) <= 11 and progress[-1].startswith("caching: 100%"), lines
    assert all(len(x) <= 100 for x in lines if str(tmp_path) not in x), lines


def test_info_in_a_file_prints_whole_tables(tmp_path):
    """`pipeline info` into a file: rich would lay its tables out for 80 columns there and cut long
    values (a deep cache path) with an ellipsis; every value is whole."""
    deep = tmp_path / ("a-rather-long-folder-name-for-activation-caches-" * 2) / "c"
    sparse_cache(deep, rows=2000, eval_rows=500)
    lines = run_logged([sys.executable, "-m", "pipeline", "info", str(deep)], tmp_path, "info")
    assert any(str(deep) in x for x in lines), lines
    assert not any("…" in x for x in lines), lines


def test_a_heartbeat_prints_at_once_then_on_time_even_while_the_work_blocks(capsys):
    import time

    from pipeline.console import Heartbeat, Status

    status = Status("work: starting")
    with Heartbeat(status.line, every=0.1) as beat:
        status.set("work: 1/2 steps")
        time.sleep(0.55)  # one step that blocks, as a forward pass does
        beat.beat()  # a line printed by other means: the next comes `every` after it
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "work: starting (0:00 in)"
    assert 3 <= len(lines) <= 7 and set(lines[1:]) == {"work: 1/2 steps (0:00 in)"}, lines  # every 0.1 s
