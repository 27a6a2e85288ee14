# Two entry points for a fresh machine: `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export AMAT_DATA_DIR ?= $(abspath ../shared/data)

.PHONY: venv demo test benchmark reproduce clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/amat-monai demo

test: venv
	$(PY) -m pytest -q

# speed ratios taken side by side in one run (docs/PERFORMANCE.md); torchattacks is needed for the attack one
benchmark: venv
	$(PY) scripts/benchmark.py --quick

# docs/RESULTS.md on real data in $$AMAT_DATA_DIR (about an hour per task on 2 CPU cores; resumable)
reproduce: venv
	$(PY) scripts/reproduce.py --protocol cpu --task all

clean:
	rm -rf $(VENV) .venv-label demo_runs reproduce_runs .pytest_cache
