# Quick start: `make demo` (set up + the natural-image demo) and `make test` (set up + the tests).
PYTHON ?= python3

.PHONY: setup demo test bench

# The pinned CPU torch goes in first: a bare `torch` requirement would pull GBs of CUDA packages.
setup:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e '.[test]'

demo: setup
	$(PYTHON) -m dist_sae demo

test: setup
	$(PYTHON) -m pytest -q

bench: setup
	$(PYTHON) scripts/bench.py
