# Quick start: `make demo` (set up + the natural-image demo) and `make test` (set up + the tests).
#
# Set-up goes into the project's own virtualenv .venv (made with `$(PYTHON) -m venv`), so it works
# on an "externally managed" interpreter (Debian/Ubuntu, PEP 668) with nothing else set up. Inside
# an active virtualenv or conda environment, that environment is used instead.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= 2.13.0

ifneq ($(VIRTUAL_ENV)$(CONDA_PREFIX),)
  PY := $(PYTHON)
  STAMP := .setup-active-env
  RUN :=
else
  PY := $(VENV)/bin/python
  STAMP := $(VENV)/.setup-done
  # As if .venv were activated: the tests' subprocesses (`ray`, `python`, `dist-sae`) come from it too.
  RUN := PATH="$(CURDIR)/$(VENV)/bin:$$PATH" VIRTUAL_ENV="$(CURDIR)/$(VENV)"
endif

.PHONY: setup demo test bench

setup: $(STAMP)

# An interpreter that already has torch (a GPU machine's CUDA build) lends it to .venv through
# --system-site-packages, untouched; otherwise .venv is clean and gets the pinned torch
# (scripts/install_torch.py: the CPU wheel without a GPU) before the package, so a bare `torch`
# requirement never pulls GBs of CUDA packages.
$(VENV)/bin/python:
	@if $(PYTHON) -c "import torch" 2>/dev/null; then sys=--system-site-packages; else sys=; fi; \
	$(PYTHON) -m venv $$sys $(VENV) || { echo "error: '$(PYTHON) -m venv' failed; on Debian/Ubuntu: sudo apt-get install python3-venv" >&2; exit 1; }

$(STAMP): pyproject.toml $(if $(filter $(VENV)/%,$(STAMP)),$(VENV)/bin/python)
	@$(PY) scripts/install_torch.py $(TORCH)
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

demo: setup
	$(RUN) $(PY) -m dist_sae demo

# The report's browser test needs Debian's Chromium (apt-get install chromium); without it, say so once.
# PYTEST_ARGS: e.g. make test PYTEST_ARGS=tests/unit/test_config.py
test: setup
	@command -v chromium >/dev/null || command -v chromium-headless-shell >/dev/null || \
	echo "note: no headless Chromium, so the report's browser test is skipped (sudo apt-get install chromium)"
	$(RUN) $(PY) -m pytest -q $(PYTEST_ARGS)

bench: setup
	$(RUN) $(PY) -m dist_sae bench
