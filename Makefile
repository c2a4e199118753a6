# The README's two commands: `make bench` (the main job) and `make test` (the suite).
# Both install what they need on a fresh machine: the CPU build of torch where no torch
# is importable (a plain `torch` requirement would pull the multi-GB CUDA build), Triton
# with a numpy its CPU interpreter accepts, then this package with its extras.
PYTHON ?= python3
PIP := $(PYTHON) -m pip install --quiet --disable-pip-version-check

.PHONY: install test bench

install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) torch==2.13.0
	$(PYTHON) -c "import triton" 2>/dev/null || $(PIP) "triton==3.6.0" "numpy<2.4"
	$(PIP) -e ".[test,bench]"

test: install
	$(PYTHON) -m pytest -q

bench: install
	$(PYTHON) benchmarks/bench_moe.py
