# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv when it is missing.
# `make serve` runs it for real on this machine: Prefect server and UI, deployments, a worker (Ctrl-C stops).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test serve install clean sysdeps

# Debian packages the tests need: PostgreSQL server binaries (the suite starts its own cluster) and Chromium
# (tests/test_browser_retry.py clicks through the Prefect UI in it).
SYSTEM_PACKAGES := postgresql postgresql-contrib chromium

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Reinstall when the project's dependencies change.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/retroauth demo

serve: $(STAMP)
	$(BIN)/retroauth serve $(SERVE_ARGS)

# Two test processes (pytest-xdist), each taking whole files: most of the suite waits on servers and
# subprocesses, so two halve its time on two cores. `make test TEST_WORKERS=0` runs it in one process.
TEST_WORKERS ?= 2

test: $(STAMP) sysdeps
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

sysdeps:
	@if ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || [ ! -x /usr/bin/chromium ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES); \
	  else echo "PostgreSQL server binaries or Chromium missing: install $(SYSTEM_PACKAGES) (tests on PostgreSQL or in the browser will be skipped)"; fi; \
	fi

clean:
	rm -rf $(VENV) var .pytest_cache
