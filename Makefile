# Two commands: `make demo` (the product, end to end on a local MLflow) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test scenarios load lint compat package bench-lean-venv chromium clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

demo: $(VENV)/.installed
	$(PY) examples/demo.py

lint: $(VENV)/.installed
	$(PY) -m ruff check src tests examples bench
	$(PY) -m mypy

# The browser test drives Debian's Chromium (installed here when we may; skipped otherwise).
chromium:
	@command -v chromium >/dev/null || [ "$$(id -u)" != 0 ] || { \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

test: lint chromium
	$(PY) -m pytest -m "not scenario"

# Whole-server scenarios, slower (~10 min): SIGTERM after a burst under each server the README
# names, memory under sustained load, MLflow down/slow/failing, the tracking server stopped and
# started again around a redeploy under each adapter (the spool). CI runs them after `make test`.
scenarios: $(VENV)/.installed
	$(PY) -m pytest -m scenario

# The concurrency check at full size: 2,000 requests at concurrency 64 through each of the five
# adapters (the suite runs 200). A local SQLite server ingests ~10-30 traces/s on 2 cores, so this
# takes ~9-17 min; the queue is sized to hold the burst and drained before the traces are
# counted. CI runs it after `make test`.
load: $(VENV)/.installed
	MLFLOW_CTX_LOAD_REQUESTS=2000 MLFLOW_ASYNC_TRACE_LOGGING_MAX_QUEUE_SIZE=20000 \
	  $(PY) -m pytest tests/test_production.py -k concurrent -p no:cacheprovider

# The integration core on the oldest, a middle and the newest mlflow-tracing (lean installs, no
# full mlflow), the oldest frameworks, both ways of naming the experiment, and a sweep of every
# other minor release (tests/compat.py; ~25 min on 2 cores, most of it waiting on the server).
compat: $(VENV)/.installed
	$(PY) tests/compat.py

# The wheel and sdist as users install them: built, installed in clean venvs, smoke-tested.
package: $(VENV)/.installed
	rm -rf dist
	$(PY) -m build --outdir dist . >/dev/null
	$(PY) tests/package_smoke.py dist

# A lean venv on this Python for `bench/instructions.py --python .compat/bench-lean/bin/python`.
bench-lean-venv: $(VENV)/.installed
	$(PYTHON) -m venv .compat/bench-lean
	.compat/bench-lean/bin/pip install --quiet -e . "mlflow-tracing==$$($(PY) -c 'import importlib.metadata as m; print(m.version("mlflow-tracing"))')"

clean:
	rm -rf $(VENV) demo dist .compat .pytest_cache .ruff_cache .mypy_cache
