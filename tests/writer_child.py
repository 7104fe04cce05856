"""Child process for crash tests: writes a synthetic cache and SIGKILLs itself at a chosen point.

usage: python -m tests.writer_child CACHE FORMAT POINT K N_STEPS
POINT: 'stage' (K-th shard table staged), 'rename' (K-th rename), 'manifest' (just after the
K-th manifest write), 'none'.
"""

import os
import signal
import sys

import pipeline.backends as backends
import pipeline.writer as writer_mod
from pipeline.writer import WriterConfig
from tests.synthetic import write_synthetic

path, fmt, point, k, n_steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
calls = {"n": 0}


def die_after(fn):
    def wrapped(*args, **kwargs):
        result = fn(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == k:
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    return wrapped


if point == "stage":
    writer_mod.stage_table = die_after(backends.stage_table)
elif point == "manifest":
    writer_mod.write_manifest = die_after(writer_mod.write_manifest)
elif point == "rename":
    import pathlib

    pathlib.Path.rename = die_after(pathlib.Path.rename)
write_synthetic(path, n_steps, WriterConfig(format=fmt, shard_mb=0.002))
