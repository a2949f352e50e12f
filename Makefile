# One command sets up and runs each thing; the virtualenv is made on first use and reused.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sparsebk-installed
CONFIG ?= ray_jobs/configs/ptb-cpu.yaml

.PHONY: setup train test bench clean-venv

setup: $(STAMP)

# torch==2.13.0 first: on CPU-only machines here it is a CPU build; the package's own
# range (torch>=2.3) is then already satisfied and pulls nothing more.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

train: $(STAMP)
	$(VENV)/bin/sparsebk train --config $(CONFIG)

# Two pytest-xdist workers, a module whole on one of them, in the order tests/conftest.py
# gives (the modules with Rays of their own first, the short ones last): 1.15-1.2x one process.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

bench: $(STAMP)
	$(VENV)/bin/sparsebk bench all --out bench_out

clean-venv:
	rm -rf $(VENV)
