"""Bad input on the command line is one line on stderr (`error: ...`, exit 2) that names the problem
and the fix: never a traceback, never a usage box, never a value silently accepted."""

from __future__ import annotations

import time

import pytest

from tests.builders import sparse_cache


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("clierr") / "c"
    sparse_cache(path, rows=2000, eval_rows=400, d=16)
    return path


def one_line(result: tuple[int, str, str], *fragments: str) -> None:
    code, err, _ = result
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


# ------------------------------------------------------------------------------- accepted bad values


def test_values_a_run_cannot_use_are_refused(cli, cache, tmp_path):
    train = ["train", "--cache", cache, "--out", tmp_path, "--no-wandb"]
    one_line(cli(*train, "--lr", "-1"), "--lr must be a number > 0, got -1.0")
    one_line(cli(*train, "--lr", "0"), "--lr must be a number > 0, got 0.0")
    one_line(cli(*train, "--max-grad-norm", "0"), "--max-grad-norm must be a number > 0")
    one_line(cli(*train, "--l1", "-0.5", "--arch", "standard"), "--l1 must be a number >= 0")
    one_line(cli(*train, "--eval-every", "30", "--log-every", "20"),
             "--eval-every 30 must be a multiple of --log-every 20 (evaluations run at logging steps); "
             "e.g. --eval-every 40")
    one_line(cli("report", tmp_path, "--cache", cache, "--n-latents", "-1"), "--n-latents must be a number > 0, got -1")
    one_line(cli("report", tmp_path, "--cache", cache, "--contexts", "0"), "--contexts must be a number > 0, got 0")
    assert not any(tmp_path.iterdir())


def test_checkpoint_every_0_says_what_it_does():
    from pipeline.cli_options import config_fields

    doc = next(f.doc for f in config_fields("trainer.run", "TrainConfig") if f.name == "checkpoint_every")
    assert doc == "Steps between resume checkpoints (one is also written at the end; 0: only that one)."


def test_resume_with_nothing_to_resume_says_it_starts_fresh(cli, cache, tmp_path):
    code, err, out = cli("train", "--cache", cache, "--out", tmp_path, "--name", "r", "--d-sae", 32, "--k", 2,
                         "--batch-size", 200, "--tokens", 400, "--no-wandb", "--resume")
    assert code == 0, err
    assert f"--resume: no checkpoint in {tmp_path / 'r'}; starting a fresh run\n" in out
    toml = tmp_path / "s.toml"
    toml.write_text('[sweep]\nk = [2, 4]\n')
    code, err, out = cli("sweep", "--config", toml, "--cache", cache, "--out", tmp_path / "s", "--batch-size", 200,
                         "--tokens", 400, "--no-wandb", "--resume")
    assert code == 0, err
    assert f"--resume: no checkpoint in {tmp_path / 's' / '_sweep'}; starting a fresh run\n" in out
    code, err, out = cli("train", "--cache", cache, "--out", tmp_path, "--name", "r", "--d-sae", 32, "--k", 2,
                         "--batch-size", 200, "--tokens", 600, "--no-wandb", "--resume")
    assert code == 0 and "starting a fresh run" not in out  # a checkpoint to resume: no such line


# ----------------------------------------------------------------------------- usage errors


@pytest.mark.parametrize("args,says", [
    (["train", "--tokens", "abc"], "Invalid value for '--tokens': "),
    (["train", "--lr", "fast"], "Invalid value for '--lr': "),
    (["sweep", "--config", "x.toml", "--batch-size", "1.5"], "Invalid value for '--batch-size': "),
    (["report", "x", "--n-latents", "many"], "Invalid value for '--n-latents': "),
    (["train", "--nope"], "No such option: --nope"),
    (["nope"], "No such command 'nope'"),
    (["info"], "Missing argument 'PATH'"),
])
def test_a_wrong_type_or_unknown_option_is_one_line_not_a_usage_box(cli, args, says):
    code, err, out = cli(*args)
    assert code == 2 and out == "", out
    assert err.count("\n") == 1 and err.startswith(f"error: {says}") and "--help`" in err, err
    assert not set(err) & set("╭│╰─"), err


def test_bare_pipeline_and_help_still_show_the_help(cli):
    code, err, out = cli()
    assert code == 0 and "Usage:" in out and "train" in out and err == ""
    code, err, out = cli("train", "--help")
    assert code == 0 and "--tokens" in out


def numeric_options() -> list[tuple[str, list[str], str]]:
    """(command, its positional arguments as stand-ins, flag) for every int or float option of every command."""
    import inspect
    import re

    from pipeline.cli import app

    out = []
    for info in app.registered_commands:
        name = info.name or info.callback.__name__
        params = inspect.signature(info.callback).parameters.values()
        positional = ["x" for p in params if type(p.default).__name__ == "ArgumentInfo"]
        for p in params:
            if type(p.default).__name__ != "OptionInfo" or not re.search(r"\b(int|float)\b", str(p.annotation)):
                continue
            flags = [d for d in (p.default.param_decls or ()) if d.startswith("--")]
            out.append((name, positional, flags[0] if flags else "--" + p.name.replace("_", "-")))
    return out


def test_every_numeric_option_of_every_command_refuses_a_word_in_one_line(cli):
    options = numeric_options()
    assert {c for c, _, _ in options} >= {"cache", "train", "sweep", "eval", "report", "pretokenize", "push"}
    assert len(options) >= 40, options  # the walk found them
    for command, positional, flag in options:
        code, err, out = cli(command, *positional, flag, "abc")
        assert code == 2 and err.startswith(f"error: Invalid value for '{flag}'") and err.count("\n") == 1, \
            (command, flag, err)


@pytest.mark.parametrize("args,says", [
    (["pretokenize", "--out", "OUT", "--context-size", "0"], "--context-size must be a number > 0, got 0"),
    (["pretokenize", "--out", "OUT", "--max-sequences", "-1"], "--max-sequences must be a number > 0, got -1"),
    (["pretokenize", "--out", "OUT", "--eval-fraction", "-1"], "--eval-fraction must be in [0, 1), got -1.0"),
    (["push", "CACHE", "org/x", "--dry-run", "--max-commit-files", "0"], "--max-commit-files must be a number > 0"),
    (["push", "CACHE", "org/x", "--dry-run", "--max-commit-mb", "-1"], "--max-commit-mb must be a number > 0"),
    (["eval", "SAE", "--cache", "CACHE", "--max-rows", "-1"], "--max-rows must be a number > 0, got -1"),
])
def test_zero_and_negative_sizes_of_the_other_commands_are_one_line(cli, cache, tmp_path, args, says):
    args = [{"OUT": str(tmp_path / "p"), "CACHE": str(cache), "SAE": str(tmp_path)}.get(a, a) for a in args]
    one_line(cli(*args), says)
    assert not (tmp_path / "p").exists()
