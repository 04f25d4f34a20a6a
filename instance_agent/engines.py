"""Which engine generates for a model: llama.cpp for a GGUF file where installed, else transformers.

Standard library only: the control plane and the benchmarker decide the engine before an agent
starts (a GGUF served by llama.cpp needs no conversion), and the agent decides it again the same
way. `llama-cpp-python` is looked up, never imported, here.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Literal

EngineName = Literal["transformers", "llama.cpp"]
ENGINES: tuple[EngineName, ...] = ("transformers", "llama.cpp")
TRANSFORMERS: EngineName = "transformers"
LLAMA_CPP: EngineName = "llama.cpp"


class EngineUnavailable(ValueError):
    """The engine asked for cannot serve this model here (the message says why)."""


def llama_cpp_installed() -> bool:
    """Whether `llama-cpp-python` can be imported in this environment (it is not imported)."""
    return importlib.util.find_spec("llama_cpp") is not None


def parse_engine(value: object) -> EngineName | None:
    """A requested engine name, None when left out; ValueError for anything else."""
    if value is None:
        return None
    if value == TRANSFORMERS:
        return TRANSFORMERS
    if value == LLAMA_CPP:
        return LLAMA_CPP
    raise ValueError(f"engine must be one of {', '.join(ENGINES)}, not {value!r}")


def choose_engine(requested: EngineName | None, *, gguf: bool, llama_available: bool) -> EngineName:
    """The engine for a model: `requested`, or llama.cpp for GGUF when available, else transformers.

    Raises `EngineUnavailable` when llama.cpp is asked for a model it cannot serve here.
    """
    if requested == TRANSFORMERS:
        return TRANSFORMERS
    if requested == LLAMA_CPP:
        if not gguf:
            raise EngineUnavailable("the llama.cpp engine serves GGUF files only")
        if not llama_available:
            raise EngineUnavailable("the llama.cpp engine is not installed (llama-cpp-python)")
        return LLAMA_CPP
    return LLAMA_CPP if gguf and llama_available else TRANSFORMERS


def cpu_threads() -> int:
    """An engine's thread count: OMP_NUM_THREADS when set, else the CPUs this process may use.

    Read at every call, not at import, so a child forked from the zygote (which imported torch
    under another environment) gets its own figure, as a fresh process would.
    """
    requested = os.environ.get("OMP_NUM_THREADS", "")
    if requested.isdigit() and int(requested) > 0:
        return int(requested)
    # Respects CPU affinity and cgroup-pinned sets, unlike os.cpu_count().
    return max(1, len(os.sched_getaffinity(0)))
