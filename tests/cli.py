"""Running the command line from a test: the repository root and an offline environment."""

from __future__ import annotations

import io
import os
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cli_env(home: Path, **extra: str) -> dict:
    """One torch thread, offline Hub, W&B offline into the run folder, `home` as HOME."""
    return {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline", **extra}


def run_pipeline(*args) -> tuple[int, str, str]:
    """`pipeline ARGS` in this process, through the function the `pipeline` script calls: (exit
    status, stderr, stdout). A process per command costs seconds of imports; the tests where the
    process itself matters (signals, kills, output to a file descriptor) start one."""
    from pipeline.cli import main

    out, err, argv = io.StringIO(), io.StringIO(), sys.argv
    sys.argv = ["pipeline", *map(str, args)]
    try:
        with redirect_stdout(out), redirect_stderr(err):
            main()
    except SystemExit as e:  # main always exits
        return e.code, err.getvalue(), out.getvalue()
    finally:
        sys.argv = argv
    raise AssertionError("pipeline's main returned without exiting")
