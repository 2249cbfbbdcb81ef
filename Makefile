# Each target bootstraps .venv itself; the stamp file re-runs pip when requirements.txt changes.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint bench clean

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

demo: $(STAMP)
	WANDB_MODE=$${WANDB_MODE:-offline} $(PY) train.py

# The full suite, what CI (.ci/run) runs.
test: $(STAMP)
	WANDB_MODE=offline $(PY) -m pytest

# All but the tests marked slow (training, extra processes, seconds each): a few times faster.
test-fast: $(STAMP)
	WANDB_MODE=offline $(PY) -m pytest -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	@for script in bench/bench_*.py; do echo "== $$script"; $(PY) $$script || exit 1; done

clean:
	rm -rf runs .pytest_cache
