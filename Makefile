# One virtual environment in .venv; torch is installed first, pinned to the CPU build on this machine's disk
# (an unpinned torch pulls a multi-GB CUDA build).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: install test style quality

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

test: install
	$(BIN)/python -m pytest

style: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

quality: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
