# The README's two commands: `make bench` (the main job) and `make test` (the suite).
# Both install what they need on a fresh machine: the CPU build of torch where no torch
# is importable (a plain `torch` requirement would pull the multi-GB CUDA build), Triton,
# then this package with its extras; without CUDA also the `cpu` extra (a numpy that
# Triton 3.6's interpreter accepts).
PYTHON ?= python3
PIP := $(PYTHON) -m pip install --quiet --disable-pip-version-check
# Expanded when install's recipe starts, before torch may be installed: no torch means
# the CPU build is about to be installed.
EXTRAS = test,bench$(shell $(PYTHON) -c "import torch; print('' if torch.cuda.is_available() else ',cpu')" 2>/dev/null || echo ,cpu)

.PHONY: install test bench

install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) torch==2.13.0
	$(PYTHON) -c "import triton" 2>/dev/null || $(PIP) "triton==3.6.0"
	$(PIP) -e ".[$(EXTRAS)]"

# Two workers: the interpreter is single-threaded Python, so a 2-core CI machine runs the
# suite in about half the time. By group: tests sharing one multi-process run (the
# protocol suite) stay on one worker, which runs it once.
test: install
	$(PYTHON) -m pytest -q -n 2 --dist loadgroup

bench: install
	$(PYTHON) -m benchmarks.bench_moe
	$(PYTHON) -m benchmarks.bench_fp8
