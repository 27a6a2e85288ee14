# Two entry points for a fresh machine: `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export AMAT_DATA_DIR ?= $(abspath ../shared/data)

.PHONY: venv demo test benchmark clean

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

clean:
	rm -rf $(VENV) demo_runs .pytest_cache
