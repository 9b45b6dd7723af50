# The two commands a newcomer needs: `make run` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: run test test-postgres lint venv migrate demo clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

venv: $(BIN)/.installed

# Install, migrate, load the demo, then serve the admin and the API with gunicorn (Ctrl-C stops it).
run: venv
	mkdir -p var
	PORTAL_DEMO=1 $(BIN)/python manage.py migrate --no-input
	PORTAL_DEMO=1 $(BIN)/python manage.py collectstatic --no-input --verbosity 0
	PORTAL_DEMO=1 $(BIN)/python manage.py demo_data
	@PORTAL_DEMO=1 $(BIN)/python manage.py create_token --ci --application MAC --name demo-ci > var/demo-ci-token
	@echo ""
	@echo "  Release Portal: http://$(HOST):$(PORT)/admin/"
	@echo "  Logins (password = user name): alice (developer), bob and carol (releasers), dave (auditor), admin"
	@echo "  API docs: http://$(HOST):$(PORT)/api/v1/docs"
	@echo "  CI token for MAC: $$(tail -n 1 var/demo-ci-token)"
	@echo ""
	PORTAL_DEMO=1 exec $(BIN)/gunicorn portal.wsgi --bind $(HOST):$(PORT) --workers 2 --access-logfile -

test: venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-postgres: venv
	DATABASE_URL=$${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres} $(BIN)/python -m pytest $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) var
