# careloop: `make run` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed

.PHONY: run test test-scale lint typecheck bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $(STAMP)

## run: install, migrate and serve on embedded defaults (SQLite under var/, in-process worker)
run: $(STAMP)
	$(VENV)/bin/careloop db upgrade
	$(VENV)/bin/careloop serve

## lint: ruff, the import-linter layering contracts and mypy (strict on the packages)
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

## test: lint, then the whole test suite
test: lint
	$(VENV)/bin/pytest $(PYTEST_ARGS)

## test-scale: scale-out on PostgreSQL and a private Redis: 2 replicas, 3 workers, beat, 20,000 messages, kills (minutes)
test-scale: $(STAMP)
	$(VENV)/bin/pytest -m scale -s tests/scale $(PYTEST_ARGS)

## bench: intake, mappings, timeline, outreach (PostgreSQL), FHIR in, the closed loop, booking and outcomes; tables printed, JSON in bench/results/
bench: $(STAMP)
	$(PY) bench/bench_intake.py
	$(PY) bench/bench_mappings.py
	$(PY) bench/bench_timeline.py
	$(PY) bench/bench_outreach.py
	$(PY) bench/bench_fhir.py
	$(PY) bench/bench_closed_loop.py
	$(PY) bench/bench_booking.py
	$(PY) bench/bench_outcomes.py
	$(PY) bench/bench_workers.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
