"""torch.distributed for every stage: the process group torchrun describes, or none at all.

`torchrun --nproc-per-node N -m pipeline ...` sets RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR /
MASTER_PORT; `init()` joins that group (nccl on GPUs, gloo on CPU). Without torchrun the world
size is 1 and nothing here needs a process group: every helper is then a no-op, so one process
runs exactly the code it ran before.
"""

from __future__ import annotations

import atexit
import json
import os
from typing import Any

import torch
import torch.distributed as dist

from pipeline import errors
from pipeline.errors import PipelineError


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) without it."""
    try:
        return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError:
        raise PipelineError("RANK / WORLD_SIZE / LOCAL_RANK are not integers; launch with torchrun") from None


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else env_world()[1]


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else env_world()[0]


def is_main() -> bool:
    return rank() == 0


def device_for(device: str) -> str:
    """The device this rank works on: torchrun gives one GPU per local rank ('auto'/'cuda' -> cuda:LOCAL_RANK)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and world_size() > 1:
        device = f"cuda:{env_world()[2]}"
    return device


def init(device: str = "auto") -> int:
    """Join torchrun's process group (once); returns the world size. A no-op for one process."""
    _, size, local = env_world()
    if size <= 1 or dist.is_initialized():
        return world_size()
    if not dist.is_available():
        raise PipelineError("this torch build has no torch.distributed; run one process (without torchrun)")
    if "MASTER_ADDR" not in os.environ:
        raise PipelineError("WORLD_SIZE is set but MASTER_ADDR is not; launch with torchrun, which sets both")
    on_gpu = device_for(device).startswith("cuda")
    if on_gpu:
        torch.cuda.set_device(local)
    # nccl only moves CUDA tensors; gloo moves CPU ones (and is what CPU-only machines have).
    dist.init_process_group(backend="nccl" if on_gpu else "gloo")
    # Left to the interpreter's teardown, gloo's worker threads can abort the process ("terminate
    # called without an active exception", SIGABRT: seen once in our 2-rank sweep test). torch asks
    # programs to call destroy_process_group before they exit; atexit does it while Python is alive.
    atexit.register(shutdown)
    return dist.get_world_size()


def shutdown() -> None:
    """Leave the process group (a no-op without one); `init` registers it to run at exit."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def _device() -> torch.device:
    """Where collectives' tensors must live: nccl moves CUDA tensors only."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _encode(obj: Any) -> torch.Tensor:
    # JSON, not pickle: nothing a rank receives is ever unpickled.
    return torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8).to(_device())


def broadcast(obj: Any, src: int = 0) -> Any:
    """`obj` of rank `src` on every rank (a JSON value: tuples arrive as lists)."""
    if world_size() <= 1:
        return obj
    data = _encode(obj) if dist.get_rank() == src else None
    n = torch.tensor([len(data) if data is not None else 0], dtype=torch.long, device=_device())
    dist.broadcast(n, src=src)
    if data is None:
        data = torch.empty(int(n), dtype=torch.uint8, device=_device())
    dist.broadcast(data, src=src)
    return json.loads(bytes(data.cpu().tolist()))


def all_gather(obj: Any) -> list[Any]:
    """Every rank's `obj` (a JSON value), in rank order."""
    if world_size() <= 1:
        return [obj]
    data = _encode(obj)
    sizes = [torch.zeros(1, dtype=torch.long, device=_device()) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([len(data)], dtype=torch.long, device=_device()))
    longest = max(int(n) for n in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8, device=_device())
    padded[:len(data)] = data
    parts = [torch.empty(longest, dtype=torch.uint8, device=_device()) for _ in sizes]
    dist.all_gather(parts, padded)
    return [json.loads(bytes(part[:int(n)].cpu().tolist())) for part, n in zip(parts, sizes)]


def agree(fn, *args, **kwargs) -> Any:
    """Run `fn` on rank 0 only and hand its result, or its PipelineError, to every rank.

    Checks that only rank 0 may do (it alone touches shared state) then fail on every rank with the
    same one-line message instead of leaving the others waiting at the next collective.
    """
    result: tuple = ("ok", None)
    if is_main():
        try:
            result = ("ok", fn(*args, **kwargs))
        except PipelineError as e:
            result = ("error", (type(e).__name__, str(e)))
    result = broadcast(result)
    if result[0] == "error":
        name, message = result[1]
        raise getattr(errors, name, PipelineError)(message)
    return result[1]
