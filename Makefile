# Two commands: `make demo` (the product, end to end on a local MLflow) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test load lint chromium clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

demo: $(VENV)/.installed
	$(PY) examples/demo.py

lint: $(VENV)/.installed
	$(PY) -m ruff check src tests examples bench

# The browser test drives Debian's Chromium (installed here when we may; skipped otherwise).
chromium:
	@command -v chromium >/dev/null || [ "$$(id -u)" != 0 ] || { \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

test: lint chromium
	$(PY) -m pytest

# The concurrency check at full size: 2,000 requests at concurrency 64 through each of the five
# adapters (the suite runs 200). A local SQLite server ingests ~10-30 traces/s on 2 cores, so this
# takes ~9-17 min; the queue is sized to hold the burst and drained before the traces are
# counted. CI runs it after `make test`.
load: $(VENV)/.installed
	MLFLOW_CTX_LOAD_REQUESTS=2000 MLFLOW_ASYNC_TRACE_LOGGING_MAX_QUEUE_SIZE=20000 \
	  $(PY) -m pytest tests/test_production.py -k concurrent -p no:cacheprovider

clean:
	rm -rf $(VENV) demo .pytest_cache .ruff_cache
