# Entry points (see README): `make demo` and `make test` create .venv on first use; `make gpu-check OUT=DIR` runs on a
# GPU machine as it is (its own python3 and packages, no install, no package index).
# TORCH pins the CPU wheel this project's machines carry; on a CUDA machine use e.g. `make demo TORCH=torch`.
# EXTRA picks the ONNX Runtime wheel: cpu (onnxruntime) or cuda (onnxruntime-gpu + triton) -- never both.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
EXTRA ?= cpu
BIN := $(VENV)/bin
GPU_PYTHON ?= python3
OUT ?= gpu-check-out

.PHONY: demo test test-slow test-all fuzz gpu-check triton-check clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first, pinned: an unpinned resolver would pull a multi-GB CUDA build.
$(VENV)/.core: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[$(EXTRA)]"
	touch $@

$(VENV)/.test: pyproject.toml $(VENV)/.core
	$(BIN)/python -m pip install -q -e ".[$(EXTRA),test]"
	touch $@

demo: $(VENV)/.core
	$(BIN)/reformer-rt demo

# `make test`: every test but the `slow` ones (deselected, not skipped). `make test-slow`: only those.
# `make test-all`: all of them. CI (.ci/run) runs make test, make triton-check and three slow modules.
test: $(VENV)/.test
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: $(VENV)/.test
	$(BIN)/python -m pytest -q -m slow

test-all: $(VENV)/.test
	$(BIN)/python -m pytest -q

# The fuzzing of the tests (input contract, and the server against the Open Inference Protocol documents), longer
# than the suite's 40 / 25 examples per test.
fuzz: $(VENV)/.test
	REFORMER_RT_FUZZ_EXAMPLES=$${REFORMER_RT_FUZZ_EXAMPLES:-2000} $(BIN)/python -m pytest -q -p no:logging \
		tests/test_fuzz_inputs.py tests/runtime/serving/test_protocol_fuzz.py

# STEPS=session,bench reruns a subset; exit 2 (at once) where there is no CUDA GPU.
gpu-check:
	$(GPU_PYTHON) tools/gpu_check.py --out "$(OUT)" $(if $(STEPS),--steps "$(STEPS)")

# A Triton Inference Server model repository under a real tritonserver (2.51, CPU), against reformer-rt serve.
triton-check: $(VENV)/.test
	$(BIN)/python tools/triton_check.py

clean-venv:
	rm -rf $(VENV)
