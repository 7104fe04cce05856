#!/usr/bin/env bash
# The wheels `benchmarks/gpu_suite.py` needs on a GPU machine that has Python 3.12, torch, numpy,
# pyarrow, transformers, huggingface_hub, typer, rich, xxhash, safetensors (the lent H100/H200 image)
# but no network: downloaded here for CPython 3.12 manylinux x86-64, no dependencies resolved.
# Usage: bash benchmarks/gpu_wheels.sh [DIR]   (default .whl; `make gpu-wheels`). About 12 MB.
# wandb is left out (20 MB with its OpenTelemetry stack): the suite stubs it, nothing it runs logs.
set -euo pipefail
dir="${1:-.whl}"
mkdir -p "$dir"
platforms=()
for p in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_24_x86_64 manylinux_2_27_x86_64 \
         manylinux_2_28_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux_2_35_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$dir" \
    "zarr==3.1.6" "numcodecs==0.17.1" "donfig==0.8.1.post1" "google-crc32c==1.9.0" \
    "datasets==5.2.0" "dill==0.4.1" "multiprocess==0.70.19" \
    "transformer-lens==3.9.0" "better-abc==0.0.3" "fancy-einsum==0.0.3" "beartype==0.23.1" "typeguard==4.6.1" \
    "sae-lens==6.54.12" "simple-parsing==0.1.9" "docstring-parser==0.18.0" "python-dotenv==1.2.4" "tenacity==9.2.1"
ls "$dir"
du -sh "$dir"
