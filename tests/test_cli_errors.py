"""Bad input on the command line is one line on stderr (`error: ...`, exit 2) that names the problem
and the fix: never a traceback, never a usage box, never a value silently accepted."""

from __future__ import annotations

import sys
import time

import pytest

from tests.builders import sparse_cache


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("clierr") / "c"
    sparse_cache(path, rows=2000, eval_rows=400, d=16)
    return path


@pytest.fixture
def cli(monkeypatch, capsys):
    """`cli(*args)` runs `pipeline ARGS` in this process: (exit status, stderr)."""
    from pipeline.cli import main

    def run(*args: str) -> tuple[int, str]:
        monkeypatch.setattr(sys, "argv", ["pipeline", *map(str, args)])
        with pytest.raises(SystemExit) as e:
            main()
        return e.value.code, capsys.readouterr().err

    return run


def one_line(result: tuple[int, str], *fragments: str) -> None:
    code, err = result
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    for fragment in fragments:
        assert fragment in err, err


# ------------------------------------------------------------------------------------ tracebacks


def test_a_config_file_that_is_not_utf8_is_one_line(cli, cache, tmp_path):
    bad = tmp_path / "latin1.toml"
    bad.write_bytes('name = "caf\xe9"\n'.encode("latin-1"))
    for command in (["cache"], ["train", "--cache", cache], ["sweep"]):
        one_line(cli(*command, "--config", bad), f"config file {bad} is not UTF-8 text", "save it as UTF-8 TOML")
    one_line(cli("train", "--config", tmp_path), f"cannot read config file {tmp_path}: Is a directory")


def test_out_that_is_a_file_is_one_line(cli, cache, tmp_path):
    f = tmp_path / "file"
    f.write_text("")
    one_line(cli("train", "--cache", cache, "--out", f, "--no-wandb"), f"{f} is a file; choose another --out")
    toml = tmp_path / "s.toml"
    toml.write_text('[sweep]\nk = [2, 4]\n')
    one_line(cli("sweep", "--config", toml, "--cache", cache, "--out", f, "--batch-size", 200,
                 "--no-wandb"), f"{f} is a file")
    one_line(cli("report", tmp_path, "--cache", cache, "--out", f), f"{f} is a file; choose another --out")


def test_import_of_a_missing_module_is_one_line(cli, cache, tmp_path):
    one_line(cli("train", "--cache", cache, "--import", "missing_module_xyz"),
             "--import missing_module_xyz: no module 'missing_module_xyz'; give a module on PYTHONPATH")
    toml = tmp_path / "s.toml"
    toml.write_text('[sweep]\nk = [2, 4]\n')
    one_line(cli("sweep", "--config", toml, "--import", "missing_module_xyz"), "no module 'missing_module_xyz'")


def test_push_and_pull_without_a_network_are_one_line_at_once(cli, cache, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused
    for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_" + "a" * 30)
    start = time.monotonic()
    one_line(cli("push", cache, "org/x"), "cannot reach the Hub at http://127.0.0.1:9 to push (Connection refused)")
    one_line(cli("pull", "org/x", "--out", tmp_path / "p"), "cannot reach the Hub at http://127.0.0.1:9 to pull")
    assert time.monotonic() - start < 10  # huggingface_hub alone retried for ~40 s
    # A connection that breaks half-way: one line, and a rerun resumes.
    import pipeline.hub
    from pipeline.hub import common

    monkeypatch.setattr(common, "check_reachable", lambda action: None)

    def broken(*args, **kwargs):
        raise ConnectionResetError(104, "Connection reset by peer")

    monkeypatch.setattr(pipeline.hub, "push", broken)
    one_line(cli("push", cache, "org/x"), "the connection to the Hub failed during the push ([Errno 104] Connection "
                                          "reset by peer); rerun the same command to resume")
