"""/model/list: the demo model and models from MLCP_MODEL_DIRS, in the Bytez v1 shape."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from benchmarker.catalog import DEMO_MODEL, EMBEDDING_MODEL
from control_plane.bootstrap import refresh_catalog
from tests.harness import ADMIN_KEY, Api, make_settings, serve


def hf_model(folder: Path, arch: str = "GPT2LMHeadModel") -> None:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"architectures": [arch]}))
    (folder / "model.safetensors").write_bytes(b"\0" * 1000)
    (folder / "tokenizer.json").write_text("{}")


async def list_models(base: str, body: Any = None, method: str = "GET") -> list[dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method, base + "/model/list", json=body, headers={"Authorization": f"Key {ADMIN_KEY}"}
        ) as resp,
    ):
        assert resp.status == 200, await resp.text()
        models: list[dict[str, Any]] = await resp.json()
        return models


async def test_demo_model_is_listed_unbenchmarked(api: Api) -> None:
    for method in ("GET", "POST"):
        status, models = await api.call(method, "/model/list")
        assert status == 200
        demo = {m["name"]: m for m in models}[DEMO_MODEL]
        assert demo["requiredRAM"] is None
        assert demo["benchmarked"] is False
        assert demo["task"] == "text-generation"
        assert {"name", "requiredRAM", "benchmarked", "task"} <= set(demo)


async def test_models_from_model_dirs_are_listed(db_dsn: str, tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    hf_model(first / "acme" / "tiny-gpt")
    hf_model(second / "acme" / "classifier", "BertForSequenceClassification")
    (second / "acme" / "quant.Q4_0.gguf").write_bytes(b"GGUF" + b"\0" * 60)
    hf_model(second / "bad--org" / "x")  # not a valid id: never listed
    settings = make_settings(db_dsn, tmp_path / "data", model_dirs=f"{first}, {second}")
    async with serve(settings) as base:
        models = {m["name"]: m for m in await list_models(base)}
    assert set(models) == {
        DEMO_MODEL,
        EMBEDDING_MODEL,
        "acme/tiny-gpt",
        "acme/classifier",
        "acme/quant.Q4_0",
    }
    assert models[EMBEDDING_MODEL]["task"] == "feature-extraction"
    tiny = models["acme/tiny-gpt"]
    assert tiny["task"] == "text-generation"
    assert tiny["requiredRAM"] is None and tiny["benchmarked"] is False
    assert models["acme/classifier"]["task"] == "text-classification"
    # Names come back sorted, so scripts get a stable order.
    names = [m for m in models]
    assert names == sorted(names)


async def test_post_filters_by_task(db_dsn: str, tmp_path: Path) -> None:
    hf_model(tmp_path / "m" / "acme" / "classifier", "BertForSequenceClassification")
    settings = make_settings(db_dsn, tmp_path / "data", model_dirs=str(tmp_path / "m"))
    async with serve(settings) as base:
        text_gen = await list_models(base, {"task": "text-generation"}, "POST")
        classify = await list_models(base, {"task": "text-classification"}, "POST")
        everything = await list_models(base, {}, "POST")
    assert [m["name"] for m in text_gen] == [DEMO_MODEL]
    assert [m["name"] for m in classify] == ["acme/classifier"]
    assert len(everything) == 3  # with the packaged embedding model


async def test_benchmarked_model_shows_required_ram(api: Api, db: asyncpg.Pool) -> None:
    await db.execute(
        "UPDATE models SET required_ram_bytes = 2500000000, benchmarked_at = now() WHERE name = $1",
        DEMO_MODEL,
    )
    status, models = await api.call("GET", "/model/list")
    assert status == 200
    demo = {m["name"]: m for m in models}[DEMO_MODEL]
    assert demo["requiredRAM"] == 2.5
    assert demo["benchmarked"] is True


async def test_models_removed_from_disk_leave_the_list(
    db: asyncpg.Pool, db_dsn: str, tmp_path: Path
) -> None:
    root = tmp_path / "m"
    hf_model(root / "acme" / "gone-soon")
    settings = make_settings(db_dsn, tmp_path / "data", model_dirs=str(root))
    async with serve(settings) as base:
        assert "acme/gone-soon" in [m["name"] for m in await list_models(base)]
        (root / "acme" / "gone-soon" / "config.json").unlink()
        await refresh_catalog(db, settings)
        assert "acme/gone-soon" not in [m["name"] for m in await list_models(base)]
        # Its row stays, as history, and comes back when the files do.
        assert (
            await db.fetchval("SELECT present FROM models WHERE name = 'acme/gone-soon'") is False
        )
        (root / "acme" / "gone-soon" / "config.json").write_text("{}")
        await refresh_catalog(db, settings)
        assert "acme/gone-soon" in [m["name"] for m in await list_models(base)]


async def test_without_packaged_models_the_list_can_be_empty(db_dsn: str, tmp_path: Path) -> None:
    settings = make_settings(db_dsn, tmp_path / "data", include_packaged_models=False)
    async with serve(settings) as base:
        assert await list_models(base) == []


async def test_listing_needs_a_key(api: Api) -> None:
    for method in ("GET", "POST"):
        status, err = await api.call(method, "/model/list", key=None)
        assert status == 401
        assert err == {
            "error": "A valid API key is required: send 'Authorization: Key <key>'.",
            "code": "unauthorized",
        }
