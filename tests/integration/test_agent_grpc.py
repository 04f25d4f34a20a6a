"""The agent's gRPC side with real processes and real grpcio clients built from the user's proto.

Each project runs in its own `python -m instance_agent serve` process; its gRPC port comes from
/health. Stubs are generated in the test with grpcio-tools, as a user generates them.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pytest

from tests.agent_process import AgentExited, AgentProcess
from tests.grpc_stubs import generate
from tests.handler_projects import (
    cortex_grpc_text_generator,
    grpc_echo,
    grpc_project,
)
from tests.integration.test_agent_handlers import post


@pytest.fixture(scope="module")
def echo_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return grpc_echo(tmp_path_factory.mktemp("echo") / "echo", prefix="p:")


@pytest.fixture(scope="module")
def echo_stubs(
    echo_project: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[ModuleType, ModuleType]:
    return generate(echo_project, "echo.proto", tmp_path_factory.mktemp("echo-stubs"))


@pytest.fixture(scope="module")
def echo_agent(echo_project: Path) -> Iterator[AgentProcess]:
    process = AgentProcess(
        echo_project,
        "--concurrency",
        "2",
        "--max-queue",
        "1",
        "--handler-timeout-s",
        "3",
        "--grpc-max-message-bytes",
        str(4 * 1024 * 1024),
    )
    try:
        process.wait_ready(timeout_s=30)
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def channel(echo_agent: AgentProcess) -> Iterator[grpc.Channel]:
    port = echo_agent.health()[1]["grpcPort"]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as chan:
        yield chan


@pytest.fixture()
def stub(channel: grpc.Channel, echo_stubs: tuple[ModuleType, ModuleType]) -> Any:
    return echo_stubs[1].EchoStub(channel)


def idle(agent: AgentProcess, timeout_s: float = 10) -> None:
    """Wait until the agent reports nothing in flight (threads finished, places freed)."""
    deadline = time.monotonic() + timeout_s
    while agent.health()[1]["inFlight"] or agent.health()[1]["queued"]:
        assert time.monotonic() < deadline, agent.health()
        time.sleep(0.05)


def test_health_reports_the_grpc_port(echo_agent: AgentProcess) -> None:
    status, body = echo_agent.health()
    assert status == 200
    assert body["task"] == "handler"
    assert isinstance(body["grpcPort"], int) and body["grpcPort"] > 0


def test_a_unary_rpc_calls_the_method_of_its_name(stub: Any, echo_stubs: Any) -> None:
    pb2 = echo_stubs[0]
    reply = stub.Predict(pb2.Text(text="hello-world"), timeout=10)
    assert reply == pb2.Text(text="p:hello-world")
    assert stub.Ping(pb2.google_dot_protobuf_dot_empty__pb2.Empty(), timeout=10).text == "pong"


def test_handle_post_still_answers_over_http(echo_agent: AgentProcess) -> None:
    status, body = post(f"{echo_agent.url}/handle", {"text": "x"})
    assert (status, body["output"]) == (200, {"text": "p:x"})


def test_a_server_streaming_rpc_yields_each_message(stub: Any, echo_stubs: Any) -> None:
    pb2 = echo_stubs[0]
    replies = list(stub.Count(pb2.CountRequest(n=4), timeout=10))
    assert [reply.text for reply in replies] == ["0", "1", "2", "3"]


@pytest.mark.parametrize(
    ("text", "code", "fragment"),
    [
        ("raise:no such label", grpc.StatusCode.INTERNAL, "ValueError: no such label"),
        ("wrong-type", grpc.StatusCode.INTERNAL, "returned dict, not mlcp_echo.Text"),
        ("other-message", grpc.StatusCode.INTERNAL, "returned CountRequest, not mlcp_echo.Text"),
        ("sleep:5", grpc.StatusCode.DEADLINE_EXCEEDED, "did not return within 3 s"),
    ],
)
def test_misbehaving_calls_map_to_grpc_statuses(
    stub: Any,
    echo_stubs: Any,
    echo_agent: AgentProcess,
    text: str,
    code: grpc.StatusCode,
    fragment: str,
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.Predict(echo_stubs[0].Text(text=text), timeout=10)
    assert info.value.code() == code
    assert fragment in info.value.details()
    assert stub.Predict(echo_stubs[0].Text(text="after"), timeout=10).text == "p:after"
    idle(echo_agent)


def test_bytes_that_are_not_the_message_are_invalid_argument(channel: grpc.Channel) -> None:
    call = channel.unary_unary("/mlcp_echo.Echo/Predict")
    with pytest.raises(grpc.RpcError) as info:
        call(b"\xff\xff\xff\xff", timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid mlcp_echo.Text message" in info.value.details()


def test_an_unknown_method_is_unimplemented(channel: grpc.Channel) -> None:
    for method in ("/mlcp_echo.Echo/Nope", "/other.Service/Predict"):
        with pytest.raises(grpc.RpcError) as info:
            channel.unary_unary(method)(b"", timeout=10)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_a_message_over_the_limit_is_refused(stub: Any, echo_stubs: Any) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.Predict(echo_stubs[0].Text(text="x" * (5 * 1024 * 1024)), timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert stub.Predict(echo_stubs[0].Text(text="small"), timeout=10).text == "p:small"


def test_a_1_ms_deadline_ends_the_call_and_frees_its_place(
    stub: Any, echo_stubs: Any, echo_agent: AgentProcess
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.Predict(echo_stubs[0].Text(text="sleep:0.5"), timeout=0.001)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    idle(echo_agent)
    assert stub.Predict(echo_stubs[0].Text(text="ok"), timeout=10).text == "p:ok"


def test_a_client_cancel_mid_stream_closes_the_generator(
    stub: Any, echo_stubs: Any, echo_agent: AgentProcess, tmp_path: Path
) -> None:
    marker = tmp_path / "closed"
    replies = stub.Count(
        echo_stubs[0].CountRequest(n=1000, pause_s=0.05, marker=str(marker)), timeout=30
    )
    assert next(replies).text == "0"
    assert next(replies).text == "1"
    replies.cancel()
    deadline = time.monotonic() + 10
    while not marker.exists():
        assert time.monotonic() < deadline, "the handler's generator was never closed"
        time.sleep(0.05)
    assert marker.read_text() == "closed"
    idle(echo_agent)


def test_a_full_queue_answers_resource_exhausted_with_a_retry_hint(
    stub: Any, echo_stubs: Any, echo_agent: AgentProcess
) -> None:
    pb2 = echo_stubs[0]
    started = threading.Barrier(3)

    def slow(_: int) -> str:
        started.wait()
        return str(stub.Predict(pb2.Text(text="sleep:1.5"), timeout=10).text)

    with ThreadPoolExecutor(3) as pool:
        held = [pool.submit(slow, i) for i in range(3)]  # two running, one queued
        deadline = time.monotonic() + 10
        while echo_agent.health()[1]["queued"] < 1:
            assert time.monotonic() < deadline, echo_agent.health()
            time.sleep(0.02)
        with pytest.raises(grpc.RpcError) as info:
            stub.Predict(pb2.Text(text="one too many"), timeout=10)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert ("retry-after", "1") in tuple(info.value.trailing_metadata())
        assert [future.result() for future in held] == ["slept"] * 3
    idle(echo_agent)


def test_the_seeds_text_generator_over_grpc(tmp_path: Path) -> None:
    project = cortex_grpc_text_generator(tmp_path / "text-generator")
    pb2, pb2_grpc = generate(project, "handler.proto", tmp_path / "stubs")
    agent = AgentProcess(project, "--task", "handler")
    try:
        port = agent.wait_ready(timeout_s=90)["grpcPort"]
        with grpc.insecure_channel(f"127.0.0.1:{port}") as chan:
            reply = pb2_grpc.HandlerStub(chan).Predict(pb2.Message(text="hello-world"), timeout=30)
        assert reply.text == "returned message"
        # A Handler without handle_post serves gRPC only.
        status, body = post(f"{agent.url}/handle", {"text": "x"})
        assert (status, body["code"]) == (404, "grpc_only")
    finally:
        agent.stop()


GOOD_HANDLER = """\
class Handler:
    def __init__(self, config, proto_module_pb2):
        self.pb2 = proto_module_pb2

    def Predict(self, payload):
        return payload
"""
GOOD_PROTO = """\
syntax = "proto3";
package p;
service S { rpc Predict (M) returns (M); }
message M { string text = 1; }
"""


@pytest.mark.parametrize(
    ("files", "proto", "fragment"),
    [
        (
            {"api.proto": "syntax = 'proto3';\npackage p;\nservice S { rpc Predict (M) }\n"},
            "api.proto",
            "protoc: api.proto:3:",
        ),
        (
            {"api.proto": 'syntax = "proto3";\nimport "../outside.proto";\n' + GOOD_PROTO[19:]},
            "api.proto",
            "protoc:",
        ),
        (
            {"api.proto": 'syntax = "proto3";\nimport "missing.proto";\n' + GOOD_PROTO[19:]},
            "api.proto",
            "missing.proto",
        ),
        (
            {"api.proto": 'syntax = "proto3";\npackage p;\nmessage M {}\n'},
            "api.proto",
            "no service",
        ),
        (
            {"api.proto": GOOD_PROTO.replace("rpc Predict (M)", "rpc Predict (stream M)")},
            "api.proto",
            "streams requests from the client",
        ),
        ({}, "absent.proto", "absent.proto is not in the project"),
        (
            {"api.proto": GOOD_PROTO.replace("Predict", "Classify")},
            "api.proto",
            "no method Classify(self, payload)",
        ),
        (
            {
                "api.proto": GOOD_PROTO,
                "handler.py": GOOD_HANDLER.replace("return payload", "yield payload"),
            },
            "api.proto",
            "is a generator but p.S/Predict is a unary RPC",
        ),
        (
            {
                "api.proto": GOOD_PROTO,
                "handler.py": "from instance_agent.handler import handler\n"
                "@handler\ndef f(inputs, _):\n    return inputs\n",
            },
            "api.proto",
            "must define class Handler",
        ),
        (
            {
                "api.proto": GOOD_PROTO,
                "handler.py": GOOD_HANDLER.replace("self.pb2 =", "raise KeyError('x'); self.pb2 ="),
            },
            "api.proto",
            "Handler(config, proto_module_pb2) failed: KeyError",
        ),
    ],
)
def test_a_bad_proto_fails_the_load_with_the_reason(
    tmp_path: Path, files: dict[str, str], proto: str, fragment: str
) -> None:
    project = grpc_project(tmp_path / "p", {"handler.py": GOOD_HANDLER, **files}, proto=proto)
    (tmp_path / "outside.proto").write_text(GOOD_PROTO)
    agent = AgentProcess(project)
    try:
        with pytest.raises(AgentExited) as info:
            agent.wait_ready(timeout_s=30)
        assert "exited with code 3" in str(info.value)
        assert fragment in str(info.value)
        assert str(tmp_path) not in str(info.value).split("load failed:")[-1]
    finally:
        agent.stop()


def test_a_proto_linked_from_outside_the_project_is_refused(tmp_path: Path) -> None:
    (tmp_path / "secret.proto").write_text(GOOD_PROTO)
    project = grpc_project(
        tmp_path / "p",
        {"handler.py": GOOD_HANDLER, "api.proto": 'syntax = "proto3";\nimport "lib.proto";\n'},
    )
    os.symlink(tmp_path / "secret.proto", project / "lib.proto")
    agent = AgentProcess(project)
    try:
        with pytest.raises(AgentExited) as info:
            agent.wait_ready(timeout_s=30)
        assert "lib.proto leaves the project" in str(info.value)
    finally:
        agent.stop()
