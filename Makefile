# geode: one-command setup. `make test` and `make demo` create .venv from nothing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.geode-installed

.PHONY: test demo lint format clean setup chromium bubblewrap

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

# Debian's chromium for the headless browser test (apt-get where root; see the script).
chromium:
	@sh scripts/ensure-chromium.sh

# Debian's bubblewrap: the sandbox's second isolation tool (tests/eval/test_sandbox_attacks.py
# runs every attack through it and through unshare).
bubblewrap:
	@sh scripts/ensure-apt.sh bwrap bubblewrap "the sandbox's bwrap tests"

test: lint chromium bubblewrap
	$(VENV)/bin/pytest -q

# The lifecycle in miniature (geode quickstart, docs/quickstart.md): data, tokenizer, teacher,
# distilled student vs from-scratch control, SFT, WARM, OAIF, GRPO, SCoRe -> DEMO/REPORT.md and
# DEMO/final. --resume: a rerun continues an interrupted demo (a finished one is not redone).
DEMO := demo_out
DEMO_MINUTES := 10
demo: $(STAMP)
	$(VENV)/bin/geode quickstart --out $(DEMO) --budget-minutes $(DEMO_MINUTES) --resume

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache demo_out
