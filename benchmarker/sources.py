"""Where a requested model's files come from, in order: MLCP_MODEL_DIRS, the Hugging Face cache,
packaged models (these three are what the catalog discovers), then the Hub.

A model id reaches the filesystem only through catalog discovery (which lists folders and
compares names) or the Hub download (which joins a validated id), never as a raw path.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from benchmarker import LoadFailed
from benchmarker.catalog import FoundModel, discover, task_of
from benchmarker.hub import fetch
from benchmarker.measure import Target
from benchmarker.model_store import ModelStoreError, prepare_model
from benchmarker.safety import check_model_folder
from benchmarker.settings import BenchmarkerSettings
from db import queries
from db.queries import Executor
from db.rows import ModelRow


async def find_locally(db: Executor, settings: BenchmarkerSettings, model: str) -> ModelRow | None:
    """The catalog row of `model` if a local source has it, looking at the disk again if needed.

    A folder dropped into MLCP_MODEL_DIRS since the last catalog refresh counts at once.
    """
    row = await queries.get_model(db, model)
    if row is not None and row.present:
        return row
    found = await asyncio.to_thread(
        discover,
        settings.model_dir_paths,
        settings.resolved_hf_cache,
        packaged=settings.include_packaged_models,
    )
    match = next((m for m in found if m.name == model), None)
    if match is None:
        return row if row is not None and row.present else None
    await _record(db, match)
    return await queries.get_model(db, model)


async def _record(db: Executor, m: FoundModel) -> None:
    await queries.upsert_discovered_model(
        db, m.name, m.task, m.source_kind, m.source_path, m.gguf_file, m.param_bytes
    )


def _hub_model(model: str, folder: Path) -> FoundModel:
    config = json.loads((folder / "config.json").read_text("utf-8"))
    weights = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    return FoundModel(model, task_of(config), "hub", str(folder), None, weights or None)


async def resolve(db: Executor, settings: BenchmarkerSettings, model: str, device: str) -> Target:
    """What to load for `model`, fetched and checked; raises a BenchmarkError when it can't be."""
    row = await find_locally(db, settings, model)
    if row is None:
        folder = await fetch(settings.model_store, model)
        await _record(db, await asyncio.to_thread(_hub_model, model, folder))
        row = await queries.get_model(db, model)
        if row is None:
            raise LoadFailed(f"Load error: {model} could not be recorded in the catalog")
    if row.gguf_file is None and row.source_path is not None and row.task != "handler":
        # GGUF is plain tensors; folders can hold pickles or point at code. A handler project
        # is code by design: it runs in its instance only, never here (docs/handlers.md).
        await asyncio.to_thread(check_model_folder, Path(row.source_path), model)
    try:
        target = await prepare_model(row, settings.model_store)
    except ModelStoreError as exc:
        raise LoadFailed(f"Load error: {exc.message}") from exc
    return Target(
        model, target.model_dir, target.gguf_file, device, target.python, engine=target.engine
    )
