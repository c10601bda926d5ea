# GeoGate: `make run` starts the demo (gateway + regional backends), `make test` runs the tests.
# Both create .venv and install what they need on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: run test lint bench perf clean

$(VENV)/.run-installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.test-installed: pyproject.toml scripts/install-system-deps.sh scripts/install-bench-deps.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	bash scripts/install-system-deps.sh
	touch $@

run: $(VENV)/.run-installed
	$(PY) -m gateway demo

test: $(VENV)/.test-installed
	$(PY) -m ruff check gateway backend tests bench
	$(PY) -m ruff format --check gateway backend tests bench
	$(PY) -m mypy gateway backend
	$(PY) -m pytest

bench: $(VENV)/.test-installed
	$(PY) bench/run.py

# GeoGate against nginx, HAProxy, a plain aiohttp proxy (about 13 min; see README, Benchmark)
perf: $(VENV)/.test-installed
	$(PY) bench/perf.py

clean:
	rm -rf $(VENV) bench/out
