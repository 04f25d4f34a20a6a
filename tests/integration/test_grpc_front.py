"""The control plane's gRPC port with real servers: PostgreSQL, uvicorn, agents, grpcio clients.

Handler projects with a .proto sit in MLCP_MODEL_DIRS as catalog APIs; calls go through the
control plane's gRPC port (one module-wide control plane; each test uses its own API where its
instance's state matters). Clients use stubs generated from the projects' protos in the test.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import asyncpg
import grpc
import grpc.aio
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from control_plane import h2_wire as h2
from tests.grpc_stubs import generate
from tests.handler_projects import cortex_grpc_text_generator, grpc_echo, grpc_echo_renamed
from tests.harness import (
    ADMIN_KEY,
    Api,
    app_state,
    create_database,
    instance_pid,
    make_settings,
    mark_measured,
    serve,
    wait_status,
)

ECHO = "alice/grpc-echo"  # mlcp_echo.Echo
SECOND = "bob/second-echo"  # mlcp_second.Echo, side by side
DUPLICATE = "zed/dup-echo"  # mlcp_echo.Echo again: refused
SLOW = "carol/slow-echo"  # mlcp_slow.Echo, loads in 4 s
DYING = "dave/dying-echo"  # mlcp_dying.Echo, its agent is killed
BUSY = "erin/busy-echo"  # mlcp_busy.Echo, concurrency 1 and no queue
MEASURED = "fred/measured-echo"  # mlcp_measured.Echo, benchmarked by a real job
BRIEF = "gina/brief-echo"  # mlcp_brief.Echo, expires after 1 s idle
BROKEN = "hank/broken-proto"  # a proto that does not compile: not served
SEED = "ivan/text-generator"  # the seed's text_generator.Handler over a tiny GPT-2 pipeline
WIDE = "kim/wide-echo"  # mlcp_wide.Echo, concurrency 8: calls at once on one connection
FAULT = "lee/fault-echo"  # mlcp_fault.Echo, its agent is killed mid-stream
AUTH = (("authorization", f"Key {ADMIN_KEY}"),)


@pytest.fixture(scope="module")
async def front(
    pg_dsn: str, template_db: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Api]:
    name, dsn = await create_database(pg_dsn, "mlcp_t", template_db)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("UPDATE cluster SET id = $1", uuid.uuid4().hex[:12])
    finally:
        await conn.close()
    root = tmp_path_factory.mktemp("grpc-models")
    grpc_echo(root / "alice" / "grpc-echo", prefix="p:")
    grpc_echo_renamed(root / "bob" / "second-echo", "mlcp_second", "second.proto", prefix="2:")
    grpc_echo(root / "zed" / "dup-echo", prefix="dup:")
    grpc_echo_renamed(root / "carol" / "slow-echo", "mlcp_slow", "slow.proto", init_sleep_s=4)
    grpc_echo_renamed(root / "dave" / "dying-echo", "mlcp_dying", "dying.proto")
    grpc_echo_renamed(root / "erin" / "busy-echo", "mlcp_busy", "busy.proto", concurrency=1)
    grpc_echo_renamed(root / "fred" / "measured-echo", "mlcp_measured", "measured.proto")
    grpc_echo_renamed(root / "gina" / "brief-echo", "mlcp_brief", "brief.proto", expiration_s=1)
    grpc_echo_renamed(root / "kim" / "wide-echo", "mlcp_wide", "wide.proto", concurrency=8)
    grpc_echo_renamed(root / "lee" / "fault-echo", "mlcp_fault", "fault.proto")
    seed = cortex_grpc_text_generator(root / "ivan" / "text-generator")
    (seed / "text_generator.yaml").rename(seed / "mlcp.yaml")
    broken = grpc_echo(root / "hank" / "broken-proto")
    (broken / "echo.proto").write_text("syntax = 'proto3';\nservice S { rpc P (M) }\n")
    settings = make_settings(
        dsn,
        tmp_path_factory.mktemp("grpc-data"),
        model_dirs=str(root),
        include_packaged_models=False,
        max_queue=0,
        grpc_max_message_bytes=4 * 1024 * 1024,
    )
    try:
        async with serve(settings) as base, aiohttp.ClientSession() as session:
            api = Api(base, session, settings)
            for model in (
                ECHO,
                SECOND,
                DUPLICATE,
                SLOW,
                DYING,
                BUSY,
                BRIEF,
                BROKEN,
                SEED,
                WIDE,
                FAULT,
            ):
                await mark_measured(api, model, 20_000_000)
            yield api
    finally:
        admin = await asyncpg.connect(pg_dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@pytest.fixture(scope="module")
def stubs(front: Api, tmp_path_factory: pytest.TempPathFactory) -> dict[str, ModuleType]:
    dirs = Path(front.settings.model_dirs)
    out = tmp_path_factory.mktemp("grpc-front-stubs")
    found: dict[str, ModuleType] = {}
    for model, proto in (
        (ECHO, "echo.proto"),
        (SECOND, "second.proto"),
        (SLOW, "slow.proto"),
        (DYING, "dying.proto"),
        (BUSY, "busy.proto"),
        (MEASURED, "measured.proto"),
        (BRIEF, "brief.proto"),
        (WIDE, "wide.proto"),
        (FAULT, "fault.proto"),
    ):
        pb2, pb2_grpc = generate(dirs / model, proto, out)
        found[model] = pb2
        found[model + ":grpc"] = pb2_grpc
    return found


@pytest.fixture
async def channel(front: Api) -> AsyncIterator[grpc.aio.Channel]:
    grpc_front = app_state(front).grpc
    assert grpc_front is not None
    async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_front.port}") as chan:
        yield chan


def echo_stub(stubs: dict[str, ModuleType], model: str, channel: grpc.aio.Channel) -> Any:
    return stubs[model + ":grpc"].EchoStub(channel)


async def rpc_error(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


def in_flight(front: Api, model: str) -> int:
    state = app_state(front)
    route = state.supervisor.route(model)
    return state.activity.in_flight(route.instance_id) if route else 0


async def test_the_first_call_loads_the_api_and_answers(
    front: Api, channel: grpc.aio.Channel, stubs: dict[str, ModuleType]
) -> None:
    stub = echo_stub(stubs, ECHO, channel)
    reply = await stub.Predict(stubs[ECHO].Text(text="hello-world"), metadata=AUTH, timeout=60)
    assert reply.text == "p:hello-world"
    status = await wait_status(front, ECHO, "RUNNING")
    assert status["status"] == "RUNNING"
    bearer = (("authorization", f"Bearer {ADMIN_KEY}"),)
    assert (await stub.Predict(stubs[ECHO].Text(text="b"), metadata=bearer, timeout=10)).text == (
        "p:b"
    )


async def test_two_apis_with_different_services_side_by_side(
    channel: grpc.aio.Channel, stubs: dict[str, ModuleType]
) -> None:
    first = echo_stub(stubs, ECHO, channel).Predict(
        stubs[ECHO].Text(text="x"), metadata=AUTH, timeout=60
    )
    second = echo_stub(stubs, SECOND, channel).Predict(
        stubs[SECOND].Text(text="x"), metadata=AUTH, timeout=60
    )
    assert [r.text for r in await asyncio.gather(first, second)] == ["p:x", "2:x"]


async def test_reflection_lists_the_served_services_and_a_duplicate_is_refused(
    front: Api, channel: grpc.aio.Channel
) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    names = set()
    async for answer in stub.ServerReflectionInfo(iter([request]), timeout=10):
        names |= {s.name for s in answer.list_services_response.service}
    assert {"mlcp_echo.Echo", "mlcp_second.Echo", "grpc.health.v1.Health"} <= names
    assert "grpc.reflection.v1alpha.ServerReflection" in names
    grpc_front = app_state(front).grpc
    assert grpc_front is not None
    assert grpc_front.table.lookup("mlcp_echo.Echo").model == ECHO  # type: ignore[union-attr]
    assert any(
        r.startswith(f"{DUPLICATE}: gRPC service mlcp_echo.Echo") for r in grpc_front.table.refused
    )
    # The file describing a service, as grpcurl asks for it without -proto.
    symbol = reflection_pb2.ServerReflectionRequest(file_containing_symbol="mlcp_echo.Echo")
    async for answer in stub.ServerReflectionInfo(iter([symbol]), timeout=10):
        files = answer.file_descriptor_response.file_descriptor_proto
        assert files, answer


async def test_the_health_service_answers(channel: grpc.aio.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", "mlcp_echo.Echo"):
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    error = await rpc_error(stub.Check(health_pb2.HealthCheckRequest(service="nope.X"), timeout=10))
    assert error.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("metadata", "code"),
    [
        ((), grpc.StatusCode.UNAUTHENTICATED),
        ((("authorization", "Key mlcp_wrong"),), grpc.StatusCode.UNAUTHENTICATED),
        ((("authorization", "Basic abc"),), grpc.StatusCode.UNAUTHENTICATED),
        ((("authorization", "Key " + "x" * 300),), grpc.StatusCode.UNAUTHENTICATED),
    ],
)
async def test_a_call_without_a_valid_key_is_unauthenticated(
    channel: grpc.aio.Channel,
    stubs: dict[str, ModuleType],
    metadata: tuple[tuple[str, str], ...],
    code: grpc.StatusCode,
) -> None:
    stub = echo_stub(stubs, SECOND, channel)
    error = await rpc_error(
        stub.Predict(stubs[SECOND].Text(text="x"), metadata=metadata, timeout=10)
    )
    assert error.code() == code


@pytest.mark.parametrize("method", ["/mlcp_echo.Echo/Nope", "/unknown.Service/Predict", "/x", "//"])
async def test_an_unknown_method_or_service_is_unimplemented(
    channel: grpc.aio.Channel, method: str
) -> None:
    error = await rpc_error(channel.unary_unary(method)(b"", metadata=AUTH, timeout=10))
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_the_instances_statuses_pass_through(
    channel: grpc.aio.Channel, stubs: dict[str, ModuleType]
) -> None:
    stub = echo_stub(stubs, ECHO, channel)
    text = stubs[ECHO].Text
    error = await rpc_error(
        stub.Predict(text(text="raise:no such label"), metadata=AUTH, timeout=30)
    )
    assert (error.code(), error.details()) == (
        grpc.StatusCode.INTERNAL,
        "ValueError: no such label",
    )
    error = await rpc_error(stub.Predict(text(text="wrong-type"), metadata=AUTH, timeout=30))
    assert error.code() == grpc.StatusCode.INTERNAL
    assert "returned dict, not mlcp_echo.Text" in (error.details() or "")
    raw = channel.unary_unary("/mlcp_echo.Echo/Predict")
    error = await rpc_error(raw(b"\xff\xff\xff", metadata=AUTH, timeout=30))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_50_mb_message_is_refused_at_the_front(
    front: Api, channel: grpc.aio.Channel, stubs: dict[str, ModuleType]
) -> None:
    stub = echo_stub(stubs, SECOND, channel)
    error = await rpc_error(
        stub.Predict(stubs[SECOND].Text(text="x" * (50 * 1024 * 1024)), metadata=AUTH, timeout=60)
    )
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (await stub.Predict(stubs[SECOND].Text(text="ok"), metadata=AUTH, timeout=60)).text == (
        "2:ok"
    )


async def test_a_server_stream_relays_and_a_cancel_reaches_the_handler(
    front: Api, channel: grpc.aio.Channel, stubs: dict[str, ModuleType], tmp_path: Path
) -> None:
    stub = echo_stub(stubs, ECHO, channel)
    pb2 = stubs[ECHO]
    replies = [r.text async for r in stub.Count(pb2.CountRequest(n=3), metadata=AUTH, timeout=30)]
    assert replies == ["0", "1", "2"]
    marker = tmp_path / "closed"
    call = stub.Count(
        pb2.CountRequest(n=1000, pause_s=0.05, marker=str(marker)), metadata=AUTH, timeout=30
    )
    assert (await call.read()).text == "0"
    assert in_flight(front, ECHO) == 1
    call.cancel()
    for _ in range(200):
        # The handler creates the file, then writes it: read it once it says so.
        if marker.exists() and marker.read_text() == "closed":
            break
        await asyncio.sleep(0.05)
    assert marker.read_text() == "closed"
    assert in_flight(front, ECHO) == 0


@pytest.mark.parametrize("timeout_s", [0.001, 0.5])
async def test_a_deadline_propagates_and_frees_the_call(
    front: Api, channel: grpc.aio.Channel, stubs: dict[str, ModuleType], timeout_s: float
) -> None:
    stub = echo_stub(stubs, ECHO, channel)
    await stub.Predict(stubs[ECHO].Text(text="warm"), metadata=AUTH, timeout=60)
    error = await rpc_error(
        stub.Predict(stubs[ECHO].Text(text="sleep:1"), metadata=AUTH, timeout=timeout_s)
    )
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    for _ in range(100):
        if in_flight(front, ECHO) == 0:
            break
        await asyncio.sleep(0.02)
    assert in_flight(front, ECHO) == 0


async def test_a_full_instance_answers_resource_exhausted_with_a_retry_hint(
    channel: grpc.aio.Channel, stubs: dict[str, ModuleType]
) -> None:
    stub = echo_stub(stubs, BUSY, channel)
    text = stubs[BUSY].Text
    await stub.Predict(text(text="warm"), metadata=AUTH, timeout=60)
    held = stub.Predict(text(text="sleep:1.5"), metadata=AUTH, timeout=30)
    task = asyncio.ensure_future(held)
    await asyncio.sleep(0.5)
    error = await rpc_error(stub.Predict(text(text="one too many"), metadata=AUTH, timeout=30))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert ("retry-after", "1") in tuple(error.trailing_metadata() or ())
    assert (await task).text == "slept"


async def test_a_load_beyond_the_wait_is_unavailable_then_answers(
    front: Api, channel: grpc.aio.Channel, stubs: dict[str, ModuleType]
) -> None:
    stub = echo_stub(stubs, SLOW, channel)
    text = stubs[SLOW].Text
    wait_1 = (*AUTH, ("prefer", "wait=1"))
    error = await rpc_error(stub.Predict(text(text="x"), metadata=wait_1, timeout=30))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "loading" in (error.details() or "")
    assert (await stub.Predict(text(text="x"), metadata=AUTH, timeout=60)).text == "x"


async def test_an_instance_that_died_is_unavailable(
    front: Api, channel: grpc.aio.Channel, stubs: dict[str, ModuleType]
) -> None:
    stub = echo_stub(stubs, DYING, channel)
    text = stubs[DYING].Text
    assert (await stub.Predict(text(text="x"), metadata=AUTH, timeout=60)).text == "x"
    pid = await instance_pid(front, DYING)
    psutil.Process(pid).kill()
    psutil.Process(pid).wait(10)
    error = await rpc_error(stub.Predict(text(text="x"), metadata=AUTH, timeout=30))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    await wait_status(front, DYING, "FAILED")


async def test_a_handler_project_is_benchmarked_by_a_real_job_then_served(
    front: Api, channel: grpc.aio.Channel, stubs: dict[str, ModuleType]
) -> None:
    stub = echo_stub(stubs, MEASURED, channel)
    text = stubs[MEASURED].Text
    error = await rpc_error(stub.Predict(text(text="x"), metadata=AUTH, timeout=30))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "has not been benchmarked" in (error.details() or "")
    message = ""
    for _ in range(300):
        status, body = await front.call("POST", "/model/job", {"model": MEASURED})
        assert status in (200, 201), body
        message = body["message"]
        if message == "Model available":
            break
        await asyncio.sleep(0.1)
    assert message == "Model available"
    assert (await stub.Predict(text(text="x"), metadata=AUTH, timeout=60)).text == "x"


async def test_a_broken_proto_in_the_catalog_is_not_served_and_says_why(
    front: Api, channel: grpc.aio.Channel
) -> None:
    grpc_front = app_state(front).grpc
    assert grpc_front is not None
    reasons = [r for r in grpc_front.table.refused if r.startswith(BROKEN)]
    assert len(reasons) == 1 and "protoc: echo.proto:2:" in reasons[0], grpc_front.table.refused
    error = await rpc_error(channel.unary_unary("/S/P")(b"", metadata=AUTH, timeout=10))
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_a_client_cancel_of_a_unary_call_frees_it_at_once(
    front: Api, channel: grpc.aio.Channel, stubs: dict[str, ModuleType]
) -> None:
    stub = echo_stub(stubs, ECHO, channel)
    await stub.Predict(stubs[ECHO].Text(text="warm"), metadata=AUTH, timeout=60)
    call = stub.Predict(stubs[ECHO].Text(text="sleep:2"), metadata=AUTH, timeout=30)
    for _ in range(100):
        if in_flight(front, ECHO) == 1:
            break
        await asyncio.sleep(0.01)
    assert in_flight(front, ECHO) == 1
    call.cancel()
    for _ in range(50):  # well before the handler's 2 s
        if in_flight(front, ECHO) == 0:
            break
        await asyncio.sleep(0.02)
    assert in_flight(front, ECHO) == 0


async def test_a_call_in_flight_keeps_the_instance_past_its_expiry_which_then_slides(
    front: Api, channel: grpc.aio.Channel, stubs: dict[str, ModuleType]
) -> None:
    stub = echo_stub(stubs, BRIEF, channel)
    pb2 = stubs[BRIEF]
    replies = [
        r.text
        async for r in stub.Count(pb2.CountRequest(n=6, pause_s=0.5), metadata=AUTH, timeout=60)
    ]
    assert replies == ["0", "1", "2", "3", "4", "5"]  # 2.5 s streaming, expiry 1 s
    status = await wait_status(front, BRIEF, "RUNNING")
    assert status["expirationPeriodSeconds"] == 1, status
    await wait_status(front, BRIEF, "STOPPED", timeout_s=15)


async def test_the_seeds_text_generator_through_the_control_plane(
    front: Api, channel: grpc.aio.Channel, tmp_path: Path
) -> None:
    pb2, pb2_grpc = generate(Path(front.settings.model_dirs) / SEED, "handler.proto", tmp_path)
    stub = pb2_grpc.HandlerStub(channel)
    reply = await stub.Predict(pb2.Message(text="hello-world"), metadata=AUTH, timeout=120)
    assert reply.text == "returned message"


async def test_a_second_control_plane_cannot_take_a_grpc_port_in_use(
    front: Api, channel: grpc.aio.Channel, stubs: dict[str, ModuleType], tmp_path: Path
) -> None:
    taken = app_state(front).grpc
    assert taken is not None
    settings = front.settings.model_copy(
        update={"grpc_port": taken.port, "data_dir": tmp_path, "stop_instances_on_exit": False}
    )
    async with serve(settings) as base, aiohttp.ClientSession() as session:
        second = Api(base, session, settings)
        # HTTP is served; gRPC is not (the port is the first control plane's, and stays so).
        assert app_state(second).grpc is None
        async with session.get(base + "/health") as resp:
            assert resp.status == 200
        for i in range(6):
            reply = await echo_stub(stubs, ECHO, channel).Predict(
                stubs[ECHO].Text(text=f"still-{i}"), metadata=AUTH, timeout=60
            )
            assert reply.text == f"p:still-{i}"


async def test_a_key_over_its_monthly_calls_is_resource_exhausted(
    front: Api, channel: grpc.aio.Channel, stubs: dict[str, ModuleType]
) -> None:
    status, key = await front.call(
        "POST", "/admin/keys", {"name": f"grpc-{uuid.uuid4().hex[:6]}", "monthlyCalls": 1}
    )
    assert status == 201, key
    auth = (("authorization", f"Key {key['key']}"),)
    stub = echo_stub(stubs, ECHO, channel)
    assert (await stub.Predict(stubs[ECHO].Text(text="a"), metadata=auth, timeout=60)).text == (
        "p:a"
    )
    error = await rpc_error(stub.Predict(stubs[ECHO].Text(text="b"), metadata=auth, timeout=10))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "calls" in (error.details() or "")
    retry = dict(error.trailing_metadata() or ()).get("retry-after")
    assert retry is not None and int(retry) >= 1
    # The admin key (no limits) is not affected.
    assert (await stub.Predict(stubs[ECHO].Text(text="c"), metadata=AUTH, timeout=10)).text == (
        "p:c"
    )


async def test_the_channel_of_a_stopped_instance_is_closed(
    front: Api, channel: grpc.aio.Channel, stubs: dict[str, ModuleType]
) -> None:
    """One upstream channel per instance that had a call; it goes once the instance does."""
    state = app_state(front)
    grpc_front = state.grpc
    assert grpc_front is not None
    stub = echo_stub(stubs, ECHO, channel)
    assert (await stub.Predict(stubs[ECHO].Text(text="a"), metadata=AUTH, timeout=60)).text == (
        "p:a"
    )
    route = state.supervisor.route(ECHO)
    assert route is not None and route.instance_id in grpc_front._channels
    grpc_front.drop_idle_channels()  # routed: kept
    assert route.instance_id in grpc_front._channels
    address = grpc_front._channels[route.instance_id].address
    assert grpc_front._relay.connections_to(address) == 1
    assert (await front.call("POST", "/model/delete", {"model": ECHO}))[0] == 200
    await state.supervisor.refresh_routes()
    grpc_front.drop_idle_channels()
    assert route.instance_id not in grpc_front._channels
    # The relay's connection to it goes too (at once, or when the stopped agent closed it).
    assert grpc_front._relay.connections_to(address) == 0
    # The next call loads a new instance and opens its own channel.
    assert (await stub.Predict(stubs[ECHO].Text(text="b"), metadata=AUTH, timeout=60)).text == (
        "p:b"
    )
    again = state.supervisor.route(ECHO)
    assert again is not None and again.instance_id != route.instance_id
    assert again.instance_id in grpc_front._channels


async def test_warm_calls_go_straight_to_the_instance_over_one_connection(
    front: Api, stubs: dict[str, ModuleType]
) -> None:
    """Many clients, one upstream connection: the relay multiplexes their calls on it."""
    grpc_front = app_state(front).grpc
    assert grpc_front is not None
    relay = grpc_front._relay
    port = grpc_front.port
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(3)]
    try:
        stubs_ = [echo_stub(stubs, WIDE, chan) for chan in channels]
        text = stubs[WIDE].Text
        assert (await stubs_[0].Predict(text(text="warm"), metadata=AUTH, timeout=60)).text == (
            "warm"
        )
        before = relay.direct_calls
        replies = await asyncio.gather(
            *(
                stubs_[i % 3].Predict(text(text=f"m{i}"), metadata=AUTH, timeout=30)
                for i in range(48)
            )
        )
        assert [r.text for r in replies] == [f"m{i}" for i in range(48)]
        assert relay.direct_calls - before == 48
        route = app_state(front).supervisor.route(WIDE)
        assert route is not None
        assert relay.connections_to(grpc_front._channels[route.instance_id].address) == 1
    finally:
        for chan in channels:
            await chan.close()


async def test_a_3_mb_message_goes_both_ways_through_the_flow_control_windows(
    channel: grpc.aio.Channel, stubs: dict[str, ModuleType]
) -> None:
    stub = echo_stub(stubs, WIDE, channel)
    text = stubs[WIDE].Text
    await stub.Predict(text(text="warm"), metadata=AUTH, timeout=60)
    big = "".join(chr(97 + i % 26) for i in range(3 * 1024 * 1024))
    replies = await asyncio.gather(
        *(stub.Predict(text(text=big), metadata=AUTH, timeout=60) for _ in range(3))
    )
    assert all(r.text == big for r in replies)


async def test_a_client_whose_connection_closes_mid_stream_frees_the_call(
    front: Api, stubs: dict[str, ModuleType], tmp_path: Path
) -> None:
    grpc_front = app_state(front).grpc
    assert grpc_front is not None
    chan = grpc.aio.insecure_channel(f"127.0.0.1:{grpc_front.port}")
    stub = echo_stub(stubs, ECHO, chan)
    pb2 = stubs[ECHO]
    await stub.Predict(pb2.Text(text="warm"), metadata=AUTH, timeout=60)
    marker = tmp_path / "closed"
    call = stub.Count(
        pb2.CountRequest(n=1000, pause_s=0.05, marker=str(marker)), metadata=AUTH, timeout=30
    )
    assert (await call.read()).text == "0"
    assert in_flight(front, ECHO) == 1
    await chan.close()
    for _ in range(200):
        if marker.exists() and marker.read_text() == "closed" and in_flight(front, ECHO) == 0:
            break
        await asyncio.sleep(0.05)
    assert marker.read_text() == "closed"
    assert in_flight(front, ECHO) == 0


async def _raw_exchange(port: int, payload: bytes) -> bytes:
    """What the gRPC port sends back to `payload` until it closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        await writer.drain()
        got = b""
        async with asyncio.timeout(5):
            while chunk := await reader.read(65536):
                got += chunk
        return got
    finally:
        writer.close()


def _goaway_code(wire: bytes) -> int | None:
    frames = h2.FrameReader(max_frame=1 << 24).feed(wire)
    codes = [int.from_bytes(p[4:8], "big") for t, _, _, p in frames if t == h2.GOAWAY]
    return codes[-1] if codes else None


async def test_a_client_that_breaks_http2_loses_its_own_connection_only(
    front: Api, channel: grpc.aio.Channel, stubs: dict[str, ModuleType]
) -> None:
    grpc_front = app_state(front).grpc
    assert grpc_front is not None
    port = grpc_front.port
    opening = h2.PREFACE + h2.settings_frame([])
    # Not HTTP/2 at all (an HTTP/1.1 request): closed, with PROTOCOL_ERROR.
    got = await _raw_exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert _goaway_code(got) == h2.PROTOCOL_ERROR
    # A header block that does not decode.
    bad_block = h2.frame(h2.HEADERS, h2.END_HEADERS, 1, bytes.fromhex("bf"))
    assert _goaway_code(await _raw_exchange(port, opening + bad_block)) == h2.COMPRESSION_ERROR
    # A frame over the size the relay allows.
    huge = h2.frame(h2.DATA, 0, 1, b"x" * 20_000)
    assert _goaway_code(await _raw_exchange(port, opening + huge)) == h2.FRAME_SIZE_ERROR
    # A stream id that goes backwards, and a SETTINGS frame of a bad length.
    fields = h2.encode_headers([(":method", "POST"), (":path", "/x.Y/Z")])
    backwards = h2.frame(h2.HEADERS, h2.END_HEADERS, 5, fields) + h2.frame(
        h2.HEADERS, h2.END_HEADERS, 3, fields
    )
    assert _goaway_code(await _raw_exchange(port, opening + backwards)) == h2.PROTOCOL_ERROR
    bad_settings = h2.frame(h2.SETTINGS, 0, 0, b"\x00\x04\x00")
    assert _goaway_code(await _raw_exchange(port, opening + bad_settings)) == h2.FRAME_SIZE_ERROR
    # The control plane and every other client go on.
    reply = await echo_stub(stubs, ECHO, channel).Predict(
        stubs[ECHO].Text(text="still"), metadata=AUTH, timeout=60
    )
    assert reply.text == "p:still"


async def test_an_instance_killed_mid_stream_on_the_direct_path_is_unavailable_then_reloads(
    front: Api, channel: grpc.aio.Channel, stubs: dict[str, ModuleType]
) -> None:
    grpc_front = app_state(front).grpc
    assert grpc_front is not None
    stub = echo_stub(stubs, FAULT, channel)
    pb2 = stubs[FAULT]
    assert (await stub.Predict(pb2.Text(text="warm"), metadata=AUTH, timeout=60)).text == "warm"
    before = grpc_front._relay.direct_calls
    call = stub.Count(pb2.CountRequest(n=1000, pause_s=0.05), metadata=AUTH, timeout=60)
    assert (await call.read()).text == "0"
    assert grpc_front._relay.direct_calls == before + 1  # relayed frame by frame
    state = app_state(front)
    route = state.supervisor.route(FAULT)
    assert route is not None and state.activity.in_flight(route.instance_id) == 1
    pid = await instance_pid(front, FAULT)
    psutil.Process(pid).kill()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        while await call.read() is not grpc.aio.EOF:
            pass
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "unavailable" in (info.value.details() or "")
    assert state.activity.in_flight(route.instance_id) == 0
    await wait_status(front, FAULT, "FAILED")
    # The next call loads a new instance and answers.
    assert (await stub.Predict(pb2.Text(text="again"), metadata=AUTH, timeout=60)).text == "again"
