"""Numeric precision of a training step: `fp32`, `tf32` or `bf16`, and `auto` per device.

- `fp32`: IEEE float32 everywhere.
- `tf32`: float32 weights and tensors, matmuls on TensorFloat-32 units (CUDA; 10-bit mantissa
  products with float32 accumulation). On a CPU it is the same as fp32.
- `bf16`: autocast to bfloat16 for the matmuls (their outputs, hence the latents, are bf16), while
  the master weights, Adam's moments, the losses (mse and the penalties are promoted to float32
  where they meet the float32 input), the metrics and the firing counts stay float32. Exports are
  float32 either way (SAELens loads them).

`auto` is bf16 on CUDA (the matmul units are ~12x faster in bf16 than in plain fp32 there) and fp32
elsewhere (a CPU without bf16 matrix units runs bf16 matmuls slower than fp32 ones).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from pipeline.errors import PipelineError

PRECISIONS = ("auto", "fp32", "tf32", "bf16")


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """`precision` with `auto` replaced by the device's default; an unknown name is a PipelineError."""
    if precision not in PRECISIONS:
        raise PipelineError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    return "bf16" if torch.device(device).type == "cuda" else "fp32"


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for `device_type` (on the meta device: a replay's `MetaAutocast`)."""
    if device_type == "meta":
        from trainer.step_trace import MetaAutocast

        return MetaAutocast.active > 0
    return torch.is_autocast_enabled(device_type)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes matmuls in on `device_type`, or None when it is off."""
    if not autocast_enabled(device_type):
        return None
    if device_type == "meta":
        from trainer.step_trace import MetaAutocast

        return MetaAutocast.dtypes[-1]
    return torch.get_autocast_dtype(device_type)


@contextlib.contextmanager
def compute_precision(precision: str, device: torch.device | str) -> Iterator[None]:
    """The context a training step (forward and backward) runs in for `precision` on `device`:
    autocast for bf16, TF32 matmuls for tf32 (restored on exit), nothing for fp32."""
    device_type = torch.device(device).type
    precision = resolve_precision(precision, device)
    if precision == "bf16" and device_type == "meta":
        # A replay at real sizes (trainer.step_trace): autocast cannot reach meta tensors.
        from trainer.step_trace import MetaAutocast

        with MetaAutocast(torch.bfloat16):
            yield
    elif precision == "bf16":
        with torch.autocast(device_type, dtype=torch.bfloat16):
            yield
    elif precision == "tf32":
        old = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(old)
    else:
        yield

