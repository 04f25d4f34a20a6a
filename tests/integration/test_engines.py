"""Engine selection through the control plane: chosen from the model's files, overridable per load.

Fake agents in real subprocesses; what reached the agent is read from its command line.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.fake_agent import write_fake_model
from tests.harness import Api, instance_pid, load, make_settings, mark_measured, serve, wait_status

FAKE_AGENT = [sys.executable, str(Path(__file__).resolve().parents[1] / "fake_agent.py")]
needs_llama_cpp = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed"
)


@pytest.fixture
async def eapi(db_dsn: str, tmp_path: Path) -> AsyncIterator[Api]:
    models = tmp_path / "models"
    write_fake_model(models, "fake/weights", delay_s=0.01)
    # A GGUF file is a model by its name alone; the fake agent reads fake.json beside it.
    (models / "fakegguf").mkdir(parents=True)
    (models / "fakegguf" / "tiny.gguf").write_bytes(b"GGUF" + b"\0" * 60)
    (models / "fakegguf" / "fake.json").write_text(json.dumps({"mode": "ok", "delay_s": 0.01}))
    (models / "fake" / "embedder").mkdir(parents=True)
    (models / "fake" / "embedder" / "config.json").write_text(
        json.dumps({"architectures": ["BertModel"]})
    )
    (models / "fake" / "embedder" / "model.safetensors").write_bytes(b"\0" * 64)
    (models / "fake" / "embedder" / "fake.json").write_text(json.dumps({"mode": "ok"}))
    settings = make_settings(
        db_dsn,
        tmp_path / "data",
        model_dirs=str(models),
        agent_command=FAKE_AGENT,
        start_timeout_s=4.0,
        include_packaged_models=False,
    )
    async with serve(settings) as base, aiohttp.ClientSession() as session:
        api = Api(base, session, settings)
        for name in ("fake/weights", "fakegguf/tiny", "fake/embedder"):
            await mark_measured(api, name, 50_000_000)
        yield api


async def agent_argv(api: Api, model: str) -> list[str]:
    pid = await instance_pid(api, model)
    raw = await asyncio.to_thread(Path(f"/proc/{pid}/cmdline").read_bytes)
    return raw.decode().split("\0")


def option(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


async def test_safetensors_run_on_transformers_and_llama_cpp_is_refused(eapi: Api) -> None:
    status, body = await eapi.call(
        "POST", "/model/load", {"model": "fake/weights", "engine": "llama.cpp"}
    )
    assert status == 422 and body["code"] == "engine_unavailable"
    assert "GGUF files only" in body["error"]
    status, body = await eapi.call("POST", "/model/load", {"model": "fake/weights", "engine": "x"})
    assert status == 422 and body["code"] == "invalid_field"
    await load(eapi, "fake/weights")
    running = await wait_status(eapi, "fake/weights", "RUNNING")
    assert running["engine"] == "transformers"
    assert option(await agent_argv(eapi, "fake/weights"), "--engine") == "transformers"


async def test_a_model_that_generates_no_text_has_no_engine(eapi: Api) -> None:
    status, body = await eapi.call(
        "POST", "/model/load", {"model": "fake/embedder", "engine": "transformers"}
    )
    assert status == 422 and body["code"] == "engine_unavailable"
    await load(eapi, "fake/embedder")
    running = await wait_status(eapi, "fake/embedder", "RUNNING")
    assert running["engine"] is None
    assert "--engine" not in await agent_argv(eapi, "fake/embedder")


@needs_llama_cpp
async def test_a_gguf_is_served_as_is_by_llama_cpp_and_keeps_its_engine(eapi: Api) -> None:
    await load(eapi, "fakegguf/tiny")
    running = await wait_status(eapi, "fakegguf/tiny", "RUNNING")
    assert running["engine"] == "llama.cpp"
    argv = await agent_argv(eapi, "fakegguf/tiny")
    assert option(argv, "--engine") == "llama.cpp"
    assert option(argv, "--gguf-file") == "tiny.gguf"
    # Served from the catalog's own folder: nothing was converted into the model store.
    assert Path(option(argv, "--model-dir") or "").name == "fakegguf"
    assert not (eapi.settings.model_store / "fakegguf").exists()
    # Asking for another engine while it runs is refused; asking for the same one retunes.
    status, body = await eapi.call(
        "POST", "/model/load", {"model": "fakegguf/tiny", "engine": "transformers"}
    )
    assert status == 409 and body["code"] == "engine_in_use"
    retuned = await load(eapi, "fakegguf/tiny", engine="llama.cpp", concurrency=2)
    assert retuned["concurrency"] == 2
