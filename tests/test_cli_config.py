"""Config files and the command line: typos named with the field meant, `--help` that says what
options do and default to, flags that behave as flags, and `--expansion-factor`."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from pipeline.config import build_config
from pipeline.errors import PipelineError
from tests.builders import sparse_cache


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "c"
    sparse_cache(path, rows=4000, eval_rows=1000, d=32)
    return path


def invoke(*args: str):
    from pipeline.cli import app

    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200", "TERMINAL_WIDTH": "200", "NO_COLOR": "1"})


def help_lines(*command: str) -> dict[str, str]:
    """`pipeline COMMAND --help` as option -> its line (box characters and runs of spaces squeezed)."""
    res = invoke(*command, "--help")
    assert res.exit_code == 0, res.output
    lines = {}
    for line in res.output.splitlines():
        line = re.sub(r"\s+", " ", line.strip("│ ╭╮╰╯─"))
        m = re.match(r"\*? ?(--[a-z0-9-]+)", line)
        if m:
            lines[m.group(1)] = line
        lines.setdefault("", "")
        lines[""] += line + "\n"
    return lines


# ------------------------------------------------------------------------------ typos in config files


def test_a_typo_in_a_sweep_base_names_the_field_meant(cache, tmp_path):
    from trainer.sweep import expand_runs, load_sweep_spec, run_sweep

    toml = tmp_path / "sweep.toml"
    toml.write_text(f'[base]\ncache = "{cache}"\ndsae = 512\n\n[sweep]\nk = [4, 8]\n')
    with pytest.raises(PipelineError, match=r"unknown field\(s\) dsae in \[base\] \(did you mean d_sae\?\); valid"):
        run_sweep(load_sweep_spec(toml), {}, name="t")
    with pytest.raises(PipelineError, match=r"kk in \[sweep\] \(did you mean k\?\)"):
        expand_runs({"sweep": {"kk": [1]}}, {})
    with pytest.raises(PipelineError, match=r"lrr, zzz_unknown in \[\[runs\]\] #2 \(did you mean lr for lrr\?\)"):
        expand_runs({"runs": [{"k": 4}, {"lrr": 1e-3, "zzz_unknown": 1}]}, {})


def test_a_typo_in_a_train_or_cache_toml_names_the_field_meant(tmp_path):
    from cache_writer.run import CacheConfig
    from trainer.run import TrainConfig

    train = tmp_path / "train.toml"
    train.write_text("[train]\nd_sea = 512\n")
    with pytest.raises(PipelineError, match=r"d_sea in \[train\] of .*train.toml \(did you mean d_sae\?\)"):
        build_config(TrainConfig, train, {}, section="train")
    cache = tmp_path / "cache.toml"
    cache.write_text("[cache]\ntokenz = 5\n")
    with pytest.raises(PipelineError, match=r"tokenz in \[cache\] of .*cache.toml \(did you mean tokens\?\)"):
        build_config(CacheConfig, cache, {}, section="cache")


# ------------------------------------------------------------------------------ --help


def test_sweep_help_shows_its_toml_tables_and_defaults():
    lines = help_lines("sweep")
    assert "[base] fields and [sweep] lists or [[runs]]" in lines["--config"]
    assert "overrides [base]" in lines["--cache"] and "TOML's [base] and every run" in lines[""]
    assert "[default: 4096]" in lines["--batch-size"] and "[default: 64]" in lines["--eval-contexts"]
    assert "--no-resume" in lines["--resume"] and "--no-eval" in lines["--eval"]
    assert "<bool>" not in lines[""] and "--expansion-factor" in lines


def test_train_and_cache_help_show_the_config_defaults_and_flags_as_flags():
    train = help_lines("train")
    assert "[default: 1024]" in train["--d-sae"] and "[default: 4000000]" in train["--tokens"]
    assert "[default: topk]" in train["--arch"] and "[default: 1.0]" in train["--max-grad-norm"]
    assert "3e-3 at d_sae 2048" in train["--lr"] and "[default:" not in train["--lr"]  # None: the width's default
    assert "--no-resume" in train["--resume"] and "[default: no-resume]" in train["--resume"]
    assert "--no-ddp" in train["--ddp"] and "[default: wandb]" in train["--wandb"]
    assert "<bool>" not in train[""] and "d_sae = N * d_in" in train["--expansion-factor"]
    cache = help_lines("cache")
    assert "[default: tiny]" in cache["--model"] and "--no-overwrite" in cache["--overwrite"]
    assert "<bool>" not in cache[""] and "<bool>" not in help_lines()[""]
    assert "[default: 128]" in help_lines("eval")["--contexts"]


def test_boolean_options_parse_as_flags_both_ways():
    import typer

    from pipeline.cli import app

    train = typer.main.get_command(app).commands["train"]
    for args, want in (([], None), (["--resume"], True), (["--no-resume"], False)):
        ctx = train.make_context("train", list(args))
        assert ctx.params["resume"] is want and ctx.params["ddp"] is None
    res = invoke("train", "--resume", "true")  # a flag takes no value
    assert res.exit_code == 2 and "unexpected extra argument(s) (true)" in res.output



def test_help_gives_the_texts_the_width_and_names_arguments_in_capitals():
    """At 110 columns the option names and value types took ~50 columns and every help text wrapped
    after 3-5 words; usage showed `{sae}`, `{SAE_OR_SWEEP}`, `{path}`."""
    import typer

    from pipeline.cli import app

    commands = typer.main.get_command(app).commands
    for name in commands:
        res = CliRunner().invoke(app, [name, "--help"], env={"COLUMNS": "110", "TERMINAL_WIDTH": "110", "NO_COLOR": "1"})
        assert res.exit_code == 0, res.output
        lines = res.output.splitlines()
        assert max(len(line) for line in lines) <= 110
        # Where each option's help text starts: the names and the value type leave it most of the line.
        starts = [len(m.group(1)) for line in lines if (m := re.match(r"(│ --\S+(?:, -\w)? +(?:[A-Z.]+ +)?)\S", line))]
        assert starts and max(starts) <= 40, (name, max(starts))
        usage = next(line.strip() for line in lines if line.strip().startswith("Usage:"))
        assert re.fullmatch(r"Usage: .*? \[OPTIONS\]( [A-Z_]+| \[[A-Z_]+\])*", usage), usage
    assert "[OPTIONS] SAE" in invoke("eval", "--help").output
    assert "[OPTIONS] SAE_OR_SWEEP" in invoke("report", "--help").output
    assert "[OPTIONS] PATH REPO_ID" in invoke("push", "--help").output
    # An error names an argument as the usage does.
    assert "Missing argument 'SAE'" in invoke("eval").output


def test_sweep_help_shows_the_out_folder_a_sweep_uses():
    """`sweep --help` said `--out` defaults to runs/default (a `pipeline train`'s folder) while `make
    sweep` writes runs/sweep: a sweep with no --out and no [base] out now writes runs/sweep, as shown."""
    from trainer.sweep import expand_runs

    assert "[default: runs/sweep]" in help_lines("sweep")["--out"]
    assert expand_runs({"sweep": {"k": [4, 8]}}, {})[0].out == "runs/sweep"
    assert expand_runs({"base": {"out": "elsewhere"}}, {})[0].out == "elsewhere"
    assert expand_runs({}, {"out": "flag"})[1][0].out == "flag"
    assert "[default: runs/default]" in help_lines("train")["--out"]

# ------------------------------------------------------------------------------ --expansion-factor


def test_expansion_factor_sets_d_sae_from_the_hook_width(cache, tmp_path):
    res = invoke("train", "--cache", str(cache), "--out", str(tmp_path / "r"), "--expansion-factor", "3", "--k", "4",
                 "--batch-size", "256", "--tokens", "512", "--no-wandb", "--device", "cpu")
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "r" / "topk-d96-k4" / "cfg.json").read_text())
    assert cfg["d_sae"] == 96 and cfg["d_in"] == 32  # 3 x 32
    res = invoke("train", "--cache", str(cache), "--d-sae", "64", "--expansion-factor", "2")
    assert isinstance(res.exception, PipelineError)
    assert "the command line sets both d_sae and expansion_factor; give one of them" in str(res.exception)


def test_expansion_factor_layers_over_d_sae_in_files_and_sweeps(tmp_path):
    from trainer.run import TrainConfig, resolve_width
    from trainer.sweep import plan_sweep

    toml = tmp_path / "train.toml"
    toml.write_text("[train]\nd_sae = 1024\n")
    # A flag replaces the file's width, either way round; one file or one flag line gives one.
    assert resolve_width(build_config(TrainConfig, toml, {"expansion_factor": 4}, section="train"), 32).d_sae == 128
    toml.write_text("[train]\nexpansion_factor = 4\n")
    assert resolve_width(build_config(TrainConfig, toml, {"d_sae": 100}, section="train"), 32).d_sae == 100
    toml.write_text("[train]\nexpansion_factor = 4\nd_sae = 64\n")
    with pytest.raises(PipelineError, match=r"\[train\] of .* sets both d_sae and expansion_factor"):
        build_config(TrainConfig, toml, {}, section="train")
    with pytest.raises(PipelineError, match="expansion_factor must be a positive integer"):
        resolve_width(TrainConfig(expansion_factor=0), 32)

    plan = plan_sweep({"base": {"d_sae": 1024, "k": 4}, "sweep": {"expansion_factor": [1, 2]}}, {}, "t", {"x": 32})
    assert [(r.name, r.d_sae) for r in plan.runs] == [("topk-d32", 32), ("topk-d64", 64)]
    plan = plan_sweep({"base": {"d_sae": 1024, "k": 4}, "sweep": {"lr": [1e-3, 3e-3]}}, {"expansion_factor": 2}, "t",
                      {"x": 32})
    assert {r.d_sae for r in plan.runs} == {64}
    with pytest.raises(PipelineError, match=r"\[sweep\] sets both d_sae and expansion_factor"):
        plan_sweep({"sweep": {"d_sae": [64], "expansion_factor": [2]}}, {}, "t", {"x": 32})
