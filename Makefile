# arrow-tensor: `make run` shows the integrity check, `make test` runs every test.
# Everything runs from .venv (created by `make install`); dora starts python nodes with the
# `python` on PATH, so .venv/bin goes first on PATH for every recipe.

SHELL := /bin/bash
PYTHON ?= python3.11
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
export PATH := $(BIN):$(PATH)

.PHONY: help install run test test-unit test-integration check lint format bench test-gpu example clean

help:
	@echo "make install           create .venv (dora-rs 1.1.0, torch $(TORCH_SPEC), arrow_tensor editable)"
	@echo "make run               run dataflow.yml: tensor_source -> validator, PASS/FAIL"
	@echo "make test              unit and integration tests (pytest)"
	@echo "make check             integrity run over the full case matrix (for your CI)"
	@echo "make lint              ruff check + ruff format --check"
	@echo "make bench | test-gpu | example"

install: $(STAMP)

# torch goes in before the library so pip never resolves a CUDA build for it; the stamp makes
# a second `make install` a no-op until a pyproject changes.
$(STAMP): pyproject.toml libs/arrow_tensor/pyproject.toml
	@test -x $(BIN)/python || { echo "+ $(PYTHON) -m venv $(VENV)"; $(PYTHON) -m venv $(VENV); }
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet dora-rs==1.1.0 dora-rs-cli==1.1.0 pyarrow numpy pyyaml xxhash matplotlib
	$(BIN)/python -m pip install --quiet -e "libs/arrow_tensor[dev]"
	@touch $(STAMP)

run: install
	dora run dataflow.yml

test: install
	$(BIN)/python -m pytest -m "not gpu" $(PYTEST_ARGS)

test-unit: install
	$(BIN)/python -m pytest -m "not gpu and not integration" $(PYTEST_ARGS)

test-integration: install
	$(BIN)/python -m pytest -m integration $(PYTEST_ARGS)

# The validator over every case: all dtypes x layouts x sizes up to 64 MiB, then tensors past
# dora's 256 MiB message cap (1 GiB included), once chunked and once as arrow_tensor chooses.
# Exits non-zero on any corruption or drop; JSON reports land in out/.
check: install
	REPORT_PATH=$(CURDIR)/out/arrow_tensor_check.json dora run tests/integration/dataflows/full_matrix.yml
	TRANSPORT=chunked REPORT=$(CURDIR)/out/large_tensors_chunked.json \
	  dora run tests/integration/dataflows/large_tensors/dataflow.yml
	TRANSPORT= REPORT=$(CURDIR)/out/large_tensors_auto.json \
	  dora run tests/integration/dataflows/large_tensors/dataflow.yml

# ruff for style; import-linter for the rooms' one-way imports and cycles (pyproject.toml,
# [tool.importlinter]; ARCHITECTURE.md explains the layers).
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Every method side by side (benchmarks/run.py); decode time with every message equally
# cold (20 ms idle after each ack: back to back, a 64 MiB copy evicts the receiver's caches);
# then the loaned shared-memory tensor's latency from 4 KiB to 1 GiB, warmed up
# (benchmarks/shm_latency.py).
bench: install
	$(BIN)/python benchmarks/run.py
	$(BIN)/python benchmarks/run.py --sizes 4K,1M,64M --layouts contiguous \
		--methods raw_dora,at,at_numpy --gap-ms 20 --name cold-$$(date -u +%Y%m%dT%H%M%SZ)
	$(BIN)/python benchmarks/shm_latency.py

# The GPU tests with the interpreter's own CUDA torch (`make test-gpu PYTHON=python3` on a GPU
# box): a venv that sees PYTHON's packages, so its torch is used and the CPU pin is installed
# only where PYTHON has no torch at all (the tests then skip, saying why). `-x`: the first
# failure stops the run; tests/gpu/device_run.sh is the same for a lent machine.
GPU_VENV := .venv-gpu
test-gpu:
	@test -x $(GPU_VENV)/bin/python || $(PYTHON) -m venv --system-site-packages $(GPU_VENV)
	@$(GPU_VENV)/bin/python -c "import torch" 2>/dev/null || \
	  $(GPU_VENV)/bin/python -m pip install --quiet "$(TORCH_SPEC)"
	$(GPU_VENV)/bin/python -m pip install --quiet dora-rs==1.1.0 dora-rs-cli==1.1.0 pyarrow \
	  numpy pyyaml xxhash pytest pytest-timeout hypothesis
	$(GPU_VENV)/bin/python -m pip install --quiet --no-deps -e libs/arrow_tensor
	PATH=$(CURDIR)/$(GPU_VENV)/bin:$$PATH $(GPU_VENV)/bin/python -m pytest tests/gpu -x $(PYTEST_ARGS)

example: install
	@if [ -f examples/vision_pipeline/dataflow.yml ]; then \
	dora run examples/vision_pipeline/dataflow.yml; \
	else echo "examples/vision_pipeline does not exist yet"; exit 1; fi

clean:
	rm -rf out .pytest_cache .ruff_cache
