# rlcm-exp. `make help` lists the targets.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
SCALE   ?= full
# training runs at once in reproduce-paper: 1 at full scale (use --launcher for GPUs), 2 on CPU scales
JOBS    ?= $(if $(filter full,$(SCALE)),1,2)
export HF_HUB_OFFLINE ?= 1
# the tests' xdist workers: one intra-op thread each (tests/conftest.py); loadgroup keeps an xdist_group
# (a module, or a named group) on one worker; units start in collection order (slow tests first)
WORKERS ?= 2
XDIST   := -n $(WORKERS) --dist loadgroup --no-loadscope-reorder

.PHONY: help install demo test test-fast lint format toy-model toy-flow-model bench gpu-check gpu-wheels reproduce-paper clean

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "} {printf "  %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	# torch first, pinned: an unpinned requirement would pull a multi-GB CUDA build
	$(BIN)/pip install torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -e '.[dev,launchers,rewards,memory]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install the package (torch pinned first)

demo: $(STAMP)  ## the quickstart: RLCM on the toy world, a few minutes on a CPU
	$(BIN)/python -m rlcm_exp experiment=quickstart

test: $(STAMP)  ## the whole CPU suite, learning tests included (not gpu/hub/long): CI's command, 2 workers, ~33 min on 2 cores
	$(BIN)/python -m pytest -q -m "not gpu and not hub and not long" $(XDIST) --durations=25

test-fast: $(STAMP)  ## the inner loop: unit, hand-worked, tiny-model tests in process (not slow/subprocess/gpu/hub), ~5 min on 2 cores
	$(BIN)/python -m pytest -q -m "not slow and not subprocess and not gpu and not hub" $(XDIST)

lint: $(STAMP)  ## ruff lint + format check, mypy on src/
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/mypy

format: $(STAMP)  ## apply ruff fixes and formatting
	$(BIN)/ruff check --fix src tests
	$(BIN)/ruff format src tests

toy-model: $(STAMP)  ## retrain the toy world's weights from seed 0 (~50 min on one CPU core)
	# one thread, as the committed weights were made (recipe.json): same float reduction order
	$(BIN)/python -m rlcm_exp.toy.recipe --out src/rlcm_exp/toy/weights --seed 0 --threads 1

toy-flow-model: $(STAMP)  ## retrain the toy flow pair (model=toy_flow: rectified-flow teacher + few-step student) from seed 0 (~50 min on one busy CPU core)
	$(BIN)/python -m rlcm_exp.toy.recipe --family flow --out src/rlcm_exp/toy/weights_flow --seed 0 --threads 1

bench: $(STAMP)  ## phase benchmark of RLCM and DDPO vs the model-compute floor, 1 vs all transitions/call (toy, < 10 min on a CPU)
	# one intra-op thread: on the 2-core CPU two OpenMP threads ran these 1M-parameter models ~4x slower
	OMP_NUM_THREADS=1 $(BIN)/python -m benchmarks.bench --scale toy --repeats 3 --compare-transitions-per-forward --out benchmarks/results --readme benchmarks/README.md

gpu-check: $(STAMP)  ## full-size random-weight RLCM and DDPO rounds per paper task and two SD3.5 flow rounds on one GPU (<= 10 min, no downloads)
	$(BIN)/python -m benchmarks.bench.gpu_check --out benchmarks/results

gpu-wheels: $(STAMP)  ## gpu_wheels/: the wheels an air-gapped GPU image lacks (< 40 MiB); there: OUT=DIR benchmarks/gpu/run.sh
	PY=$(BIN)/python benchmarks/gpu/wheels.sh gpu_wheels

reproduce-paper: $(STAMP)  ## paper Figs. 4-7 + experiments/paper/$(SCALE)/ (SCALE=full|smoke, or the toy study: toy-tune then toy; JOBS=N); finished runs skipped
	$(BIN)/python -m rlcm_exp.reproduce --scale $(SCALE) --jobs $(JOBS)

clean:  ## remove run outputs (not the venv)
	rm -rf outputs multirun .pytest_cache .ruff_cache .mypy_cache
