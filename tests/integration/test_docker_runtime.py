"""The docker runtime against a real engine: containers, labels, limits and exit reasons, then
instances through the control plane (the real agent with a tiny model, and the fake agent).

Containers use host networking, so all traffic stays on loopback. Without an engine these tests
skip, unless MLCP_REQUIRE_DOCKER=1 (set by .ci/run) turns that into a failure. The agent image is
built offline (`python -m instance_agent.image build`) and reused while nothing changed.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import docker
import docker.errors
import pytest
from docker import DockerClient

from control_plane.errors import RuntimeFailed
from control_plane.reconciler import reconcile
from control_plane.runtimes.base import InstanceSpec, Launched
from control_plane.runtimes.docker import CLUSTER, OOM_REASON, SPARE, DockerRuntime
from control_plane.state import AppState
from db import queries

# The session fixtures `engine` and `agent_image` are imported to be registered here.
from tests.docker_engine import FAKE_IN_CONTAINER, fake_model
from tests.harness import SERVED_APPS, Api, make_settings, serve
from tests.integration.test_instances import load, mark_measured, wait_status

pytestmark = pytest.mark.docker

TINY = "test/tiny"


def fake_runtime(image: str, cluster: str | None = None, **kwargs: Any) -> DockerRuntime:
    return DockerRuntime(
        cluster=cluster or uuid.uuid4().hex[:12],
        image=image,
        network="host",
        command=kwargs.pop("command", FAKE_IN_CONTAINER),
        **kwargs,
    )


def spec(folder: Path, instance_id: int = 1, generation: int = 1, **kw: Any) -> InstanceSpec:
    return InstanceSpec(instance_id, generation, "fake/ok", folder, None, 1, 4, **kw)


async def wait_healthy(runtime: DockerRuntime, launched: Launched, timeout_s: float = 30) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(int(timeout_s / 0.1)):
            exited = await runtime.exited(launched.handle)
            assert exited is None, exited
            try:
                async with session.get(launched.endpoint + "/health") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError("the agent never became healthy")


async def wait_exited(runtime: DockerRuntime, handle: str, timeout_s: float = 30) -> str:
    for _ in range(int(timeout_s / 0.1)):
        exited = await runtime.exited(handle)
        if exited is not None:
            return exited.reason
        await asyncio.sleep(0.1)
    raise AssertionError("the container never exited")


def assert_gone(engine: DockerClient, handle: str) -> None:
    with pytest.raises(docker.errors.NotFound):
        engine.containers.get(handle)


async def test_container_lifecycle(engine: DockerClient, agent_image: str, tmp_path: Path) -> None:
    folder = fake_model(tmp_path / "models", "fake/ok")
    runtime = fake_runtime(agent_image)
    launched = await runtime.start(spec(folder, 7, 2, mem_limit_bytes=256 * 2**20))
    await wait_healthy(runtime, launched)  # so it read its 0600 fake.json

    attrs = engine.containers.get(launched.handle).attrs
    assert {
        "mlcp.managed": "true",
        "mlcp.cluster": runtime.cluster,
        "mlcp.instance": "7",
        "mlcp.generation": "2",
        "mlcp.model": "fake/ok",
    }.items() <= attrs["Config"]["Labels"].items()
    assert attrs["HostConfig"]["Memory"] == 256 * 2**20
    assert attrs["HostConfig"]["NetworkMode"] == "host"
    [mount] = attrs["Mounts"]
    assert mount["Destination"] == "/model" and mount["RW"] is False

    # Another runtime of the same deployment (a restarted control plane) finds it by its labels;
    # another deployment's does not.
    again = fake_runtime(agent_image, runtime.cluster)
    [listed] = await again.list()
    assert (listed.instance_id, listed.generation) == (7, 2)
    assert (listed.handle, listed.endpoint) == (launched.handle, launched.endpoint)
    assert await fake_runtime(agent_image).list() == []

    await again.stop(launched.handle, grace_s=5)
    assert_gone(engine, launched.handle)
    assert await runtime.exited(launched.handle) is not None
    assert await runtime.list() == []
    await runtime.stop(launched.handle, grace_s=5)  # stopping what is gone is fine


async def test_exit_reasons(engine: DockerClient, agent_image: str, tmp_path: Path) -> None:
    models = tmp_path / "models"
    runtime = fake_runtime(agent_image)
    killed = await runtime.start(spec(fake_model(models, "fake/ok")))
    failing = await runtime.start(spec(fake_model(models, "fake/load-fail", "load_fail"), 2))
    hungry = fake_runtime(
        agent_image, runtime.cluster, command=["python", "-c", "bytearray(512 * 2**20)"]
    )
    oom = await hungry.start(spec(models / "fake/ok", 3, mem_limit_bytes=64 * 2**20))
    try:
        await wait_healthy(runtime, killed)
        engine.containers.get(killed.handle).kill()  # behind the runtime's back
        assert await wait_exited(runtime, killed.handle) == "instance process was killed by SIGKILL"

        reason = await wait_exited(runtime, failing.handle)
        assert reason == "load failed: the fake model refuses to load"
        assert "mlcp-agent: load failed:" in await runtime.logs(failing.handle, 10)

        assert await wait_exited(runtime, oom.handle) == OOM_REASON
        # Ended containers stay listed until stopped, so nothing of theirs is left behind.
        assert {item.instance_id for item in await runtime.list()} == {1, 2, 3}
    finally:
        for launched in (killed, failing, oom):
            await runtime.stop(launched.handle, grace_s=1)
    assert await runtime.list() == []


async def test_missing_image_is_a_clear_error(engine: DockerClient, tmp_path: Path) -> None:
    runtime = fake_runtime("mlcp-agent:no-such-tag")
    with pytest.raises(RuntimeFailed, match="build it with `make image`"):
        await runtime.start(spec(fake_model(tmp_path, "fake/ok")))
    assert await runtime.list() == []


# -- through the control plane -------------------------------------------------------------


def app_state(api: Api) -> AppState:
    return SERVED_APPS[api.base].state.mlcp  # type: ignore[no-any-return]


async def container_of(api: Api, model: str) -> str:
    handle = await app_state(api).pool.fetchval(
        "SELECT handle FROM instances WHERE model = $1 ORDER BY id DESC LIMIT 1", model
    )
    return str(handle)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_model import build_tiny_model

    root = tmp_path_factory.mktemp("docker-models")
    for path in build_tiny_model(root / TINY).iterdir():
        path.chmod(0o600)  # as converted models are written
    return root


async def test_real_agent_in_containers(
    engine: DockerClient, agent_image: str, tiny_models: Path, db_dsn: str, tmp_path: Path
) -> None:
    settings = make_settings(
        db_dsn,
        tmp_path / "data",
        runtime="docker",
        docker_image=agent_image,
        docker_network="host",
        model_dirs=str(tiny_models),
        include_packaged_models=False,
        start_timeout_s=60,
    )
    async with serve(settings) as base, aiohttp.ClientSession() as session:
        api = Api(base, session, settings)
        await mark_measured(api, TINY, 200_000_000)  # admission wants a benchmark figure
        await load(api, TINY)
        await wait_status(api, TINY, "RUNNING", timeout_s=60)
        handle = await container_of(api, TINY)

        body = {"model": TINY, "prompt": "The quick brown", "params": {"max_new_tokens": 4}}
        status, out = await api.call("POST", "/model/run", body)
        assert status == 200 and out["error"] is None, out
        assert out["tokens_generated"] >= 1
        async with session.post(
            base + "/model/run", json={**body, "stream": True}, headers=api.headers()
        ) as resp:
            assert resp.status == 200 and resp.content_type == "text/plain"
            assert (await resp.read()).decode()

        status, deleted = await api.call("POST", "/model/delete", {"model": TINY})
        assert status == 200 and deleted["status"] == "STOPPED"
        assert_gone(engine, handle)


@pytest.fixture
def fake_settings(db_dsn: str, tmp_path: Path, agent_image: str) -> Any:
    models = tmp_path / "models"
    fake_model(models, "fake/ok")
    return make_settings(
        db_dsn,
        tmp_path / "data",
        runtime="docker",
        docker_image=agent_image,
        docker_network="host",
        agent_command=FAKE_IN_CONTAINER,
        model_dirs=str(models),
        include_packaged_models=False,
        start_timeout_s=30,
        stop_instances_on_exit=False,
    )


async def test_restart_adoption_orphans_and_kills(engine: DockerClient, fake_settings: Any) -> None:
    async with serve(fake_settings) as base, aiohttp.ClientSession() as session:
        api = Api(base, session, fake_settings)
        await mark_measured(api, "fake/ok", 50_000_000)  # admission wants a benchmark figure
        await load(api, "fake/ok", expirationPeriodSeconds=600)
        before = await wait_status(api, "fake/ok", "RUNNING")
        handle = await container_of(api, "fake/ok")
    # The control plane is gone; its container is not.
    assert engine.containers.get(handle).status == "running"

    async with serve(fake_settings) as base, aiohttp.ClientSession() as session:
        api = Api(base, session, fake_settings)
        after = await wait_status(api, "fake/ok", "RUNNING")
        assert after["created"] == before["created"] and after["expiresAt"] == before["expiresAt"]
        status, out = await api.call("POST", "/model/run", {"model": "fake/ok", "prompt": "hi"})
        assert status == 200 and out["output"] == "echo: hi"

        # A labelled container of this deployment with no row is an orphan: removed.
        state = app_state(api)
        cluster = await queries.cluster_id(state.pool)
        orphan_runtime = fake_runtime(fake_settings.docker_image, cluster)
        folder = fake_settings.model_dir_paths[0] / "fake" / "ok"
        orphan = await orphan_runtime.start(spec(folder, instance_id=424242))
        await reconcile(state.supervisor, datetime.now(UTC))
        assert_gone(engine, orphan.handle)
        assert engine.containers.get(handle).status == "running"

        engine.containers.get(handle).kill()  # behind the control plane's back
        failed = await wait_status(api, "fake/ok", "FAILED", timeout_s=20)
        assert failed["reason"] == "instance process was killed by SIGKILL"
        for _ in range(50):  # failing it also removes what is left of the container
            if not engine.containers.list(all=True, filters={"id": handle}):
                break
            await asyncio.sleep(0.1)
        assert_gone(engine, handle)


async def _spare_ready(runtime: DockerRuntime, timeout_s: float = 120) -> None:
    for _ in range(int(timeout_s / 0.1)):
        if runtime.spares_ready() >= 1:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("no spare container became ready")


def _spares(engine: DockerClient, cluster: str) -> list[Any]:
    return engine.containers.list(
        all=True, filters={"label": [f"{SPARE}=true", f"{CLUSTER}={cluster}"]}
    )


async def test_an_instance_starts_in_a_warm_spare_container(
    engine: DockerClient, agent_image: str, tiny_models: Path, db_dsn: str, tmp_path: Path
) -> None:
    """A spare (torch imported) becomes the instance: renamed, limited, found again by name."""
    settings = make_settings(
        db_dsn,
        tmp_path / "data",
        runtime="docker",
        docker_image=agent_image,
        docker_network="host",
        docker_spares=1,
        model_dirs=str(tiny_models),
        include_packaged_models=False,
        start_timeout_s=60,
    )
    async with serve(settings) as base, aiohttp.ClientSession() as session:
        api = Api(base, session, settings)
        state = app_state(api)
        runtime = state.supervisor.runtime
        assert isinstance(runtime, DockerRuntime)
        await _spare_ready(runtime)
        (spare,) = _spares(engine, runtime.cluster)
        await mark_measured(api, TINY, 200_000_000)
        await load(api, TINY)
        await wait_status(api, TINY, "RUNNING", timeout_s=60)
        handle = await container_of(api, TINY)
        assert handle == spare.id and runtime.claimed == 1
        container = engine.containers.get(handle)
        instance_id = int(
            await state.pool.fetchval("SELECT id FROM instances WHERE model = $1", TINY)
        )
        assert container.name.startswith(f"mlcp-{runtime.cluster}-{instance_id}-")
        assert container.attrs["HostConfig"]["Memory"] > 0  # the instance's limit, set at claim
        # A restarted control plane finds it by its name (a spare's labels name no instance).
        assert any(found.handle == handle for found in await runtime.list())
        body = {"model": TINY, "prompt": "The quick brown", "params": {"max_new_tokens": 4}}
        status, out = await api.call("POST", "/model/run", body)
        assert status == 200 and out["tokens_generated"] >= 1, out
        # Another spare takes its place.
        await _spare_ready(runtime)
        assert {c.id for c in _spares(engine, runtime.cluster)} - {handle}
        status, deleted = await api.call("POST", "/model/delete", {"model": TINY})
        assert status == 200 and deleted["status"] == "STOPPED"
        assert_gone(engine, handle)
        cluster = runtime.cluster
    # The control plane's spares go with it.
    assert _spares(engine, cluster) == []


async def test_a_spare_whose_control_plane_lets_go_exits(
    engine: DockerClient, agent_image: str, tiny_models: Path
) -> None:
    runtime = DockerRuntime(
        cluster=uuid.uuid4().hex[:12],
        image=agent_image,
        network="host",
        spares=1,
        spare_roots=[tiny_models],
    )
    runtime.warm_up()
    try:
        for _ in range(600):
            if runtime._pool:
                break
            await asyncio.sleep(0.1)
        (spare,) = runtime._pool
        # Not its token: refused, and the spare stays.
        async with aiohttp.ClientSession() as session:
            async with session.post(
                spare.endpoint + "/claim",
                json={"argv": ["serve"]},
                headers={"x-mlcp-spare-token": "wrong"},
            ) as resp:
                assert resp.status == 403
        assert engine.containers.get(spare.container_id).status == "running"
        # The hold connection closes (its control plane died): the spare exits by itself (and
        # this runtime, seeing it go, removes it and makes another).
        spare.writer.transport.abort()

        def status() -> str:
            try:
                return str(engine.containers.get(spare.container_id).status)
            except docker.errors.NotFound:
                return "removed"

        for _ in range(100):
            if status() in ("exited", "removed"):
                break
            await asyncio.sleep(0.1)
        assert status() in ("exited", "removed")
    finally:
        await runtime.close()
    assert _spares(engine, runtime.cluster) == []


async def test_a_spare_of_an_image_since_rebuilt_is_not_claimed(
    engine: DockerClient, agent_image: str, tiny_models: Path, tmp_path: Path
) -> None:
    """A spare made before the agent image was rebuilt is dropped; the instance starts fresh."""
    runtime = DockerRuntime(
        cluster=uuid.uuid4().hex[:12],
        image=agent_image,
        network="host",
        spares=1,
        spare_roots=[tiny_models],
    )
    runtime.warm_up()
    rebuilt = f"mlcp-test-rebuilt:{uuid.uuid4().hex[:8]}"
    launched = None
    try:
        for _ in range(600):
            if runtime._pool:
                break
            await asyncio.sleep(0.1)
        (spare,) = runtime._pool
        # The same agent under a new image id, as `make image` after a change would leave it.
        engine.containers.get(spare.container_id).commit(
            repository=rebuilt.split(":")[0], tag=rebuilt.split(":")[1]
        )
        runtime.image = rebuilt
        model = InstanceSpec(1, 1, TINY, tiny_models / TINY, None, 1, 4)
        launched = await runtime.start(model)
        assert runtime.claimed == 0 and launched.handle != spare.container_id
        assert (
            engine.containers.get(launched.handle).attrs["Image"] == engine.images.get(rebuilt).id
        )
        await wait_healthy(runtime, launched, timeout_s=120)
        with pytest.raises(docker.errors.NotFound):
            engine.containers.get(spare.container_id)
    finally:
        if launched is not None:
            await runtime.stop(launched.handle, 5)
        await runtime.close()
        engine.images.remove(rebuilt, force=True)
