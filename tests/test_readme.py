"""The commands of the README and of the guides in docs/ run as written (on small sizes), their
python blocks too, and `make train` works on a fresh clone."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import traceback
from pathlib import Path

import pytest
import torch

from pipeline.config import build_config
from tests.builders import sparse_cache
from tests.cli import ROOT, cli_env, run_pipeline
from trainer.run import TrainConfig

# Commands this test does not run, each with why (every entry must match a README command).
SKIP = {
    r"^make ": "make installs .venv first; SETUP runs what `make train` runs, on small sizes",
    r"^hf auth login": "logs in to the Hugging Face Hub (network)",
    r"^\S+ (push|pull) (?!.*--dry-run)": "sends to or downloads from the Hub (network)",
    r"^torchrun ": "several processes, GPUs or nodes",
}
# What `make train` runs (Makefile), on a small default cache: of the README's paragraphs, many small
# documents, so that a cache this small has an eval split for the eval and report commands.
SETUP = [
    "pipeline cache --dataset corpus --eval-fraction 0.2 --tokens 30000 --out caches/default --resume",
    "pipeline train --config configs/train_default.toml --cache caches/default --out runs/default --resume",
]
SMALL_TOKENS = "8192"  # rows per training run here (2 steps of the default batch)
# The sizes of the README's commands, made small (regex -> replacement).
SMALL = [
    (r"--contexts 128", "--contexts 4"),
    (r"--ce-contexts 64", "--ce-contexts 4"),
    (r"--n-latents 16", "--n-latents 4"),
]
MYMODULE = ("from trainer.registry import register_architecture\nfrom trainer.sae_topk import TopKSAE\n\n\n"
            "@register_architecture('mine')\nclass Mine(TopKSAE):\n    pass\n")


# The README, then the guides it links, in the order a reader meets them.
GUIDES = ["README.md", "docs/CACHING.md", "docs/LOADER.md", "docs/TRAINING.md", "docs/EVALUATION.md", "docs/HUB.md",
          "docs/SCALING.md"]


def readme_commands() -> list[str]:
    """Every command of the ```bash blocks of the README and the guides: continuation lines joined,
    comments dropped."""
    commands = []
    text = "\n".join((ROOT / page).read_text() for page in GUIDES)
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()
            if line and line not in commands:  # the README repeats some of its guides' commands
                commands.append(line)
    return commands


def small(command: str) -> list[str]:
    """The command as run here: `pipeline` for the script, our Python for .venv/bin/python, optional
    [flags] given (the first of [a | b]), tokens and contexts small."""
    command = re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split("|")[0].strip(), command)
    for pattern, repl in SMALL:
        command = re.sub(pattern, repl, command)
    args = shlex.split(command)
    if args[0] == ".venv/bin/pipeline":
        args[0] = "pipeline"
    elif args[0] == ".venv/bin/python":
        args[0] = sys.executable
    stage = args[1] if args[0] == "pipeline" else args[3] if args[1:3] == ["-m", "pipeline"] else None
    if stage in ("train", "sweep"):
        if "--tokens" in args:
            args[args.index("--tokens") + 1] = SMALL_TOKENS
        else:
            args += ["--tokens", SMALL_TOKENS]
    elif stage == "cache" and "--tokens" in args:
        i = args.index("--tokens") + 1
        args[i] = str(min(int(args[i]), 20_000))
    return args


def run_command(args: list[str], cwd: Path, env: dict) -> tuple[int, str]:
    """(exit status, stderr). The `pipeline` script runs in this process, through the function it
    calls (pyproject's [project.scripts]), in `cwd` with `env` set: a process per command cost ~2-5 s
    of imports each, most of this test's time. A `python ...` command runs as a process, as written."""
    if args[0] != "pipeline":
        out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        return out.returncode, out.stderr
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        for name in ("HOME", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "WANDB_MODE"):
            mp.setenv(name, env[name])
        try:
            code, err, _ = run_pipeline(*args[1:])
        except Exception:  # a traceback is a failure of this command, not of the ones after it
            return 1, traceback.format_exc()
    return code, err


@pytest.mark.slow
def test_every_readme_command_runs(tmp_path, importable):
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["pipeline"] == "pipeline.cli:main"
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    (tmp_path / "mymodule.py").write_text(MYMODULE)
    importable(tmp_path)  # the PYTHONPATH below, for the commands run in this process
    (tmp_path / "corpus").mkdir()
    for i, paragraph in enumerate((ROOT / "README.md").read_text().split("\n\n")):
        (tmp_path / "corpus" / f"{i:03d}.txt").write_text(paragraph)
    env = cli_env(tmp_path, PYTHONPATH=f"{ROOT}:{tmp_path}", WANDB_MODE="disabled")
    commands = readme_commands()
    used = {pattern: [c for c in commands if re.search(pattern, c)] for pattern in SKIP}
    assert all(used.values()), f"SKIP entries that match no README command: {[p for p, c in used.items() if not c]}"
    run = [c for c in commands if not any(re.search(p, c) for p in SKIP)]
    assert len(run) >= 13, run  # the extraction found the blocks
    failed = []
    for command in SETUP + run:
        code, err = run_command(small(command), tmp_path, env)
        if code != 0:
            failed.append(f"{command}\n  -> exit {code}: {err.strip()[-600:]}")
    assert not failed, "README commands that fail:\n" + "\n".join(failed)
    assert (tmp_path / "runs" / "default" / "topk-d1024-k32" / "cfg.json").is_file()
    assert (tmp_path / "report" / "index.html").is_file() and (tmp_path / "eval.json").is_file()


# What a ```python block of the docs leaves to the reader, given here (block text -> name and stand-in).
STAND_INS = {
    "my_blocks()": ("my_blocks", lambda: [torch.rand(1000, 64) for _ in range(3)]),  # CACHING.md: your activations
}
# ```python blocks this test does not run, each with why (a fragment of the block -> the reason).
PYTHON_SKIP: dict[str, str] = {}
DOCS = ["README.md"] + sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))


def python_blocks() -> list[tuple[str, str]]:
    """(page, code) of every ```python block of the README and of docs/*.md."""
    return [(page, block) for page in DOCS for block in re.findall(r"```python\n(.*?)```", (ROOT / page).read_text(), re.S)]


def test_every_python_block_of_the_docs_runs(tmp_path, monkeypatch):
    """As written, from a folder holding the cache they read (a small one at caches/default)."""
    sparse_cache(tmp_path / "caches" / "default", rows=8192, d=32)
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks()
    assert len(blocks) >= 3, blocks  # the extraction found them
    used = {f for f in PYTHON_SKIP if any(f in code for _, code in blocks)}
    assert used == set(PYTHON_SKIP), f"PYTHON_SKIP entries that match no block: {set(PYTHON_SKIP) - used}"
    for page, code in blocks:
        if any(f in code for f in PYTHON_SKIP):
            continue
        scope = {name: value for fragment, (name, value) in STAND_INS.items() if fragment in code}
        try:
            exec(compile(code, page, "exec"), scope)
        except Exception as e:
            pytest.fail(f"the python block of {page} fails as written: {type(e).__name__}: {e}\n{code}")


def make_dry_run(target: str, **variables: str) -> str:
    """What `make -n TARGET` would run (no make flags of a make this test may run under)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    out = subprocess.run(["make", "-n", "-C", str(ROOT), target] + [f"{k}={v}" for k, v in variables.items()],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return re.sub(r"\\\n\s*", " ", out.stdout)


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_train_and_sweep_write_the_cache_first_when_it_is_missing_or_incomplete(tmp_path):
    cache = tmp_path / "caches" / "default"
    for target in ("train", "sweep"):
        plan = make_dry_run(target, CACHE=str(cache))
        assert f"pipeline cache --tokens 2000000 --out {cache} --resume" in plan, plan
        assert plan.index("pipeline cache") < plan.index(f"pipeline {target}")
    # What cache-ready does, run for real with the writer replaced by an echo: it writes (resumes) the
    # cache when the manifest is missing or says complete: false, and leaves a complete one alone.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}

    # The Python running this test reads the manifest, and `setup` is taken as done: with no .venv in
    # this checkout (a worktree using another's), make would build one, a minute of pip install.
    bin_dir = Path(sys.executable).parent

    def writes_cache() -> bool:
        out = subprocess.run(["make", "-s", "-C", str(ROOT), "-o", f"{bin_dir}/.installed", "cache-ready",
                              f"BIN={bin_dir}", f"CACHE={cache}", "CACHE_CMD=echo WRITE"],
                             env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return "WRITE" in out.stdout

    assert writes_cache()
    cache.mkdir(parents=True)
    (cache / "manifest.json").write_text('{"complete": false}')
    assert writes_cache()
    (cache / "manifest.json").write_text('{"complete": true}')
    assert not writes_cache()


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_train_takes_its_tokens_from_the_config_the_readme_quotes():
    train = next(line for line in make_dry_run("train").splitlines() if "pipeline train" in line)
    assert "--config configs/train_default.toml" in train and "--tokens" not in train, train
    tokens = build_config(TrainConfig, ROOT / "configs" / "train_default.toml", {}, section="train").tokens
    assert f"`make train` (`configs/train_default.toml`, {tokens // 10**6}M tokens" in (ROOT / "docs" / "TRAINING.md").read_text()
    assert f"--tokens {tokens}" in make_dry_run("train", TRAIN_TOKENS=str(tokens))
