# The instance agent's image, for hosts that reach a registry:
#     docker build -t mlcp-agent:latest .
# Offline hosts build an equivalent image from this machine's own Python with `make image`
# (python -m instance_agent.image build). The docker runtime (MLCP_RUNTIME=docker) starts one
# container of it per loaded model, mounting the model folder read-only at /model.
FROM python:3.11-slim

# CPU wheels by default (an unpinned torch from PyPI pulls a multi-GB CUDA build). For NVIDIA
# GPUs: --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false

WORKDIR /opt/mlcp
# torch first, in a layer of its own: it is most of the image and changes least.
RUN pip install --index-url "$TORCH_INDEX" torch==2.13.0
COPY pyproject.toml ./
COPY control_plane control_plane
COPY instance_agent instance_agent
COPY benchmarker benchmarker
COPY db db
# llama-cpp-python (the llama.cpp engine) compiles from source: a compiler and cmake for that
# step only, with the Makefile's flags (the library alone, portable AVX2 code).
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake \
    && CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
       -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF" \
       pip install ".[agent]" && rm -rf /opt/mlcp/build \
    && apt-get purge -y build-essential cmake && apt-get autoremove -y \
    && rm -rf /var/lib/apt/lists/*

# Root inside the container: converted model files are written 0600 on the host and the model
# folder is mounted read-only, so the agent must be able to read whatever it finds there.
WORKDIR /root
ENTRYPOINT ["python", "-m", "instance_agent"]
CMD ["--help"]
