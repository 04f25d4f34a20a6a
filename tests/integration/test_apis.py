"""Deployed handler APIs end to end: PUT /apis/{name}, building → benchmarking → available, both
seed URL shapes, /model/run with `input`, redeploy rollover, ownership, environments, delete.

One control plane for the module (real PostgreSQL, uvicorn, benchmark worker, agent processes);
each test deploys its own APIs under its own keys.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import subprocess
import textwrap
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import grpc.aio
import pytest

from control_plane import api_bundle as bundle
from control_plane.deploys import collect_blobs
from control_plane.settings import Settings
from tests.api_deploy import deploy, wait_api
from tests.grpc_stubs import generate
from tests.handler_projects import grpc_echo_renamed, write_spec
from tests.harness import (
    Api,
    app_state,
    own_control_plane,
    pid_alive,
    serve,
)

pytestmark = pytest.mark.timeout(300)

HANDLER = """\
import os
import sys
import time

from instance_agent.handler import handler

VERSION = {version}


@handler
def inference_handler(inputs, _):
    if isinstance(inputs, dict) and "raise" in inputs:
        raise ValueError(inputs["raise"])
    if isinstance(inputs, dict) and "bad_output" in inputs:
        return {{1, 2}}
    if isinstance(inputs, dict) and "exit" in inputs:
        sys.exit(inputs["exit"])
    return {{"echo": inputs, "version": VERSION, "pid": os.getpid(), "python": sys.executable}}
"""


# A local package a project's requirements.txt installs (`./vendored`), built offline.
VENDORED = {
    "vendored/pyproject.toml": textwrap.dedent(
        """\
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "mlcp-test-vendored"
        version = "1.0"
        """
    ),
    "vendored/mlcp_test_vendored/__init__.py": 'GREETING = "hi from vendored"\n',
}


def project(
    root: Path,
    name: str,
    *,
    version: int = 1,
    public: bool = False,
    requirements: str | None = None,
    main: str | None = None,
    files: dict[str, str] | None = None,
) -> Path:
    folder = root / f"{name}-{uuid.uuid4().hex[:6]}"
    (folder / "src").mkdir(parents=True)
    (folder / "model").mkdir()
    (folder / "model" / "weights.txt").write_text(f"weights of {name}\n")
    (folder / "src" / "main.py").write_text(main or HANDLER.format(version=version))
    if requirements is not None:
        (folder / "requirements.txt").write_text(requirements)
    for rel, text in (files or {}).items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text)
    write_spec(
        folder,
        f"""\
        name: {name}
        handler: {{type: python, path: src/main.py}}
        concurrency: 2
        public: {str(public).lower()}
        example: {{}}
        """,
    )
    return folder


@pytest.fixture(scope="module")
async def served(
    pg_dsn: str, template_db: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Api]:
    data = tmp_path_factory.mktemp("apis-data")
    async with own_control_plane(pg_dsn, template_db, data, include_packaged_models=False) as api:
        yield api


async def user_key(api: Api, name: str) -> str:
    status, body = await api.call("POST", "/admin/keys", {"name": name, "scope": "user"})
    assert status == 201, body
    return str(body["key"])


def owner() -> str:
    return f"u{uuid.uuid4().hex[:8]}"


@pytest.mark.slow
async def test_deploy_call_redeploy_and_delete(served: Api, tmp_path: Path) -> None:
    api = served
    alice_name, bob_name = owner(), owner()
    alice, bob = await user_key(api, alice_name), await user_key(api, bob_name)
    status, body = await deploy(api, project(tmp_path, "echo-api"), alice, name="echo-api")
    assert status == 202, body
    assert body == {
        "name": "echo-api",
        "owner": alice_name,
        "model": f"{alice_name}/echo-api",
        "version": 1,
        "status": "building",
    }
    ready = await wait_api(api, "echo-api", alice, "available")
    assert ready["instance"] is None and ready["public"] is False

    # Cortex: the caller's own API at /{name}; the answer is the handler's return value.
    status, out = await api.call("POST", "/echo-api", key=alice, data='"so simple!"')
    assert status == 200, out
    assert (out["echo"], out["version"]) == ("so simple!", 1)
    first_pid = out["pid"]
    # CellStrat: GET loads (it is loaded already) and answers the status; POST wraps the output.
    status, got = await api.call("GET", f"/{alice_name}/echo-api", key=alice)
    assert status == 200 and got["instance"]["status"] == "RUNNING", got
    status, got = await api.call(
        "POST", f"/{alice_name}/echo-api", key=alice, headers={"x-api-key": alice}, data="[1, 2]"
    )
    assert status == 200, got
    assert got["statusCode"] == 200 and got["body"]["output"]["echo"] == [1, 2]
    status, got = await api.call(
        "POST", "/model/run", {"model": f"{alice_name}/echo-api", "input": {"a": 1}}, key=alice
    )
    assert status == 200 and got["output"]["echo"] == {"a": 1} and got["error"] is None, got

    # The handler's misbehaviour is the caller's answer, never a 500.
    status, got = await api.call("POST", "/echo-api", {"raise": "bad input"}, key=alice)
    assert (status, got["code"]) == (502, "handler_error") and "ValueError" in got["error"]
    status, got = await api.call("POST", "/echo-api", {"bad_output": 1}, key=alice)
    assert (status, got["code"]) == (502, "handler_bad_output"), got
    status, got = await api.call("POST", "/echo-api", {"exit": 3}, key=alice)
    assert (status, got["code"]) == (502, "handler_error"), got
    big = io.BytesIO(b'"' + b"x" * 20_000_000 + b'"')
    headers = {**api.headers(alice), "Content-Type": "application/json"}
    async with api.session.post(api.base + "/echo-api", data=big, headers=headers) as r:
        assert (r.status, (await r.json())["code"]) == (413, "payload_too_large")
    status, got = await api.call("POST", "/echo-api", key=alice, data="{not json")
    assert (status, got["code"]) == (400, "invalid_json"), got

    # Another user's key: the API does not exist for it.
    for method, path in (
        ("GET", "/apis/echo-api"),
        ("DELETE", "/apis/echo-api"),
    ):
        status, got = await api.call(method, path, key=bob, data='"x"')
        assert (status, got["code"]) == (404, "api_not_found"), (method, path, got)
    # Calls: the same answer as a path that leads nowhere, revealing nothing.
    for method, path in (
        ("POST", f"/{alice_name}/echo-api"),
        ("GET", f"/{alice_name}/echo-api"),
        ("POST", "/echo-api"),
        ("GET", "/etc/passwd"),
    ):
        status, got = await api.call(method, path, key=bob, data='"x"')
        assert (status, got) == (404, {"error": "no such route", "code": "not_found"}), got
    status, got = await api.call(
        "POST", "/model/run", {"model": f"{alice_name}/echo-api", "input": 1}, key=bob
    )
    assert (status, got["code"]) == (404, "model_not_found"), got
    status, listed = await api.call("GET", "/apis", key=bob)
    assert (status, listed) == (200, [])
    status, got = await api.call("GET", f"/apis/{alice_name}/echo-api")  # admin
    assert status == 200 and got["owner"] == alice_name

    # Redeploy: version 2, public; the instance rolls over to it.
    v2 = project(tmp_path, "echo-api", version=2, public=True)
    status, body = await deploy(api, v2, alice, name="echo-api")
    assert (status, body["version"]) == (202, 2), body
    ready = await wait_api(api, "echo-api", alice, "available", version=2)
    assert "rolled over to version 2" in (ready["reason"] or ""), ready
    status, out = await api.call("POST", "/echo-api", key=alice, data="1")
    assert status == 200 and out["version"] == 2 and out["pid"] != first_pid, out
    assert not pid_alive(first_pid)
    # public: true lets bob call it by its owner's path (POST /{name} is only ever the caller's).
    status, got = await api.call("POST", f"/{alice_name}/echo-api", key=bob, data="2")
    assert status == 200 and got["body"]["output"]["version"] == 2, got
    # Stopped, then loaded cold by bob's call: its log is still alice's to read (not bob's).
    model = f"{alice_name}/echo-api"
    assert (await api.call("POST", "/model/delete", {"model": model}, key=alice))[0] == 200
    status, got = await api.call("POST", f"/{alice_name}/echo-api", key=bob, data="3")
    assert status == 200, got
    out = got["body"]["output"]
    status, text = await api.call("GET", f"/model/logs?model={model}&tail=20", key=alice)
    assert status == 200 and isinstance(text, str), text

    # A third version: the first one's files go, the previous one's stay.
    v3 = project(tmp_path, "echo-api", version=3, public=True)
    assert (await deploy(api, v3, alice, name="echo-api"))[0] == 202
    await wait_api(api, "echo-api", alice, "available", version=3)
    status, out = await api.call("POST", "/echo-api", key=alice, data="1")
    assert status == 200 and out["version"] == 3, out
    versions = api.settings.data_dir / "apis" / "versions" / alice_name / "echo-api"
    assert sorted(p.name for p in versions.iterdir()) == ["2", "3"]

    status, got = await api.call("DELETE", "/apis/echo-api", key=alice)
    assert (status, got) == (200, {"name": "echo-api", "status": "deleted"})
    assert not pid_alive(out["pid"])
    status, got = await api.call("GET", "/apis/echo-api", key=alice)
    assert (status, got["code"]) == (404, "api_not_found"), got
    status, got = await api.call("POST", "/echo-api", key=alice, data="1")
    assert (status, got["code"]) == (404, "not_found"), got
    assert not versions.exists()


@pytest.mark.slow
async def test_environments_and_failures_are_told(served: Api, tmp_path: Path) -> None:
    api = served
    key = await user_key(api, owner())
    # A package the agent lacks (a local one, so no network): a venv layered on the agent's
    # packages (torch is already there), and the instance runs under its python.
    layered = project(
        tmp_path,
        "with-env",
        requirements="./vendored  # built offline\ntorch\n",
        files=VENDORED,
        main=HANDLER.format(version="__import__('mlcp_test_vendored').GREETING"),
    )
    assert (await deploy(api, layered, key, name="with-env"))[0] == 202
    # Requirements the agent satisfies already: no venv, the agent's own interpreter.
    satisfied = project(tmp_path, "no-env", requirements="pyyaml\ntorch\n")
    assert (await deploy(api, satisfied, key, name="no-env"))[0] == 202
    # One that pip cannot install: failed, with pip's own last lines.
    broken = project(tmp_path, "bad-reqs", requirements="./no-such-dir\n")
    assert (await deploy(api, broken, key, name="bad-reqs"))[0] == 202
    # A handler that raises at import: failed, with the exception.
    crash = project(tmp_path, "import-fails", main="raise ZeroDivisionError('at import')\n")
    assert (await deploy(api, crash, key, name="import-fails"))[0] == 202

    failed = await wait_api(api, "bad-reqs", key, "failed")
    assert "pip install" in failed["reason"] and "no-such-dir" in failed["reason"], failed
    status, got = await api.call("POST", "/bad-reqs", key=key, data="1")
    assert (status, got["code"]) == (409, "api_not_ready"), got
    failed = await wait_api(api, "import-fails", key, "failed")
    assert "ZeroDivisionError: at import" in failed["reason"], failed
    await wait_api(api, "with-env", key, "available")
    status, out = await api.call("POST", "/with-env", key=key, data='"x"')
    assert status == 200 and out["version"] == "hi from vendored", out
    envs = (api.settings.data_dir / "apis" / "envs").resolve()
    assert Path(out["python"]).parent.parent.parent == envs, out
    await wait_api(api, "no-env", key, "available")
    status, out = await api.call("POST", "/no-env", key=key, data='"x"')
    assert status == 200 and not Path(out["python"]).is_relative_to(envs), out
    status, listed = await api.call("GET", "/apis", key=key)
    assert sorted(a["name"] for a in listed) == ["bad-reqs", "import-fails", "no-env", "with-env"]


@pytest.mark.slow
async def test_api_limit_and_calls_counted_for_the_caller(served: Api, tmp_path: Path) -> None:
    api = served
    carol_name = owner()
    status, created = await api.call(
        "POST", "/admin/keys", {"name": carol_name, "maxApis": 1, "monthlyCalls": 2}
    )
    assert status == 201, created
    carol = created["key"]
    assert (await deploy(api, project(tmp_path, "one"), carol, name="one"))[0] == 202
    # A second API is refused before its upload is read; a new version of the first is not.
    status, body = await deploy(api, project(tmp_path, "two"), carol, name="two")
    assert status == 429 and body["code"] == "api_limit", body
    status, body = await deploy(api, project(tmp_path, "one", version=2), carol, name="one")
    assert status == 202 and body["version"] == 2, body
    await wait_api(api, "one", carol, "available")
    for left in ("1", "0"):
        async with api.session.post(
            api.base + "/one", data='"x"', headers=api.headers(carol)
        ) as resp:
            assert resp.status == 200, await resp.text()
            assert resp.headers["RateLimit-Remaining"] == left
    status, body = await api.call(
        "POST", "/model/run", {"model": f"{carol_name}/one", "input": 1}, key=carol
    )
    assert status == 429 and body["code"] == "quota_exceeded", body
    status, body = await api.call("POST", "/one", key=carol, data='"x"')
    assert status == 429 and body["code"] == "quota_exceeded", body


@pytest.mark.slow
async def test_a_deploy_under_way_is_resumed_after_a_restart(
    settings: Settings, tmp_path: Path
) -> None:
    async with serve(settings) as base, aiohttp.ClientSession() as session:
        api = Api(base, session, settings)
        name = owner()
        key = await user_key(api, name)
        # Its handler takes 4 s to import: the benchmark is still measuring it at the stop.
        slow = "import time\ntime.sleep(4)\n" + HANDLER.format(version=1)
        folder = project(tmp_path, "resumed", main=slow)
        status, body = await deploy(api, folder, key, name="resumed")
        assert (status, body["status"]) == (202, "building"), body
        await wait_api(api, "resumed", key, "benchmarking")
    # The control plane stopped with the deploy under way (its task cancelled): the next one
    # takes it up from the database.
    async with serve(settings) as base, aiohttp.ClientSession() as session:
        api = Api(base, session, settings)
        status, got = await api.call("GET", "/apis/resumed", key=key)
        # "available" already when the stopping worker finished the measurement in its grace
        # period and this start took the result up; never "failed", never stuck.
        assert status == 200 and got["status"] in ("building", "benchmarking", "available"), got
        await wait_api(api, "resumed", key, "available")
        status, out = await api.call("POST", "/resumed", key=key, data='"back"')
        assert status == 200 and out["echo"] == "back", out


@pytest.mark.slow
async def test_a_deployed_grpc_project_is_served_to_its_owner(served: Api, tmp_path: Path) -> None:
    api = served
    alice_name = owner()
    alice, bob = await user_key(api, alice_name), await user_key(api, owner())
    project_dir = grpc_echo_renamed(
        tmp_path / "grpc-echo", "mlcp_deployed", "deployed.proto", prefix="d:"
    )
    assert (await deploy(api, project_dir, alice, name="grpc-echo"))[0] == 202
    await wait_api(api, "grpc-echo", alice, "available")
    pb2, pb2_grpc = generate(project_dir, "deployed.proto", tmp_path / "stubs")
    front = app_state(api).grpc
    assert front is not None
    async with grpc.aio.insecure_channel(f"127.0.0.1:{front.port}") as channel:
        stub = pb2_grpc.EchoStub(channel)
        reply = await stub.Predict(
            pb2.Text(text="hi"), metadata=(("authorization", f"Key {alice}"),), timeout=120
        )
        assert reply.text == "d:hi"
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Predict(
                pb2.Text(text="hi"), metadata=(("authorization", f"Key {bob}"),), timeout=30
            )
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.slow
async def test_the_readme_curl_walkthrough(served: Api, tmp_path: Path) -> None:
    """README "With curl": the project packed with `tar czf - .`, weights and all, and curl."""
    api = served
    name = owner()
    key = await user_key(api, name)
    folder = project(tmp_path, "sentiment-analyser")
    tar = await asyncio.to_thread(
        subprocess.run, ["tar", "czf", "-", "."], cwd=folder, check=True, capture_output=True
    )
    archive = tar.stdout

    def curl(*args: str) -> str:
        out = subprocess.run(
            ["curl", "-sS", "-H", f"x-api-key: {key}", *args], check=True, capture_output=True
        )
        return out.stdout.decode()

    put = await asyncio.to_thread(
        subprocess.run,
        [
            "curl", "-sS", "-X", "PUT", f"{api.base}/apis/sentiment-analyser",
            "-H", f"x-api-key: {key}", "-H", "Content-Type: application/gzip",
            "--data-binary", "@-",
        ],
        input=archive,
        capture_output=True,
        check=True,
    )  # fmt: skip
    assert json.loads(put.stdout)["status"] == "building", put.stdout
    await wait_api(api, "sentiment-analyser", key, "available")
    got = json.loads(await asyncio.to_thread(curl, f"{api.base}/{name}/sentiment-analyser"))
    assert got["instance"]["status"] == "RUNNING", got
    got = json.loads(
        await asyncio.to_thread(
            curl, "-X", "POST", f"{api.base}/{name}/sentiment-analyser", "-d", '"so simple!"'
        )
    )
    assert got["statusCode"] == 200 and got["body"]["output"]["echo"] == "so simple!", got
    out = json.loads(
        await asyncio.to_thread(
            curl, "-X", "POST", f"{api.base}/sentiment-analyser", "-d", '"so simple!"'
        )
    )
    assert out["echo"] == "so simple!" and out["version"] == 1, out
    run = json.loads(
        await asyncio.to_thread(
            curl,
            "-X",
            "POST",
            f"{api.base}/model/run",
            "-d",
            f'{{"model":"{name}/sentiment-analyser","input":"so simple!"}}',
        )
    )
    assert run["output"]["echo"] == "so simple!", run
    # The weights travelled in the archive: the handler's MODEL_DIR holds them.
    versions = api.settings.data_dir / "apis" / "versions" / name / "sentiment-analyser" / "1"
    assert (versions / "model" / "weights.txt").read_text() == "weights of sentiment-analyser\n"
    gone = json.loads(
        await asyncio.to_thread(curl, "-X", "DELETE", f"{api.base}/apis/sentiment-analyser")
    )
    assert gone == {"name": "sentiment-analyser", "status": "deleted"}


async def test_weights_no_version_links_are_collected_after_the_grace(
    served: Api, tmp_path: Path
) -> None:
    """Blobs a version links stay; unlinked ones go once unused for the grace, and come back
    by upload; a blob asked for within the grace stays."""
    api = served
    state = app_state(api)
    key = await user_key(api, owner())
    folder = project(tmp_path, "weighty")
    linked = hashlib.sha256((folder / "model" / "weights.txt").read_bytes()).hexdigest()
    stray_bytes = f"never deployed {uuid.uuid4().hex}".encode()
    stray = hashlib.sha256(stray_bytes).hexdigest()
    assert (await api.call("PUT", f"/apis/blobs/{stray}", key=key, data=stray_bytes))[0] == 201
    assert (await deploy(api, folder, key, name="weighty"))[0] == 202
    await wait_api(api, "weighty", key, "available")

    async def stored(digest: str) -> bool:
        status, _ = await api.call("HEAD", f"/apis/blobs/{digest}", key=key)
        assert status in (200, 404)
        return status == 200

    # Within the grace nothing goes, linked or not (other tests may have left older ones).
    await collect_blobs(state, grace_s=3600)
    assert await stored(stray) and await stored(linked)
    assert await collect_blobs(state, grace_s=0) >= 1
    assert not await stored(stray) and await stored(linked)
    row = "SELECT count(*) FROM api_blobs WHERE sha256 = $1"
    assert await state.pool.fetchval(row, stray) == 0
    # Deleting the API unlinks its weights: they go at the next pass, files and rows.
    assert (await api.call("DELETE", "/apis/weighty", key=key))[0] == 200
    assert await collect_blobs(state, grace_s=0) >= 1
    assert not await stored(linked)
    assert not bundle.blob_path(bundle.apis_root(api.settings.data_dir), linked).exists()
    # Deploying them again uploads them again, and the API answers.
    assert (await deploy(api, folder, key, name="weighty"))[0] == 202
    await wait_api(api, "weighty", key, "available")
    assert await stored(linked)
    status, out = await api.call("POST", "/weighty", key=key, data='"x"')
    assert status == 200, out
    assert (await api.call("DELETE", "/apis/weighty", key=key))[0] == 200
