"""The README's gRPC walkthrough against a control plane started as `make run` starts it: the
seed's proto and handler dropped into MLCP_MODEL_DIRS, benchmarked by a real job, then called
with stubs generated from the user's proto (what grpcurl does), with a key, and listed by
reflection (`grpcurl list`)."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.e2e.server import http, start, stop
from tests.grpc_stubs import generate
from tests.handler_projects import SEED_PROTO, write_spec
from tests.harness import free_port

KEY = "mlcp_grpc-walkthrough-admin-key-0123456789ab"
# The seed's handler, with the pipeline left out: no model to fetch offline.
HANDLER = """\
class Handler:
    def __init__(self, config, proto_module_pb2):
        self.proto_module_pb2 = proto_module_pb2

    def Predict(self, payload):
        return self.proto_module_pb2.Message(text="returned message")
"""


def test_grpc_walkthrough(tmp_path: Path) -> None:
    project = tmp_path / "apis" / "alice" / "text-generator"
    project.mkdir(parents=True)
    (project / "handler.proto").write_text(SEED_PROTO)
    (project / "handler.py").write_text(HANDLER)
    write_spec(
        project,
        """\
        - name: text-generator
          kind: RealtimeAPI
          handler:
            type: python
            path: handler.py
            protobuf_path: handler.proto
        """,
    )
    pb2, pb2_grpc = generate(project, "handler.proto", tmp_path / "stubs")
    grpc_port = free_port()
    server = start(
        tmp_path / "data",
        tmp_path,
        "grpc",
        MLCP_ADMIN_KEY=KEY,
        MLCP_MODEL_DIRS=str(tmp_path / "apis"),
        MLCP_GRPC_PORT=str(grpc_port),
        MLCP_INCLUDE_PACKAGED_MODELS="false",
        # Its instances stop with it, not at their expiry, minutes into the rest of the suite.
        MLCP_STOP_INSTANCES_ON_EXIT="true",
    )
    try:
        model = "alice/text-generator"
        deadline = time.monotonic() + 120
        while True:
            status, body = http("POST", server.base + "/model/job", KEY, {"model": model})
            assert status == 200, body
            if body["message"] == "Model available":
                break
            assert time.monotonic() < deadline, body
            time.sleep(0.5)
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = pb2_grpc.HandlerStub(channel)
            reply = stub.Predict(
                pb2.Message(text="hello-world"),
                metadata=(("authorization", f"Key {KEY}"),),
                timeout=120,
            )
            assert reply.text == "returned message"
            listing = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
            )
            names = {s.name for answer in listing for s in answer.list_services_response.service}
            assert "text_generator.Handler" in names
    finally:
        stop(server)
