# geode: one-command setup. `make test` and `make demo` create .venv from nothing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.geode-installed

.PHONY: test demo lint format clean setup

setup: $(STAMP)

# torch first, pinned to the CPU wheel that lies on local disk here; a plain `torch`
# requirement would pull a multi-GB CUDA build. See README for the GPU alternative.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: lint
	$(VENV)/bin/pytest -q

demo: $(STAMP)
	$(PY) -m geode.demo

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache demo_out
