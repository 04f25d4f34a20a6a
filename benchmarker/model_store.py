"""Where an instance loads a catalogued model from, and with which engine.

A GGUF file is served as is by the llama.cpp engine where llama-cpp-python is installed
(`instance_agent.engines`). For the transformers engine it is converted once into the model
store: dequantizing SmolLM2's GGUF takes ~20 s on this box, loading the converted safetensors
~3 s, so the conversion (the instance agent's `convert` command, in a child process) happens once
and later loads use the store. Paths come only from catalog rows, never from request strings.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from benchmarker.model_ids import is_valid_model_id
from db.rows import ModelRow
from instance_agent.engines import (
    LLAMA_CPP,
    TRANSFORMERS,
    EngineName,
    EngineUnavailable,
    choose_engine,
    llama_cpp_installed,
)
from instance_agent.environment import python_for_version

logger = logging.getLogger(__name__)

CONVERT_TIMEOUT_S = 600.0
_locks: dict[str, asyncio.Lock] = {}


class ModelStoreError(Exception):
    """The model's files could not be prepared (the message says why, for an instance's reason)."""

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)


@dataclass(frozen=True)
class LoadTarget:
    model_dir: Path
    gguf_file: str | None
    # A deployed handler API's own environment's interpreter; None: the agent's.
    python: str | None = None
    # What generates text; None for models that generate none.
    engine: EngineName | None = None


def engine_for(row: ModelRow, requested: EngineName | None = None) -> EngineName | None:
    """The engine an instance of `row` generates with; None for a model that generates no text.

    Raises `EngineUnavailable` for an engine that cannot serve it here.
    """
    if row.task != "text-generation" or row.source_kind == "apis":
        if requested is not None:
            raise EngineUnavailable(
                f"model {row.name} does not generate text; 'engine' applies to text generation"
            )
        return None
    return choose_engine(
        requested, gguf=row.gguf_file is not None, llama_available=llama_cpp_installed()
    )


def converted_dir(store: Path, model: str) -> Path:
    """The store folder of a converted model; `model` must be a validated id."""
    if not is_valid_model_id(model):
        raise ModelStoreError("invalid model id")
    org, name = model.split("/")
    return store / org / name


def is_converted(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


async def convert_gguf(gguf_path: Path, out: Path) -> None:
    """Convert with `python -m instance_agent convert` in a child; ModelStoreError on failure."""
    out.parent.mkdir(parents=True, exist_ok=True)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "instance_agent",
        "convert",
        "--gguf-file",
        str(gguf_path),
        "--out",
        str(out),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    try:
        _, stderr = await asyncio.wait_for(proc.communicate(), CONVERT_TIMEOUT_S)
    except (TimeoutError, asyncio.CancelledError):
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0 and not is_converted(out):
        tail = stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no output"]
        logger.error("converting %s failed: %s", gguf_path.name, tail[0])
        raise ModelStoreError("could not convert the model's GGUF file")


async def prepare_model(row: ModelRow, store: Path, engine: EngineName | None = None) -> LoadTarget:
    """What the instance agent should load for a catalog row, with `engine` or the default."""
    if row.source_path is None:
        raise ModelStoreError(f"model {row.name} has no local files")
    source = Path(row.source_path)
    if row.source_kind == "apis":
        return LoadTarget(source, None, python_for_version(source))
    try:
        chosen = engine_for(row, engine)
    except EngineUnavailable as exc:
        raise ModelStoreError(str(exc)) from exc
    if row.gguf_file is None:
        return LoadTarget(source, None, engine=chosen)
    if chosen == LLAMA_CPP:
        return LoadTarget(source, row.gguf_file, engine=LLAMA_CPP)
    out = converted_dir(store, row.name)
    if is_converted(out):
        return LoadTarget(out, None, engine=TRANSFORMERS)
    lock = _locks.setdefault(row.name, asyncio.Lock())
    async with lock:
        if not is_converted(out):
            logger.info("converting %s from GGUF into the model store (once)", row.name)
            await convert_gguf(source / row.gguf_file, out)
    return LoadTarget(out, None, engine=TRANSFORMERS)
