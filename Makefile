# Two commands matter on a fresh machine with only Python 3.11:
#   make run    create .venv, install, run the main job on generated images (CPU, about 5 minutes)
#   make test   create .venv if needed, run the whole test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install run test test-fast bench gpu-check lock clean

# The locks (requirements/*.txt: exact versions with hashes) are what gets installed; requirements/*.in are their
# sources. `make lock` refreshes the locks from the sources, deliberately (README, "Installs").
LOCK_TOOL := uv==0.13.9
LOCK := $(abspath $(BIN))/uv pip compile --universal --python-version 3.11 --generate-hashes --quiet \
	--custom-compile-command "make lock"

$(STAMP): requirements/dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --require-hashes -r requirements/dev.txt
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/python train.py

# Every test, the slow ones included (the default `pytest` run skips tests marked slow).
test: $(STAMP)
	$(BIN)/python -m pytest -m "slow or not slow" --durations=25

test-fast: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python -m pytest bench/ -s

# On a machine with a CUDA GPU (uses its own torch/Triton): correctness tests, timings, training steps -> $$OUT.
gpu-check:
	bench/gpu_check.sh

# Refresh every lock to the newest releases the sources allow (dev first; the extras take its versions, gpu takes
# runtime's), then reinstall. Commit the locks after `make test` passes.
lock:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "$(LOCK_TOOL)"
	cd requirements && $(LOCK) --upgrade dev.in -o dev.txt
	cd requirements && for extra in runtime export timm curate; do \
		$(LOCK) --upgrade $$extra.in -c dev.txt -o $$extra.txt || exit 1; done
	cd requirements && $(LOCK) --upgrade gpu.in -c runtime.txt -o gpu.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --require-hashes -r requirements/dev.txt
	touch $(STAMP)

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks
