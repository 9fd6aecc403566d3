# Two commands do everything on a fresh machine:  make demo   and   make test
# Both create .venv when missing and (re)install the project when its sources change.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.curate-installed
# torch/torchvision first, pinned to the releases on this machine's disk (pip takes them from there;
# a plain `torch` would pull a multi-GB build from the index).
TORCH  := torch==2.14.1 torchvision==0.29.1
SOURCES := pyproject.toml $(shell find curate filters reports pipelines -name '*.py' -o -name '*.toml' 2>/dev/null)
PYTEST_ARGS ?=

.PHONY: demo test install clean help chromium lint

help:
	@echo "make demo   - install into .venv and run the offline end-to-end demo"
	@echo "make test   - install into .venv and run the test suite"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# A plain (lenient) editable install: its import hook maps curate.filters/.reports/.pipelines to
# the top-level folders in every process, Ray workers included (they put the driver's working
# directory on sys.path, where ./curate would shadow a strict install's link tree). A subpackage
# missing from pyproject's list is caught by tests/test_packaging.py, which builds the wheel.
$(STAMP): $(SOURCES) | $(BIN)/python
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/curate demo --out demo-output

# The report test opens the HTML in headless Chromium; install Debian's chromium when it is missing
# and we are root (idempotent: nothing happens when /usr/bin/chromium exists).
chromium:
	@if [ ! -x /usr/bin/chromium ]; then \
	  if [ "$$(id -u)" = "0" ]; then apt-get update -qq && apt-get install -y -qq chromium; \
	  else echo "chromium missing: run 'sudo apt-get install -y chromium' (the report test needs it)"; fi; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: $(STAMP) chromium lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf build demo-output .pytest_cache test-artifacts
