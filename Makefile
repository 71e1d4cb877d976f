# The two commands of the README:  make up  (set up + run the embedded default)  and  make test.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
ENV    ?= environments/local.yaml

.PHONY: setup up down status test bench clean
setup: $(VENV)/.installed

# One venv with the runtime, the on-prem installer and the test tools. torch is pinned in
# pyproject.toml (an unpinned torch would pull a multi-GB CUDA build).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

up: setup
	$(BIN)/herd up $(ENV)

down: setup
	$(BIN)/herd down $(ENV)

status: setup
	$(BIN)/herd status $(ENV)

test: setup
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python bench/serving.py

clean:
	rm -rf $(VENV) .herd
