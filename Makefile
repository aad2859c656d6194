# The README's two commands. Both create .venv when needed and are idempotent.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1

.PHONY: quickstart test lint clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

# torch first, pinned exactly: on these machines pip finds the local CPU wheel; a range
# would pull the newest release with several GB of CUDA packages.
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install "torch==2.13.0"
	$(BIN)/pip install -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed pyproject.toml
	$(BIN)/pip install -e ".[dev]"
	touch $@

quickstart: $(VENV)/.installed
	$(BIN)/refrl quickstart

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -n auto --dist loadscope --durations=15

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check src tests benchmarks

clean-venv:
	rm -rf $(VENV)
