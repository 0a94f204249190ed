# Two commands matter on a fresh machine with only Python 3.11:
#   make run    create .venv, install, run the main job on generated images (CPU, about 5 minutes)
#   make test   create .venv if needed, run the whole test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install run test test-fast bench gpu-check clean

$(STAMP): requirements.txt requirements-dev.txt requirements-export.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/python train.py

# Every test, the slow ones included (the default `pytest` run skips tests marked slow).
test: $(STAMP)
	$(BIN)/python -m pytest -m "slow or not slow"

test-fast: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python -m pytest bench/ -s

# On a machine with a CUDA GPU (uses its own torch/Triton): correctness tests, timings, training steps -> $$OUT.
gpu-check:
	bench/gpu_check.sh

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks
