# bmlseg: the two commands of the README are `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-fast lint format demo benchmark clean

install: $(STAMP)

# Reinstalls only when pyproject.toml changes; editable, so code edits need no reinstall.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

# Style is checked first, so CI (.ci/run calls make test) never lets it drift.
test: lint
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: install
	$(BIN)/ruff check --fix src tests benchmarks
	$(BIN)/ruff format src tests benchmarks

benchmark: install
	$(BIN)/python benchmarks/loss.py
	$(BIN)/python benchmarks/model.py

# A fresh clone to the method's question in under 15 minutes on 2 CPU cores: a small synthetic
# dataset, its labels scored against the truth, then the clean-label oracle, the BCE baseline and
# APL + soft labels on the CPU recipe as one multirun (experiment=demo), each evaluated on
# held-out test volumes, then the report.
demo: install
	rm -rf demo_runs
	$(BIN)/bmlseg-synth root=demo_runs/data n_subjects=10 seed=0 preview=true
	$(BIN)/bmlseg-labels data.root=demo_runs/data labels=kimriss evaluate=true
	$(BIN)/bmlseg-train experiment=demo data.root=demo_runs/data hydra.sweep.dir=demo_runs/sweep
	$(BIN)/bmlseg-report demo_runs/sweep

clean:
	rm -rf $(VENV) outputs multirun demo_runs .pytest_cache
