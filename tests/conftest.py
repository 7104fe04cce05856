"""Shared test settings."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from tests.cli import run_pipeline

# Triton kernels (trainer/kernels/adam_tail.py) are checked on a CPU in Triton's interpreter; it is
# chosen when the kernels are made, so before any test imports them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread per test: the tests' matrices are tiny, and on a busy 2-core machine
    thread wake-ups cost more than the arithmetic (30x slower measured). Restored after."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def cli():
    """`cli(*args)`: `pipeline ARGS` in this process (tests.cli.run_pipeline)."""
    return run_pipeline


@pytest.fixture
def importable(monkeypatch):
    """`importable(folder)`: the modules in `folder` can be imported by `--import` in this process
    until the test ends; then they, and the architectures they registered, are forgotten (a second
    test registering the same name must not meet the first one's class)."""
    from trainer import registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    folders: list[Path] = []

    def add(folder: Path) -> None:
        folders.append(Path(folder).resolve())
        monkeypatch.syspath_prepend(str(folder))

    yield add
    for name, module in list(sys.modules.items()):
        where = getattr(module, "__file__", None)
        if where and any(Path(where).resolve().is_relative_to(f) for f in folders):
            del sys.modules[name]
