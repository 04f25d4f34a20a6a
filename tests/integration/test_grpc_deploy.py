"""Deployed APIs with a .proto over the control plane's gRPC port: compiled at deploy, a service
served by one API only, and another owner's private API NOT_FOUND (as it is 404 over HTTP)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest

from tests.api_deploy import deploy, wait_api
from tests.grpc_stubs import generate
from tests.handler_projects import grpc_echo_renamed
from tests.harness import (
    ADMIN_KEY,
    Api,
    app_state,
    own_control_plane,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

PACKAGE, PROTO = "mlcp_deployed", "deployed.proto"


@pytest.fixture(scope="module")
async def served(
    pg_dsn: str, template_db: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Api]:
    data = tmp_path_factory.mktemp("grpc-deploy-data")
    async with own_control_plane(pg_dsn, template_db, data, include_packaged_models=False) as api:
        yield api


async def user_key(api: Api, name: str) -> str:
    status, body = await api.call("POST", "/admin/keys", {"name": name, "scope": "user"})
    assert status == 201, body
    return str(body["key"])


def echo_project(root: Path, name: str) -> Path:
    folder = grpc_echo_renamed(root / name, PACKAGE, PROTO, prefix="d:")
    spec = (folder / "mlcp.yaml").read_text().replace("name: grpc-echo", f"name: {name}")
    (folder / "mlcp.yaml").write_text(spec)
    return folder


def auth(key: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Key {key}"),)


async def test_a_deployed_proto_is_served_to_its_owner_only(served: Api, tmp_path: Path) -> None:
    api = served
    alice_name, bob_name = f"a{uuid.uuid4().hex[:8]}", f"b{uuid.uuid4().hex[:8]}"
    alice, bob = await user_key(api, alice_name), await user_key(api, bob_name)
    project = echo_project(tmp_path, "echo-rpc")
    status, body = await deploy(api, project, alice, name="echo-rpc")
    assert status == 202, body
    await wait_api(api, "echo-rpc", alice, "available")
    front = app_state(api).grpc
    assert front is not None
    await front.refresh()  # as the catalog loop does every MLCP_CATALOG_REFRESH_S

    pb2, pb2_grpc = generate(project, PROTO, tmp_path / "stubs")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{front.port}") as channel:
        stub = pb2_grpc.EchoStub(channel)
        reply = await stub.Predict(pb2.Text(text="hi"), metadata=auth(alice), timeout=120)
        assert reply.text == "d:hi"
        assert (await stub.Predict(pb2.Text(text="x"), metadata=auth(ADMIN_KEY), timeout=30)).text
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Predict(pb2.Text(text="x"), metadata=auth(bob), timeout=30)
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND

    # Another API may not serve the same package.Service: refused at deploy, nothing stored.
    taken = echo_project(tmp_path, "echo-copy")
    status, body = await deploy(api, taken, bob, name="echo-copy")
    assert (status, body["code"]) == (409, "grpc_service_taken"), body
    assert f"{PACKAGE}.Echo" in body["error"]
    status, body = await api.call("GET", "/apis/echo-copy", key=bob)
    assert (status, body["code"]) == (404, "api_not_found")
    # Its own redeploy keeps it.
    status, body = await deploy(api, project, alice, name="echo-rpc")
    assert (status, body["version"]) == (202, 2), body

    # A proto that does not compile fails the deploy with protoc's message.
    broken = echo_project(tmp_path, "echo-broken")
    (broken / PROTO).write_text('syntax = "proto3";\nservice S { rpc P (M) }\n')
    status, body = await deploy(api, broken, bob, name="echo-broken")
    assert (status, body["code"]) == (422, "invalid_spec"), body
    assert PROTO in body["error"], body
    status, body = await api.call("GET", "/apis/echo-broken", key=bob)
    assert (status, body["code"]) == (404, "api_not_found")
