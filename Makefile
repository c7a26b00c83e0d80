# Two commands do all set-up on a fresh machine:
#   make run    install, then run the API and its workers on embedded defaults (no external server)
#   make test   install (redis-server and postgresql too), then run the whole test suite
#   make test-fast   install, then only the in-process tests (`pytest -m "not e2e"`: no redis-server,
#               uvicorn or celery processes)
VENV ?= .venv
PYTHON ?= python3
HOST ?= 127.0.0.1
PORT ?= 8000
SHARED ?= ../shared

# The real pretrained weights beside the checkout, when present (no download at run time).
ifneq ($(wildcard $(SHARED)/weights),)
export VISIONTUNE_WEIGHTS_DIR ?= $(abspath $(SHARED)/weights)
endif

.PHONY: install run test test-fast redis-server postgresql chromium wrk bench

$(VENV)/.installed: pyproject.toml constraints.txt clients/python/pyproject.toml app/console/vendor.py
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -c constraints.txt -e clients/python -e '.[test]'
	$(VENV)/bin/python -m app.console.vendor  # the console's charting library, from the npm registry
	touch $@

install: $(VENV)/.installed

run: install
	$(VENV)/bin/visiontune up --host $(HOST) --port $(PORT)

redis-server:
	@command -v redis-server >/dev/null || (apt-get update && apt-get install -y redis-server)

# The tests start their own PostgreSQL server (Debian keeps its programs in /usr/lib/postgresql/*/bin).
postgresql:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || (apt-get update && apt-get install -y postgresql)

# The console's browser tests drive Debian's Chromium (browsers cannot be downloaded here).
chromium:
	@command -v chromedriver >/dev/null || (apt-get update && apt-get install -y chromium chromium-driver)

# bench/serve_wrk.py's load generator
wrk:
	@command -v wrk >/dev/null || (apt-get update && apt-get install -y wrk)

test: install redis-server postgresql chromium
	$(VENV)/bin/lint-imports
	$(VENV)/bin/pytest

test-fast: install
	$(VENV)/bin/pytest -m "not e2e"

bench: install wrk
	$(VENV)/bin/python bench/e2e_linear_probe.py
	$(VENV)/bin/python bench/full_throughput.py
	$(VENV)/bin/python bench/accuracy_table.py
	$(VENV)/bin/python bench/serve_load.py
	$(VENV)/bin/python bench/serve_wrk.py
