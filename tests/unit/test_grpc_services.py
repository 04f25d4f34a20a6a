"""The gRPC front's pure decisions: who serves a service, who may call it, which status."""

from __future__ import annotations

import grpc
import pytest

from control_plane import errors
from control_plane.auth import Principal
from control_plane.grpc_front import metadata_headers, status_for
from control_plane.grpc_services import ServedService, ServiceTable, assign, may_call, split_method


def entry(service: str, model: str, **kwargs: object) -> ServedService:
    return ServedService(service, model, {f"/{service}/Predict": False}, b"", **kwargs)  # type: ignore[arg-type]


ALICE = Principal(1, "alice", "user")
BOB = Principal(2, "bob", "user")
ADMIN = Principal(3, "root", "admin")


def test_a_service_two_apis_define_goes_to_the_first_and_the_other_is_refused_whole() -> None:
    table, refused = assign(
        [
            entry("b.Svc", "zed/b"),
            entry("a.Svc", "zed/b"),
            entry("a.Svc", "alice/a"),
            entry("c.Svc", "bob/c"),
        ]
    )
    assert {name: e.model for name, e in table.items()} == {"a.Svc": "alice/a", "c.Svc": "bob/c"}
    assert refused == [
        "zed/b: gRPC service a.Svc is already served by alice/a; rename the package or the service"
    ]


def test_the_table_version_moves_only_when_services_change() -> None:
    table = ServiceTable()
    served, _ = assign([entry("a.Svc", "x/a")])
    table.replace(served, [])
    table.replace(dict(served), [])
    assert table.version == 1
    assert table.lookup("a.Svc") is not None and table.lookup("b.Svc") is None


def test_another_owners_private_api_is_not_callable() -> None:
    private = entry("a.Svc", "alice/a", owner="alice")
    assert may_call(private, ALICE) and may_call(private, ADMIN)
    assert not may_call(private, BOB)
    assert may_call(entry("a.Svc", "alice/a", owner="alice", public=True), BOB)
    assert may_call(entry("a.Svc", "catalog/a"), BOB)


@pytest.mark.parametrize(
    ("path", "parts"),
    [
        ("/pkg.Svc/Predict", ("pkg.Svc", "Predict")),
        ("/Svc/M", ("Svc", "M")),
        ("pkg.Svc/Predict", None),
        ("/pkg.Svc/", None),
        ("//Predict", None),
        ("/a/b/c", None),
        ("", None),
    ],
)
def test_method_paths_split_into_service_and_method(
    path: str, parts: tuple[str, str] | None
) -> None:
    assert split_method(path) == parts


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.Unauthorized(), grpc.StatusCode.UNAUTHENTICATED),
        (errors.Forbidden(), grpc.StatusCode.PERMISSION_DENIED),
        (errors.ModelNotFound(), grpc.StatusCode.NOT_FOUND),
        (errors.NotLoaded(), grpc.StatusCode.UNAVAILABLE),
        (errors.Loading(), grpc.StatusCode.UNAVAILABLE),
        (errors.InstanceFailed(), grpc.StatusCode.UNAVAILABLE),
        (errors.InstanceStopping(), grpc.StatusCode.UNAVAILABLE),
        (errors.CapacityFull(), grpc.StatusCode.UNAVAILABLE),
        (errors.InstanceBusy(), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.TooManyRequests(), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.NotBenchmarked(), grpc.StatusCode.FAILED_PRECONDITION),
        (errors.InsufficientMemory(), grpc.StatusCode.FAILED_PRECONDITION),
        (errors.InstanceTimeout(), grpc.StatusCode.DEADLINE_EXCEEDED),
        (errors.DatabaseUnavailable(), grpc.StatusCode.UNAVAILABLE),
        (errors.MlcpError(), grpc.StatusCode.INTERNAL),
    ],
)
def test_errors_map_to_grpc_statuses_by_meaning(
    error: errors.MlcpError, code: grpc.StatusCode
) -> None:
    assert status_for(error) == code


def test_metadata_becomes_headers_without_binary_entries() -> None:
    headers = metadata_headers(
        (("Authorization", "Key k"), ("x-bin", b"\x00"), ("prefer", "wait=2"))
    )
    assert headers.get("authorization") == "Key k"
    assert headers.get("prefer") == "wait=2"
    assert "x-bin" not in headers
    assert metadata_headers(None).get("authorization") is None
