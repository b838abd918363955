# make demo: set up .venv and train the wafer example on an embedded Ray runtime.
# make test: set up .venv and run the whole suite (unit, integration, e2e).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch that the project pins first; the project's range admits it.
TORCH_VERSION := 2.13.0
SETUP_STAMP := $(VENV)/.setup-done
PYTEST_ARGS ?=

.PHONY: setup demo test lint format bench clean

setup: $(SETUP_STAMP)

$(SETUP_STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

demo: setup
	$(BIN)/python jobs/train.py --config examples/wafer/config.yaml

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: setup
	$(BIN)/python benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
