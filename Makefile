# Two entry points (see README): `make demo` and `make test`. Both create .venv on first use.
# TORCH pins the CPU wheel this project's machines carry; on a CUDA machine use e.g. `make demo TORCH=torch`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo test clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first, pinned: an unpinned resolver would pull a multi-GB CUDA build.
$(VENV)/.core: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.test: pyproject.toml $(VENV)/.core
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

demo: $(VENV)/.core
	$(BIN)/reformer-rt demo

test: $(VENV)/.test
	$(BIN)/python -m pytest -q

clean-venv:
	rm -rf $(VENV)
