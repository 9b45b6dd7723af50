# The two commands a newcomer needs: `make run` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
MANAGE := $(BIN)/python manage.py
HOST ?= 127.0.0.1
PORT ?= 8000
# The demo cluster: HAProxy on CLUSTER_PORT, its three app instances on the next three ports (unset: the
# port of the cluster that runs already, else 18080).
CLUSTER_PORT ?=
CLUSTER_PORT_ARG = $(if $(CLUSTER_PORT),--port $(CLUSTER_PORT))
# ansible-runner starts `ansible-playbook`: it must be on PATH.
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: run test test-postgres test-deploy-redis lint venv cluster cluster-stop clean bench bench-reports

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

venv: $(BIN)/.installed

# Install, then in one process (manage.py run_demo): migrate, collect the static files, load the demo,
# start the HAProxy cluster (when haproxy is installed), keep a CI token in var/demo-ci-token, and run
# the web server (gunicorn) and the deploy worker (django-q2) together; Ctrl-C or SIGTERM stops both.
# Every step is idempotent, so a second `make run` starts in seconds.
run: venv
	PORTAL_DEMO=1 exec $(MANAGE) run_demo --bind $(HOST):$(PORT) $(if $(CLUSTER_PORT),--cluster-port $(CLUSTER_PORT))

test: venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-postgres: venv
	DATABASE_URL=$${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres} $(BIN)/python -m pytest $(PYTEST_ARGS)

# The deploy suite again with the Redis broker (on PostgreSQL).
test-deploy-redis: venv
	PORTAL_QUEUE_BROKER=redis DATABASE_URL=$${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres} \
	    $(BIN)/python -m pytest -m deploy $(PYTEST_ARGS)

cluster: venv
	PORTAL_DEMO=1 $(MANAGE) cluster start --bind $(CLUSTER_PORT_ARG)

cluster-stop: venv
	PORTAL_DEMO=1 $(MANAGE) cluster stop

lint: venv
	$(BIN)/ruff check .

# Stops the demo cluster first (its HAProxy and app instances keep their pid files under var/cluster).
clean:
	-test ! -x $(BIN)/python || PORTAL_DEMO=1 $(MANAGE) cluster stop
	rm -rf $(VENV) var

# The benchmarks on PostgreSQL (docs/benchmarks.md): seeds BENCH_DATABASE (default portal_bench) once with
# 100,000 releases, 1,000,000 deployments and 1,000,000 audit events, then measures the API (wrk against
# gunicorn, next to a bare Django app), pages at scale, audit appends and verify_audit; prints a table and
# writes the figures into docs/benchmarks.md. BENCH_SERVER=postgres://user@host:port, BENCH_ARGS="--only api".
bench: venv
	@command -v wrk >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    { apt-get install -y -qq wrk >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }; }; } || \
	    echo "wrk is missing and cannot be installed here: apt-get install -y wrk (the API figures are skipped)"
	$(BIN)/python bench/run.py $(BENCH_ARGS)

# Report exports against PostgreSQL's COPY on 1,000,000 rows (BENCH_ROWS=... to change), on make bench's database.
bench-reports: venv
	$(BIN)/python bench/bench_reports.py
