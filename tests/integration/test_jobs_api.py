"""/model/job end to end: the real control plane, its in-process worker, and real measuring
children loading a tiny model built here (no downloads)."""

from __future__ import annotations

import asyncio
import pickle
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from control_plane.jobs import MESSAGE_AVAILABLE, MESSAGE_QUEUED
from tests.harness import Api, make_settings, serve
from tests.tiny_model import (
    REMOTE_CODE_MARKER,
    build_pickle_only_model,
    build_remote_code_model,
    build_tiny_model,
)

TINY = "test/tiny"
PICKLED = "test/pickled"
REMOTE = "test/remote"


class _Payload:
    """Unpickling this writes a marker file: proof that something unpickled the weights."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, ...]:
        return (Path.write_text, (self.marker, "pickle ran"))


def plant_pickle_payload(model_dir: Path) -> Path:
    marker = model_dir / "PICKLE_RAN"
    (model_dir / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    return marker


@pytest.fixture(scope="module")
def model_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bench-models")
    build_tiny_model(root / TINY)
    plant_pickle_payload(build_pickle_only_model(root / PICKLED))
    build_remote_code_model(root / REMOTE)
    return root


@pytest.fixture
async def japi(
    db_dsn: str, tmp_path: Path, model_root: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Api]:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    settings = make_settings(
        db_dsn, tmp_path / "data", model_dirs=str(model_root), include_packaged_models=False
    )
    async with serve(settings) as base, aiohttp.ClientSession() as session:
        yield Api(base, session, settings)


async def request(api: Api, model: str) -> dict[str, Any]:
    status, body = await api.call("POST", "/model/job", {"model": model})
    assert status == 200, body
    assert set(body) == {"model", "success", "message", "startTime", "endTime", "modified"}
    assert body["model"] == model
    return body  # type: ignore[no-any-return]


async def poll(api: Api, model: str, timeout_s: float = 120.0) -> dict[str, Any]:
    """Poll /model/job as a script would, until the answer is no longer "queued"."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        body = await request(api, model)
        if body["message"] != MESSAGE_QUEUED:
            return body
        assert asyncio.get_running_loop().time() < deadline, "the job did not finish in time"
        await asyncio.sleep(0.25)


async def test_request_measure_and_list(japi: Api, db: asyncpg.Pool) -> None:
    # A session of its own: its 100 connections go idle (and are closed by the server's
    # keep-alive limit) while the polling below uses the fixture's session.
    async with aiohttp.ClientSession() as burst_session:
        burst = Api(japi.base, burst_session, japi.settings)
        answers = await asyncio.gather(*(request(burst, TINY) for _ in range(100)))
    assert all(a["success"] for a in answers)
    assert {a["message"] for a in answers} <= {MESSAGE_QUEUED, MESSAGE_AVAILABLE}
    assert await db.fetchval("SELECT count(*) FROM model_jobs WHERE model = $1", TINY) == 1

    done = await poll(japi, TINY)
    assert done["success"] is True and done["message"] == MESSAGE_AVAILABLE
    assert done["startTime"].endswith("Z") and done["endTime"].endswith("Z")
    assert done["startTime"] <= done["endTime"]

    status, listed = await japi.call("GET", "/model/list")
    assert status == 200
    [item] = [m for m in listed if m["name"] == TINY]
    assert item["benchmarked"] is True
    # The tiny model is ~0.6 MB of weights; the agent process (Python, torch) is what weighs.
    assert 0.1 < item["requiredRAM"] < 4.0

    profile = await db.fetchrow("SELECT * FROM model_profiles WHERE model = $1", TINY)
    phases = profile["phases"]
    assert profile["device_kind"] == "cpu" and profile["load_s"] > 0
    assert [p["concurrency"] for p in phases] == [1, 2, 4]
    peaks = [p["peakRssBytes"] for p in phases]
    assert peaks == sorted(peaks)
    assert all(p["tokensPerSecond"] > 0 for p in phases)
    assert profile["required_ram_bytes"] == round(item["requiredRAM"] * 1e9)
    assert profile["required_ram_bytes"] >= peaks[0]

    again = await request(japi, TINY)
    assert again["message"] == MESSAGE_AVAILABLE and again["endTime"] == done["endTime"]
    assert await db.fetchval("SELECT count(*) FROM model_jobs WHERE model = $1", TINY) == 1


async def test_pickle_only_weights_fail_and_nothing_is_unpickled(
    japi: Api, model_root: Path
) -> None:
    failed = await poll(japi, PICKLED)
    assert failed["success"] is False
    assert failed["message"] == "Unsafe weights format (pickle); only safetensors are loaded."
    assert failed["endTime"] is not None
    assert not (model_root / PICKLED / "PICKLE_RAN").exists()


async def test_remote_code_fails_and_nothing_is_imported(japi: Api, model_root: Path) -> None:
    failed = await poll(japi, REMOTE)
    assert failed["success"] is False
    assert "needs remote code" in failed["message"]
    assert not (model_root / REMOTE / REMOTE_CODE_MARKER).exists()


async def test_unknown_model_offline_fails_at_once_and_can_be_requested_again(
    japi: Api, db: asyncpg.Pool
) -> None:
    first = await request(japi, "nobody/nothing")
    assert first["success"] is False
    assert "not found" in first["message"] and "offline" in first["message"]
    assert first["startTime"] is not None and first["endTime"] is not None
    assert await request(japi, "nobody/nothing") == first  # the failure stands for a while

    await db.execute("UPDATE model_jobs SET finished_at = finished_at - interval '1 hour'")
    retried = await request(japi, "nobody/nothing")
    assert retried["success"] is False and retried["modified"] != first["modified"]
    assert await db.fetchval("SELECT count(*) FROM model_jobs") == 2


async def test_a_model_that_appears_after_failing_is_queued_again(
    japi: Api, model_root: Path, db: asyncpg.Pool
) -> None:
    name = "late/arrival"
    assert "not found" in (await request(japi, name))["message"]
    plant_pickle_payload(build_pickle_only_model(model_root / name))
    queued = await request(japi, name)
    assert queued["success"] is True and queued["message"] == MESSAGE_QUEUED
    failed = await poll(japi, name)
    assert failed["message"].startswith("Unsafe weights format")
    assert await db.fetchval("SELECT count(*) FROM model_jobs WHERE model = $1", name) == 2


@pytest.mark.parametrize("body", [{}, {"model": "../etc"}, {"model": "a/b/c"}, {"model": 3}])
async def test_invalid_model_ids_are_refused(japi: Api, body: dict[str, Any]) -> None:
    status, answer = await japi.call("POST", "/model/job", body)
    assert status == 422 and answer["code"] == "invalid_model"


async def test_a_key_is_required(japi: Api) -> None:
    status, answer = await japi.call("POST", "/model/job", {"model": TINY}, key=None)
    assert status == 401 and answer["code"] == "unauthorized"
