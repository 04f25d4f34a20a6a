"""The `ray` runtime on a real local Ray cluster (two nodes on loopback, tests/ray_cluster.py):
the Bytez walkthrough, placement across nodes by memory, logs through the actor, an actor
killed with ray.kill, a node lost, adoption after a restart and orphaned actors."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from control_plane.reconciler import reconcile
from control_plane.runtimes.base import InstanceSpec
from control_plane.runtimes.ray import KILLED, NAMESPACE, RayRuntime, actor_name
from control_plane.settings import Settings
from tests.fake_agent import write_fake_model
from tests.harness import (
    ADMIN_KEY,
    Api,
    app_state,
    free_port,
    load,
    make_settings,
    mark_measured,
    serve,
    wait_status,
)
from tests.integration.test_instances import FAKE_AGENT
from tests.ray_cluster import GiB, RayCluster

pytestmark = pytest.mark.ray

GB = 1_000_000_000
MODELS: dict[str, dict[str, Any]] = {
    "fake/ok": {"mode": "ok", "delay_s": 0.01},
    "fake/a": {"mode": "ok"},
    "fake/b": {"mode": "ok"},
    "fake/slow": {"mode": "slow", "delay_s": 0.3, "tokens": 20},
    "fake/load-fail": {"mode": "load_fail"},
    "fake/huge": {"mode": "ok"},
    # 6 s a streamed request: long enough to lose its node half-way.
    "fake/big": {"mode": "slow", "delay_s": 0.3, "tokens": 20},
}


def ray_settings(db_dsn: str, tmp_path: Path, cluster: RayCluster, **overrides: Any) -> Settings:
    models = tmp_path / "models"
    for name, behaviour in MODELS.items():
        write_fake_model(models, name, **behaviour)
    values: dict[str, Any] = {
        "runtime": "ray",
        "ray_address": cluster.address,
        "model_dirs": str(models),
        "agent_command": FAKE_AGENT,
        "start_timeout_s": 30.0,
        "include_packaged_models": False,
        "use_gpus": False,
        "ray_nodes_refresh_s": 0.5,
    }
    values.update(overrides)
    return make_settings(db_dsn, tmp_path / "data", **values)


async def measure_all(api: Api) -> None:
    for name in MODELS:
        await mark_measured(api, name, 50_000_000)
    # Each fills most of a 2 GiB node (1.83 GB usable): two never share one.
    await mark_measured(api, "fake/a", int(1.2 * GB))
    await mark_measured(api, "fake/b", int(1.2 * GB))
    await mark_measured(api, "fake/big", int(2.5 * GB))
    # More than any node, less than the nodes together.
    await mark_measured(api, "fake/huge", int(3.0 * GB))


@pytest.fixture
async def rapi(db_dsn: str, tmp_path: Path, ray_nodes: RayCluster) -> AsyncIterator[Api]:
    settings = ray_settings(db_dsn, tmp_path, ray_nodes)
    async with serve(settings) as base, aiohttp.ClientSession() as session:
        api = Api(base, session, settings)
        await measure_all(api)
        yield api


def actor_alive(name: str) -> bool:
    import ray

    try:
        ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return False
    return True


async def wait_actor_gone(name: str, timeout_s: float = 15) -> None:
    for _ in range(int(timeout_s / 0.1)):
        if not actor_alive(name):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"actor {name} is still alive")


async def handle_of(api: Api, model: str) -> str:
    row = await app_state(api).pool.fetchrow(
        "SELECT handle FROM instances WHERE model = $1 ORDER BY id DESC LIMIT 1", model
    )
    return str(row["handle"])


async def test_bytez_walkthrough_on_ray(rapi: Api, ray_nodes: RayCluster) -> None:
    started = await load(rapi, "fake/ok", concurrency=2, expirationPeriodSeconds=300)
    assert started["status"] == "started"
    body = await wait_status(rapi, "fake/ok", "RUNNING", timeout_s=60)
    assert body["runtime"] == "ray"
    assert body["node"] in (ray_nodes.head_id, ray_nodes.second_id)
    assert body["device"] == f"cpu@{body['node']}"

    status, out = await rapi.call("POST", "/model/run", {"model": "fake/ok", "prompt": "hi"})
    assert status == 200 and out["output"] == "echo: hi", out
    async with rapi.session.post(
        rapi.base + "/model/run",
        json={"model": "fake/ok", "prompt": "streamed", "stream": True},
        headers=rapi.headers(),
    ) as resp:
        assert resp.status == 200
        streamed = await resp.text()
    assert streamed.startswith("tok0")

    status, text = await rapi.call("GET", "/model/logs?model=fake/ok&tail=50")
    assert status == 200 and "fake agent" in str(text).lower(), text

    name = await handle_of(rapi, "fake/ok")
    assert name.startswith("mlcp-") and actor_alive(name)
    status, deleted = await rapi.call("POST", "/model/delete", {"model": "fake/ok"})
    assert status == 200 and deleted["status"] == "STOPPED"
    assert not actor_alive(name)
    status, out = await rapi.call("POST", "/model/run", {"model": "fake/ok", "prompt": "x"})
    assert status == 404 and out["code"] == "not_loaded"


async def test_placement_across_nodes_by_memory(rapi: Api, ray_nodes: RayCluster) -> None:
    await load(rapi, "fake/a")
    await load(rapi, "fake/b")
    a = await wait_status(rapi, "fake/a", "RUNNING", timeout_s=60)
    b = await wait_status(rapi, "fake/b", "RUNNING", timeout_s=60)
    assert {a["node"], b["node"]} == {ray_nodes.head_id, ray_nodes.second_id}

    status, capacity = await rapi.call("GET", "/capacity")
    assert status == 200
    by_node = {d["node"]: d for d in capacity["devices"]}
    assert set(by_node) == {ray_nodes.head_id, ray_nodes.second_id}
    for node, model in ((a["node"], "fake/a"), (b["node"], "fake/b")):
        device = by_node[node]
        assert device["device"] == f"cpu@{node}" and device["totalBytes"] == 2 * GiB
        assert device["reservedBytes"] == int(1.2 * GB)
        assert [i["model"] for i in device["instances"]] == [model]

    # 3 GB: the two nodes hold 3.6 GB together, but no single node does.
    status, out = await rapi.call("POST", "/model/load", {"model": "fake/huge"})
    assert status == 422 and out["code"] == "insufficient_memory", out
    status, plan = await rapi.call("POST", "/model/load", {"model": "fake/huge", "dryRun": True})
    assert status == 200 and plan["decision"] == "never_fits"


async def test_ray_kill_of_an_actor_fails_its_instance(rapi: Api) -> None:
    import ray

    await load(rapi, "fake/ok")
    await wait_status(rapi, "fake/ok", "RUNNING", timeout_s=60)
    name = await handle_of(rapi, "fake/ok")
    ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
    failed = await wait_status(rapi, "fake/ok", "FAILED", timeout_s=20)
    assert failed["reason"] == KILLED
    for _ in range(30):  # a route refresh that read the row just before it failed: 1 s more
        status, out = await rapi.call("POST", "/model/run", {"model": "fake/ok", "prompt": "x"})
        if status == 404:
            break
        assert status == 502 and out["code"] == "instance_failed", out
        await asyncio.sleep(0.1)
    assert status == 404 and out["code"] == "not_loaded" and KILLED in out["error"]
    status, capacity = await rapi.call("GET", "/capacity")
    assert all(d["reservedBytes"] == 0 for d in capacity["devices"]), capacity


async def test_a_lost_node_fails_its_instances_mid_request(
    rapi: Api, ray_nodes: RayCluster
) -> None:
    # Only the new node holds 2.5 GB.
    third = ray_nodes.add_node(4 * GiB)
    state = app_state(rapi)
    for _ in range(50):
        devices = await state.supervisor.runtime.refresh_nodes()  # type: ignore[attr-defined]
        if any(n.node_id == third.node_id for n in devices):
            break
        await asyncio.sleep(0.1)
    await load(rapi, "fake/big")
    running = await wait_status(rapi, "fake/big", "RUNNING", timeout_s=60)
    assert running["node"] == third.node_id

    async def streamed() -> tuple[int, str]:
        async with rapi.session.post(
            rapi.base + "/model/run",
            json={"model": "fake/big", "prompt": "p", "stream": True},
            headers=rapi.headers(),
        ) as resp:
            first = await resp.content.readany()
            lost.set()
            rest = await resp.text()
            return resp.status, first.decode() + rest

    lost = asyncio.Event()
    request = asyncio.create_task(streamed())
    await asyncio.wait_for(lost.wait(), 30)
    ray_nodes.remove_node(third)
    failed = await wait_status(rapi, "fake/big", "FAILED", timeout_s=30)
    assert failed["reason"] == "node lost" and failed["node"] == third.node_id
    status, text = await asyncio.wait_for(request, 30)
    assert status == 200 and text.startswith("tok0") and "tok19" not in text
    for _ in range(50):  # the node table is read every 0.5 s
        status, capacity = await rapi.call("GET", "/capacity")
        if third.node_id not in {d["node"] for d in capacity["devices"]}:
            break
        await asyncio.sleep(0.1)
    assert third.node_id not in {d["node"] for d in capacity["devices"]}
    assert all(d["reservedBytes"] == 0 for d in capacity["devices"]), capacity
    status, out = await rapi.call("POST", "/model/run", {"model": "fake/big", "prompt": "x"})
    assert status == 404 and "node lost" in out["error"]


async def test_a_load_failure_says_why(rapi: Api) -> None:
    await load(rapi, "fake/load-fail")
    failed = await wait_status(rapi, "fake/load-fail", "FAILED", timeout_s=60)
    assert failed["reason"] == "load failed: the fake model refuses to load"


async def test_actors_survive_a_restart_and_are_adopted(
    db_dsn: str, tmp_path: Path, ray_nodes: RayCluster
) -> None:
    settings = ray_settings(db_dsn, tmp_path, ray_nodes, stop_instances_on_exit=False)
    async with serve(settings) as base, aiohttp.ClientSession() as session:
        api = Api(base, session, settings)
        await measure_all(api)
        await load(api, "fake/ok", expirationPeriodSeconds=600)
        before = await wait_status(api, "fake/ok", "RUNNING", timeout_s=60)
        name = await handle_of(api, "fake/ok")
    assert actor_alive(name), "a control-plane restart must not stop instances"

    settings = ray_settings(db_dsn, tmp_path, ray_nodes)
    async with serve(settings) as base, aiohttp.ClientSession() as session:
        api = Api(base, session, settings)
        after = await wait_status(api, "fake/ok", "RUNNING")
        assert after["created"] == before["created"] and after["node"] == before["node"]
        assert after["expiresAt"] == before["expiresAt"]
        status, out = await api.call("POST", "/model/run", {"model": "fake/ok", "prompt": "again"})
        assert status == 200 and out["output"] == "echo: again"
        assert await handle_of(api, "fake/ok") == name
        listed = await app_state(api).supervisor.runtime.list()
        assert [(i.handle, i.endpoint is not None) for i in listed] == [(name, True)]
        status, _ = await api.call("POST", "/model/delete", {"model": "fake/ok"})
        assert status == 200
    assert not actor_alive(name)


async def test_an_actor_without_a_live_row_is_killed(rapi: Api, ray_nodes: RayCluster) -> None:
    state = app_state(rapi)
    runtime = state.supervisor.runtime
    assert isinstance(runtime, RayRuntime)
    folder = Path(rapi.settings.model_dirs) / "fake/ok"
    spec = InstanceSpec(
        instance_id=9999,
        generation=1,
        model="fake/ok",
        model_dir=folder,
        gguf_file=None,
        concurrency=1,
        max_queue=1,
        device=f"cpu@{ray_nodes.second_id}",
        reserve_bytes=10_000_000,
    )
    launched = await runtime.start(spec)
    assert launched.handle == actor_name(runtime.cluster, 9999, 1)
    assert launched.endpoint.startswith("http://127.0.0.1:")
    decided = await reconcile(state.supervisor, datetime.now(UTC))
    assert [r.handle for r in decided.remove] == [launched.handle]
    assert not actor_alive(launched.handle)


async def test_two_control_planes_share_one_cluster(
    db_dsn: str, tmp_path: Path, ray_nodes: RayCluster
) -> None:
    first = ray_settings(db_dsn, tmp_path / "one", ray_nodes)
    second = ray_settings(db_dsn, tmp_path / "two", ray_nodes)
    async with (
        serve(first) as base_a,
        serve(second) as base_b,
        aiohttp.ClientSession() as session,
    ):
        a, b = Api(base_a, session, first), Api(base_b, session, second)
        await measure_all(a)
        loads = await asyncio.gather(
            a.call("POST", "/model/load", {"model": "fake/ok"}),
            b.call("POST", "/model/load", {"model": "fake/ok"}),
        )
        assert all(status == 200 for status, _ in loads), loads
        running = await wait_status(b, "fake/ok", "RUNNING", timeout_s=60)
        status, out = await b.call("POST", "/model/run", {"model": "fake/ok", "prompt": "b"})
        assert status == 200 and out["output"] == "echo: b"
        status, out = await a.call("POST", "/model/run", {"model": "fake/ok", "prompt": "a"})
        assert status == 200 and out["output"] == "echo: a"
        status, from_a = await a.call("POST", "/model/status", {"model": "fake/ok"})
        assert from_a["node"] == running["node"]
        listed = await app_state(a).supervisor.runtime.list()
        assert len(listed) == 1
        status, _ = await a.call("POST", "/model/delete", {"model": "fake/ok"})
        assert status == 200


@pytest.mark.parametrize(
    ("method", "path", "body", "want"),
    [
        ("POST", "/model/load", {"model": "fake/huge"}, (422, "insufficient_memory")),
        ("POST", "/model/load", {"model": "fake/ok", "device": "cuda"}, (422, "no_gpu")),
        ("POST", "/model/load", {"model": "nobody/nothing"}, (404, "model_not_found")),
        ("POST", "/model/load", {"model": "fake/ok", "concurrency": 0}, (422, None)),
        ("POST", "/model/run", {"model": "fake/ok", "prompt": "x"}, (404, "not_loaded")),
        ("POST", "/model/status", {"model": "nobody/nothing"}, (404, None)),
        ("GET", "/model/logs?model=fake/ok&tail=0", None, (422, "invalid_field")),
        ("GET", "/model/logs?model=fake/ok", None, (404, "not_loaded")),
    ],
)
async def test_bad_input_on_ray_is_never_a_500(
    rapi: Api, method: str, path: str, body: Any, want: tuple[int, str | None]
) -> None:
    status, out = await rapi.call(method, path, body)
    assert status == want[0], out
    if want[1] is not None:
        assert out["code"] == want[1], out


def serve_cli(env: dict[str, str], timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "control_plane"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


@pytest.mark.parametrize(
    ("address", "said"),
    [("127.0.0.1:{port}", "is unreachable"), ("no-port-here", "is not host:port")],
)
def test_a_bad_ray_address_stops_the_start_with_its_reason(
    db_dsn: str, tmp_path: Path, address: str, said: str
) -> None:
    done = serve_cli(
        {
            "MLCP_RUNTIME": "ray",
            "MLCP_RAY_ADDRESS": address.format(port=free_port()),
            "MLCP_DATABASE_URL": db_dsn,
            "MLCP_DATA_DIR": str(tmp_path / "data"),
            "MLCP_PORT": str(free_port()),
            "MLCP_GRPC_PORT": "0",
            "MLCP_INCLUDE_PACKAGED_MODELS": "false",
            "MLCP_ADMIN_KEY": "mlcp_test-admin-key-0123456789abcdefghijklmnop",
        }
    )
    assert done.returncode != 0
    assert said in done.stdout + done.stderr, done.stderr[-2000:]


async def test_a_node_without_the_model_folder_fails_the_load_with_the_reason(
    rapi: Api, ray_nodes: RayCluster, tmp_path: Path
) -> None:
    runtime = app_state(rapi).supervisor.runtime
    assert isinstance(runtime, RayRuntime)
    spec = InstanceSpec(
        instance_id=9998,
        generation=1,
        model="fake/ok",
        model_dir=tmp_path / "not-shared" / "fake" / "ok",
        gguf_file=None,
        concurrency=1,
        max_queue=1,
        device=f"cpu@{ray_nodes.head_id}",
    )
    launched = await runtime.start(spec)
    exited = await runtime.exited(launched.handle)
    assert exited is not None and exited.reason.startswith("load failed: the model folder")
    assert "MLCP_MODEL_STORE on shared storage" in exited.reason
    await runtime.stop(launched.handle, 1.0)
    assert not actor_alive(launched.handle)


async def test_a_sigkilled_control_plane_s_actor_is_adopted_by_the_next(
    db_dsn: str, tmp_path: Path, ray_nodes: RayCluster
) -> None:
    import asyncpg

    from tests.e2e.server import http, start, stop

    write_fake_model(tmp_path / "models", "fake/ok", mode="ok")
    env = {
        "MLCP_RUNTIME": "ray",
        "MLCP_RAY_ADDRESS": ray_nodes.address,
        "MLCP_DATABASE_URL": db_dsn,
        "MLCP_ADMIN_KEY": ADMIN_KEY,
        "MLCP_GRPC_PORT": "0",
        "MLCP_INCLUDE_PACKAGED_MODELS": "false",
        "MLCP_USE_GPUS": "false",
        "MLCP_MODEL_DIRS": str(tmp_path / "models"),
        "MLCP_AGENT_COMMAND": json.dumps(FAKE_AGENT),
        "MLCP_START_TIMEOUT_S": "30",
    }
    first = start(tmp_path / "first", tmp_path, "first", **env)
    db = await asyncpg.connect(db_dsn)
    try:
        await db.execute(
            "UPDATE models SET required_ram_bytes = 50000000, benchmarked_at = now() "
            "WHERE name = 'fake/ok'"
        )
        body = {"model": "fake/ok", "expirationPeriodSeconds": 600}
        status, answer = await asyncio.to_thread(
            http, "POST", first.base + "/model/load", ADMIN_KEY, body
        )
        assert status == 200, answer
        for _ in range(600):
            before = await db.fetchrow("SELECT * FROM instances WHERE model = 'fake/ok'")
            if before["state"] == "RUNNING":
                break
            await asyncio.sleep(0.1)
        assert before["state"] == "RUNNING", dict(before)
        first.proc.kill()  # SIGKILL: its Ray driver dies with it
        first.proc.wait(10)
        assert actor_alive(before["handle"]), "the actor died with its control plane"

        second = start(tmp_path / "second", tmp_path, "second", **env)
        try:
            status, out = await asyncio.to_thread(
                http,
                "POST",
                second.base + "/model/run",
                ADMIN_KEY,
                {"model": "fake/ok", "prompt": "x"},
            )
            assert status == 200 and out["output"] == "echo: x", out
            after = await db.fetchrow("SELECT * FROM instances WHERE model = 'fake/ok'")
            assert after["state"] == "RUNNING" and after["handle"] == before["handle"]
            assert after["expires_at"] == before["expires_at"], "adoption moved the expiry"
            assert await db.fetchval("SELECT count(*) FROM instances") == 1
        finally:
            stop(second)
    finally:
        await db.close()


# -- /model/job as a Ray task --------------------------------------------------------------


@pytest.fixture
async def jobs_api(
    db_dsn: str, tmp_path: Path, ray_nodes: RayCluster, caplog: pytest.LogCaptureFixture
) -> AsyncIterator[Api]:
    """A control plane whose jobs measure the real agent (no fake command) as Ray tasks."""
    from tests.tiny_model import build_tiny_model

    models = tmp_path / "models"
    build_tiny_model(models / "test" / "tiny")
    broken = build_tiny_model(models / "test" / "broken")
    weights = broken / "model.safetensors"
    weights.write_bytes(b"\x00" * weights.stat().st_size)  # no header: the load fails
    caplog.set_level(logging.INFO, logger="benchmarker.ray_measure")
    settings = ray_settings(db_dsn, tmp_path, ray_nodes, agent_command=None)
    async with serve(settings) as base, aiohttp.ClientSession() as session:
        yield Api(base, session, settings)


async def job_until(api: Api, model: str, done: Any, timeout_s: float = 240) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        status, body = await api.call("POST", "/model/job", {"model": model})
        assert status == 200, body
        if done(body):
            return body  # type: ignore[no-any-return]
        assert asyncio.get_running_loop().time() < deadline, body
        await asyncio.sleep(0.5)


async def test_a_job_measures_as_a_ray_task_on_a_node(
    jobs_api: Api, ray_nodes: RayCluster, caplog: pytest.LogCaptureFixture
) -> None:
    from control_plane.jobs import MESSAGE_AVAILABLE, MESSAGE_QUEUED

    done = await job_until(jobs_api, "test/tiny", lambda b: b["message"] != MESSAGE_QUEUED)
    assert done["success"] is True and done["message"] == MESSAGE_AVAILABLE, done
    pool = app_state(jobs_api).pool
    profile = await pool.fetchrow("SELECT * FROM model_profiles WHERE model = 'test/tiny'")
    assert profile["device_kind"] == "cpu" and profile["load_s"] > 0
    assert [p["concurrency"] for p in profile["phases"]] == [1, 2, 4]
    assert profile["required_ram_bytes"] > 0
    status, listed = await jobs_api.call("GET", "/model/list")
    assert status == 200
    [item] = [m for m in listed if m["name"] == "test/tiny"]
    assert item["benchmarked"] is True and item["requiredRAM"] > 0.05

    # The measurement ran on a node of the cluster, in a Ray worker (not this process).
    measured = [
        r for r in caplog.records if r.name == "benchmarker.ray_measure" and "measured" in r.msg
    ]
    assert len(measured) == 1, [r.getMessage() for r in caplog.records]
    _model, node, pid = measured[0].args  # type: ignore[misc]
    assert node in (ray_nodes.head_id, ray_nodes.second_id)
    assert int(pid) != os.getpid()


async def test_a_job_whose_model_fails_to_load_on_its_node_fails_with_the_reason(
    jobs_api: Api,
) -> None:
    pool = app_state(jobs_api).pool
    status, body = await jobs_api.call("POST", "/model/job", {"model": "test/broken"})
    assert status == 200 and body["success"] is True, body
    # The first attempt fails on its node and is retried (a load error); the wait before the
    # retry is cut short so the last attempt's outcome is the job's.
    for _ in range(480):
        row = await pool.fetchrow("SELECT * FROM model_jobs WHERE model = 'test/broken'")
        if row["reason"] is not None:
            break
        await asyncio.sleep(0.5)
    assert row["state"] == "queued" and row["error_code"] == "load_error", dict(row)
    await pool.execute(
        "UPDATE model_jobs SET max_attempts = 2, run_after = now() WHERE id = $1", row["id"]
    )
    failed = await job_until(jobs_api, "test/broken", lambda b: b["success"] is False)
    assert failed["message"].startswith("Load error"), failed
    assert "safetensors" in failed["message"].lower() or "header" in failed["message"], failed
    row = await pool.fetchrow("SELECT * FROM model_jobs WHERE id = $1", row["id"])
    assert row["state"] == "failed" and row["attempts"] == 2 and row["reason"] == failed["message"]
