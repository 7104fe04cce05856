# One-command workflows on a fresh clone; every target installs what it needs first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
CACHE ?= caches/default
TOKENS ?= 2000000
CACHE_CMD = $(BIN)/pipeline cache --tokens $(TOKENS) --out $(CACHE) --resume
# Empty: configs/train_default.toml's `tokens` (the one place the default is set).
TRAIN_TOKENS ?=
# glibc returns big per-step buffers to the OS and faults them back in (pipeline/malloc.py): keep them.
export MALLOC_MMAP_THRESHOLD_ ?= 4294967296
export MALLOC_TRIM_THRESHOLD_ ?= 4294967296

.PHONY: setup cache cache-ready train sweep mlp-cache sweep-transcoders tiny-model test test-fast lint bench bench-gpu \
	gpu-wheels clean

setup: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: a plain requirement would pull a multi-GB CUDA build on a CPU machine.
	$(BIN)/pip install -q torch==$(TORCH_VERSION)
	$(BIN)/pip install -q -e ".[test]"
	# circuit-tracer's loaders, for the tests that load our transcoder sets with them: without its
	# dependencies, whose pins (huggingface-hub<1.0, transformers<=4.57.3) conflict with ours; the
	# loaders run in our environment, its ReplacementModel does not (docs/FORMAT.md).
	$(BIN)/pip install -q --no-deps circuit-tracer==0.5.0
	touch $@

cache: setup
	$(CACHE_CMD)

# `make train` / `make sweep` write the cache first (as `make cache`) when it is missing or its
# writer was interrupted (the manifest says complete: false); a complete one is used as it is.
cache-ready: setup
	@$(BIN)/python -c "import json, sys; sys.exit(not json.load(open('$(CACHE)/manifest.json')).get('complete'))" \
		2>/dev/null || $(CACHE_CMD)

# configs/train_default.toml, flags on top, on the cache (written first when missing).
# W&B logs offline unless a key is configured; the run lands in runs/default/topk-d1024-k32/.
train: cache-ready
	$(BIN)/pipeline train --config configs/train_default.toml --cache $(CACHE) \
		$(if $(TRAIN_TOKENS),--tokens $(TRAIN_TOKENS)) --out runs/default --resume

# Every architecture at L0 16, 32 and 64 (18 SAEs, target_l0) from one pass over the default cache:
# runs/sweep/summary.csv and pareto.png compare them at equal L0 (about 7 minutes on 2 CPU cores).
sweep: cache-ready
	$(BIN)/pipeline sweep --config configs/sweep_default.toml --cache $(CACHE) --out runs/sweep --resume

# Every layer's MLP input and output (`--preset mlp`) of the tiny model, in one pass (about 1 GiB).
MLP_CACHE ?= caches/mlp
MLP_TOKENS ?= 500000
mlp-cache: setup
	$(BIN)/pipeline cache --preset mlp --tokens $(MLP_TOKENS) --out $(MLP_CACHE) --resume

# Four per-layer sets of skip-transcoders (L0 8, 16, 32, 64; one per layer) from one pass over the MLP
# cache, each also in circuit-tracer's format (runs/skip_transcoders/<set>/; about 2.5 minutes on 2 CPU cores).
sweep-transcoders: mlp-cache
	$(BIN)/pipeline sweep --config configs/sweep_skip_transcoders.toml --cache $(MLP_CACHE) \
		--out runs/skip_transcoders --resume

tiny-model: setup
	$(BIN)/python -m cache_writer.train_tiny_model

# One pytest worker per core (pytest-xdist): the tests run one torch thread each, so two workers on
# two cores about halve the wall time. TEST_WORKERS=0 runs them in this one process.
TEST_WORKERS ?= auto
TEST_ENV = HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled

test: setup
	$(TEST_ENV) $(BIN)/python -m pytest -q -n $(TEST_WORKERS)

# ruff (pyproject.toml [tool.ruff]): pyflakes and pycodestyle errors, lines of 120 columns.
lint: setup
	$(BIN)/ruff check pipeline cache_writer trainer analysis tests benchmarks

test-fast: setup
	$(TEST_ENV) $(BIN)/python -m pytest -q -n $(TEST_WORKERS) -m "not slow"

bench: setup
	$(BIN)/python benchmarks/bench_writer.py

# Wheels for the GPU machine's own Python 3.12 (it has torch but no network): run here, carry .whl there.
WHEELS ?= .whl
gpu-wheels:
	bash benchmarks/gpu_wheels.sh $(WHEELS)

# On the GPU machine: its python3, the wheels in $(WHEELS), the suite's tables in $(OUT) (BENCHMARKS.md).
OUT ?= runs/gpu_suite
bench-gpu:
	python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $(WHEELS)/*.whl
	PYTHONPATH=/tmp/site:. python3 benchmarks/gpu_suite.py --out $(OUT)

clean:
	rm -rf $(VENV) caches .pytest_cache
