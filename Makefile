# The two commands: `make demo` and `make test`. Each builds .venv itself.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: test torture demo bench bench-quick bench-tools lint postgres pgbouncer clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# One stamp per extra: reinstall when the metadata changes.
$(VENV)/.stamp-%: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[$*]'
	touch $@

# PostgreSQL server binaries: PATH, then /usr/lib/postgresql/*/bin, then
# Debian's package when we are root; otherwise say what to install.
postgres:
	@if command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
	  :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "PostgreSQL server not found: installing Debian's postgresql package"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	else \
	  echo "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found."; \
	  echo "Install them, e.g.: sudo apt-get install postgresql   (Debian/Ubuntu)"; \
	  echo "or put their directory on PATH."; exit 1; \
	fi

# PgBouncer for tests/test_scaleout.py: PATH or /usr/sbin, else Debian's package when root.
pgbouncer:
	@if command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ]; then \
	  :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "pgbouncer not found: installing Debian's pgbouncer package"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbouncer >/dev/null; \
	else \
	  echo "pgbouncer not found (tests/test_scaleout.py needs it)."; \
	  echo "Install it, e.g.: sudo apt-get install pgbouncer   (Debian/Ubuntu)"; exit 1; \
	fi

test: postgres pgbouncer $(VENV)/.stamp-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The torture test with fresh seeds for SECONDS (a failure prints the seed that reproduces it).
SECONDS ?= 600
torture: postgres $(VENV)/.stamp-test
	PGPOOL_TORTURE_SECONDS=$(SECONDS) $(BIN)/python -m pytest tests/test_torture.py -k for_long -s $(PYTEST_ARGS)

demo: postgres $(VENV)/.stamp-demo
	$(BIN)/python demo/run_demo.py

# wrk (load generator) and pgbouncer (one e2e row): Debian packages, installed when root.
bench-tools:
	@if command -v wrk >/dev/null 2>&1 && { command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ]; }; then \
	  :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian's wrk and pgbouncer packages"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk pgbouncer >/dev/null; \
	else \
	  echo "bench needs wrk (and pgbouncer for one row): sudo apt-get install wrk pgbouncer"; exit 1; \
	fi

bench: postgres bench-tools $(VENV)/.stamp-bench
	$(BIN)/python bench/run_all.py

bench-quick: postgres bench-tools $(VENV)/.stamp-bench
	$(BIN)/python bench/run_all.py --quick

lint: $(VENV)/.stamp-lint $(VENV)/.stamp-test
	$(BIN)/ruff check pgpool_wsgi tests demo bench
	$(BIN)/mypy

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
