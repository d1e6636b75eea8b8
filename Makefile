# The two commands of the README:
#   make demo   trains a small model on scikit-learn's digits, analyzes its checkpoints, writes reports/digits/
#   make test   runs the test suite
# Both create .venv from scratch when it is missing and install the project with the pins of constraints.txt.
# A torch that the venv's Python can already import (e.g. VENV_ARGS=--system-site-packages with your own
# CUDA build) is honoured: its pin is dropped from the constraints instead of replacing it.

PYTHON ?= python3
VENV ?= .venv
VENV_ARGS ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.diag-installed
PYTEST_ARGS ?=

.PHONY: demo test lint format bench clean-venv readme

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV_ARGS) $(VENV)
	@if $(PY) -c "import torch" 2>/dev/null; then \
	  echo "make: using the torch already installed ($$($(PY) -c 'import torch; print(torch.__version__)'))"; \
	  grep -v '^torch==' constraints.txt > $(VENV)/constraints.txt; \
	else cp constraints.txt $(VENV)/constraints.txt; fi
	$(PY) -m pip install --quiet --disable-pip-version-check -c $(VENV)/constraints.txt -e '.[dev,hf]'
	@$(PY) -m compileall -q diagnostics cli >/dev/null  # byte code, as a wheel install has (PYTHONDONTWRITEBYTECODE)
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/digits_demo.py --out reports/digits

test: $(STAMP)
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest: no tests were selected"; exit 0; fi; exit $$rc

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(STAMP)
	$(PY) benchmarks/bench_hessian.py

clean-venv:
	rm -rf $(VENV)

readme: $(STAMP)
	$(PY) -m diag_cli.docs
