"""Shared test settings."""

from __future__ import annotations

import os

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
