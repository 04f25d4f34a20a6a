"""/health, /ready (and its 503 when the database goes away) and the OpenAPI document."""

from __future__ import annotations

import asyncio
import re
from typing import Any
from urllib.parse import urlsplit

import asyncpg
from starlette.routing import BaseRoute, Mount, Route

from control_plane.app import create_app
from tests.harness import Api


async def test_health_needs_no_key(api: Api) -> None:
    status, body = await api.call("GET", "/health", key=None)
    assert (status, body) == (200, {"status": "ok"})


async def test_ready_when_the_database_answers(api: Api) -> None:
    status, body = await api.call("GET", "/ready", key=None)
    assert status == 200
    assert body["status"] == "ready"


async def ready_status(api: Api) -> tuple[int, Any, dict[str, str]]:
    async with api.session.get(api.base + "/ready") as resp:
        return resp.status, await resp.json(), dict(resp.headers)


async def test_ready_is_503_while_the_database_is_gone(api: Api, pg_dsn: str, db_dsn: str) -> None:
    name = urlsplit(db_dsn).path.lstrip("/")
    admin = await asyncpg.connect(pg_dsn)
    try:
        # Refuse new connections, then cut the pool's existing ones.
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = $1 AND pid <> pg_backend_pid()",
            name,
        )
        loop = asyncio.get_running_loop()
        started = loop.time()
        status, body, headers = await ready_status(api)
        assert loop.time() - started < 5
        assert status == 503, body
        assert body == {"error": "the database is unreachable", "code": "database_unavailable"}
        assert int(headers["Retry-After"]) >= 1
        # The process itself is still up.
        assert (await api.call("GET", "/health", key=None))[0] == 200
        # Authenticated routes need the database too, and fail without a 500.
        status, err = await api.call("GET", "/model/list", key="mlcp_some-key-not-in-any-cache")
        assert (status, err["code"]) == (503, "database_unavailable"), err
    finally:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        await admin.close()
    # The pool recovers by itself once the database is back.
    for _ in range(50):
        status, _, _ = await ready_status(api)
        if status == 200:
            break
        await asyncio.sleep(0.1)
    assert status == 200


async def test_ready_is_503_when_the_database_is_dropped(
    api: Api, pg_dsn: str, db_dsn: str
) -> None:
    name = urlsplit(db_dsn).path.lstrip("/")
    admin = await asyncpg.connect(pg_dsn)
    try:
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        await admin.close()
    status, body, headers = await ready_status(api)
    assert status == 503
    assert body["code"] == "database_unavailable"
    assert "Retry-After" in headers


# -- OpenAPI ------------------------------------------------------------------------------------


def _openapi_path(path: str) -> str:
    # Starlette writes "{id:int}"; OpenAPI writes "{id}".
    return re.sub(r"\{(\w+)(:\w+)?\}", r"{\1}", path)


def served_operations(routes: list[BaseRoute], prefix: str = "") -> set[tuple[str, str]]:
    """(method, path) for every HTTP route of an app, mounts included."""
    found: set[tuple[str, str]] = set()
    for route in routes:
        if isinstance(route, Route):
            if not route.include_in_schema:  # HTML pages (the dashboard), not the API
                continue
            methods = route.methods or {"GET"}
            for method in methods:
                # Starlette adds HEAD to every GET route; a HEAD-only route is its own.
                if method != "HEAD" or "GET" not in methods:
                    found.add((method.lower(), _openapi_path(prefix + route.path)))
        elif isinstance(route, Mount):
            found |= served_operations(list(route.routes), prefix + route.path)
    return found


def documented_operations(document: dict[str, Any]) -> set[tuple[str, str]]:
    methods = {"get", "put", "post", "delete", "patch", "options", "head", "trace"}
    return {
        (method, path)
        for path, item in document["paths"].items()
        for method in item
        if method in methods
    }


async def openapi_document(api: Api) -> dict[str, Any]:
    status, document = await api.call("GET", "/openapi.json", key=None)
    assert status == 200
    assert isinstance(document, dict)
    return document


async def test_openapi_documents_every_route_of_the_app(api: Api) -> None:
    document = await openapi_document(api)
    served = served_operations(create_app(api.settings).routes)
    assert ("get", "/health") in served  # the walk itself works
    documented = documented_operations(document)
    assert served - documented == set(), "routes missing from /openapi.json"
    assert documented - served == set(), "/openapi.json documents routes the app does not serve"


def refs_in(value: Any) -> list[str]:
    if isinstance(value, dict):
        found = [value["$ref"]] if isinstance(value.get("$ref"), str) else []
        return found + [r for v in value.values() for r in refs_in(v)]
    if isinstance(value, list):
        return [r for v in value for r in refs_in(v)]
    return []


async def test_openapi_document_is_well_formed(api: Api) -> None:
    document = await openapi_document(api)
    assert document["openapi"].startswith("3.")
    assert document["info"]["title"]
    schemas = document["components"]["schemas"]
    for ref in refs_in(document):
        assert ref.startswith("#/components/schemas/"), ref
        assert ref.rsplit("/", 1)[1] in schemas, f"dangling $ref {ref}"
    schemes = set(document["components"]["securitySchemes"])
    operation_ids: list[str] = []
    for path, item in document["paths"].items():
        for method, op in item.items():
            where = f"{method.upper()} {path}"
            operation_ids.append(op["operationId"])
            assert op.get("summary"), where
            assert op["responses"], where
            for requirement in op.get("security", []):
                assert set(requirement) <= schemes, where
            for code, response in op["responses"].items():
                if int(code) >= 400:
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/Error"}, where
            if op.get("security"):
                # Every authenticated route says how it refuses a missing key.
                assert "401" in op["responses"], where
            for name in re.findall(r"\{(\w+)\}", path):
                params = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
                assert name in params, f"{where}: path parameter {name} undocumented"
    assert len(operation_ids) == len(set(operation_ids)), "operationIds must be unique"
    error = schemas["Error"]
    assert set(error["required"]) == {"error", "code"}
