# Merchant Service. `make run` serves it locally, `make test` runs the whole suite.
# Both install what they need from scratch into .venv/ (locked by uv.lock).

PYTHON ?= python3.11
VENV := .venv
UV_VERSION := 0.13.8
BIN := $(VENV)/bin
export DJANGO_SETTINGS_MODULE ?= config.settings

.PHONY: install wrk browser compose compose-check run demo demo-review test chaos fuzz bench lint typecheck snapshots migrate clean

$(BIN)/uv:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

# Reinstall whenever the lock file changes.
$(VENV)/.installed: uv.lock pyproject.toml | $(BIN)/uv
	$(BIN)/uv sync --frozen --python $(BIN)/python
	touch $@

install: $(VENV)/.installed

# wrk, the load generator of `make bench` and of its smoke test in `make test`: Debian's package,
# installed once when missing (as root, else through sudo). Quiet when it is already there.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
wrk:
	@command -v wrk >/dev/null 2>&1 || { \
		echo "installing wrk (apt-get)"; \
		$(SUDO) apt-get update -qq >/dev/null && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }

# Headless Chromium and its WebDriver (Debian's packages), for the ops dashboard's browser test
# in `make test` (tests/workflows/test_dashboard_browser.py). Installed once when missing.
browser:
	@command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || { \
		echo "installing chromium and chromium-driver (apt-get)"; \
		$(SUDO) apt-get update -qq >/dev/null && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }

# The compose CLI, for tests/test_docker.py (`docker compose config` on docker/compose.yaml needs
# no engine): Debian's docker-compose, without the engine it recommends. Installed once when
# neither `docker compose` nor `docker-compose` is there.
compose:
	@docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null 2>&1 || { \
		echo "installing docker-compose (apt-get)"; \
		$(SUDO) apt-get update -qq >/dev/null && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			docker-compose >/dev/null; }

# docker/compose.yaml as compose resolves it (syntax, anchors, variables): no engine needed.
COMPOSE = $(shell docker compose version >/dev/null 2>&1 && echo docker compose || echo docker-compose)
compose-check: compose
	$(COMPOSE) -f docker/compose.yaml config --quiet
	@echo "docker/compose.yaml: valid"

migrate: install
	$(BIN)/python manage.py ensure_database
	$(BIN)/python manage.py migrate --noinput

# Local development: DEBUG on (development SECRET_KEY), webhooks to local hosts allowed.
# Starts web (127.0.0.1:8000), worker, beat and the internal-system stand-in (127.0.0.1:8001)
# from the Procfile; Ctrl-C stops them all. Settings in .env (cp .env.example .env) are read by
# honcho for every step, and win over the environment, as honcho does.
run demo demo-review: export DEBUG ?= true
run demo demo-review: export WEBHOOK_ALLOW_PRIVATE_HOSTS ?= true
run: install
	$(BIN)/honcho run $(BIN)/python manage.py ensure_database
	$(BIN)/honcho run $(BIN)/python manage.py migrate --noinput
	$(BIN)/honcho run $(BIN)/python manage.py collectstatic --noinput -v0
	$(BIN)/honcho start -f Procfile

# With `make run` going in another terminal: one link request, start to verified webhook.
demo: install
	$(BIN)/python -m standin.demo

# The same, for a customer that decides its own reviews: the ambiguous request's
# link.review_required, its candidates, the customer's decision, link.completed.
demo-review: install
	$(BIN)/python -m standin.demo_review

test: install wrk browser compose
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy .
	DJANGO_SETTINGS_MODULE=config.settings_test $(BIN)/pytest

# The whole fault-injection suite (tests/chaos): prints the table, fails on any violation.
chaos: install
	DJANGO_SETTINGS_MODULE=config.settings_test $(BIN)/python -m tests.chaos --json chaos-results.json

# schemathesis against gunicorn on a fresh database (tests/fuzz): every operation, every check,
# positive and negative data, a real customer token; prints the summary, fails on any failure.
# FUZZ_ARGS="--seed N" replays a run, "--max-examples N" changes its length.
fuzz: install
	$(BIN)/python -m tests.fuzz $(FUZZ_ARGS)

# The benchmark (tests/bench, docs/performance.md): the real stack with production settings on a
# fresh database, wrk against the yardstick, the ack path and the status read, N workflows end to
# end, the sweep over 1,000,000 rows. Prints the table, writes bench-results.json. Targets are
# reported, not enforced: it fails only when a stage could not run. BENCH_ARGS="--duration 30".
bench: install wrk
	$(BIN)/python -m tests.bench --json bench-results.json $(BENCH_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy .

# Record the statements' rendered SQL (tests/snapshots/statements.sql) after changing one.
snapshots: install
	SNAPSHOT_UPDATE=1 DJANGO_SETTINGS_MODULE=config.settings_test $(BIN)/pytest -q -p no:cacheprovider tests/test_statements.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache staticfiles
