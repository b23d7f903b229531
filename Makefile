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

# Benchmarks, outside CI. Each writes its JSON result under var/bench/; benchmarks/report.py writes BENCHMARKS.md
# from them. Measured on the shared 2-core box (load average 2-10 from other work): `make bench` about 40 minutes
# once its data is cached under benchmarks/.data (sweep at 3 sizes 5 min, letters 4 min, the 2,000-case day
# 26 min, urgent 5 min); the first run builds that data, roughly an hour more (the 4,000,000-line sweep
# database about half of it). `make bench BENCH_SIZES="250000 1000000"` leaves the 4,000,000-line size out
# (about 2 minutes less, half an hour less on the first run). `make load` (200 urgent triggers within a
# minute) about 35 minutes: it waits up to 30 minutes for every case to be submitted (LOAD_ARGS="--deadline N").
.PHONY: bench load
BENCH_SIZES ?= 250000 1000000 4000000
BENCH_DIR   := var/bench

bench: $(STAMP)
	mkdir -p $(BENCH_DIR)
	$(BIN)/python benchmarks/sweep.py --lines $(BENCH_SIZES) --json $(BENCH_DIR)/sweep.json
	$(BIN)/python benchmarks/letters.py --json $(BENCH_DIR)/letters.json
	$(BIN)/python benchmarks/day.py --json $(BENCH_DIR)/day.json $(DAY_ARGS)
	$(BIN)/python benchmarks/urgent.py --json $(BENCH_DIR)/urgent.json
	$(BIN)/python benchmarks/report.py --dir $(BENCH_DIR)

load: $(STAMP)
	mkdir -p $(BENCH_DIR)
	$(BIN)/python benchmarks/load.py --json $(BENCH_DIR)/load.json $(LOAD_ARGS)
	$(BIN)/python benchmarks/report.py --dir $(BENCH_DIR)
