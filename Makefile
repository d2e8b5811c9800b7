# Two commands: `make demo` (the product, end to end on a local MLflow) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint chromium clean

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

clean:
	rm -rf $(VENV) demo .pytest_cache .ruff_cache
