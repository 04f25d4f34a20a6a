"""Bad input of every kind gets a fitting 4xx in the {"error", "code"} envelope, never a 500.

Three families, each sent to every route it applies to: authentication headers, body shape and
model ids. Routes that do not exist yet (404 "no such route") are skipped, so this file keeps
covering /model/job and /model/load as they arrive.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import asyncpg
import pytest

from tests.harness import ADMIN_KEY, Api, create_database, make_settings, serve

MIB = 1024 * 1024
NO_SUCH_ROUTE = "no such route"

# Sentinels for keys that the test makes at run time.
USER_KEY = "<user key>"
REVOKED_KEY = "<revoked key>"


@dataclass(frozen=True)
class Request:
    """One request to send: raw bytes (or a chunked stream) and headers, nothing implicit."""

    headers: dict[str, str] = field(default_factory=dict)
    data: bytes | None = None
    chunked: bool = False
    key: str | None = ADMIN_KEY


def json_request(value: Any) -> Request:
    return Request({"Content-Type": "application/json"}, json.dumps(value).encode())


def raw(data: bytes | str, content_type: str = "application/json") -> Request:
    payload = data.encode() if isinstance(data, str) else data
    return Request({"Content-Type": content_type}, payload)


async def chunks(total: int, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    sent = 0
    yield b'{"name": "'
    while sent < total:
        yield b"x" * size
        sent += size
    yield b'"}'


@pytest.fixture(scope="module")
async def api(
    pg_dsn: str, template_db: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Api]:
    """One server for the whole module: the cases here are refused (the few accepted ones only
    add keys nobody reads), and a server per case would cost ~0.3 s each."""
    name, dsn = await create_database(pg_dsn, "mlcp_bad", template_db)
    settings = make_settings(dsn, tmp_path_factory.mktemp("bad") / "data")
    try:
        async with serve(settings) as base, aiohttp.ClientSession() as session:
            yield Api(base, session, settings)
    finally:
        admin = await asyncpg.connect(pg_dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


async def send(api: Api, method: str, path: str, req: Request, keys: dict[str, str]) -> Any:
    headers = dict(req.headers)
    if req.key is not None:
        headers.setdefault("Authorization", f"Key {keys.get(req.key, req.key)}")
    data: Any = req.data
    if req.chunked:
        data = chunks(MIB + 1)
    elif data is not None and len(data) > 64 * 1024:
        data = io.BytesIO(data)  # aiohttp warns about large raw bytes; a file keeps Content-Length
    async with api.session.request(method, api.base + path, headers=headers, data=data) as resp:
        text = await resp.text()
        try:
            payload = json.loads(text)
        except ValueError:
            payload = text
        return resp.status, payload, resp.headers


def assert_envelope(status: int, payload: Any, where: str) -> None:
    assert status != 500, f"{where}: 500 {payload}"
    assert isinstance(payload, dict), f"{where}: not JSON: {payload!r}"
    assert set(payload) == {"error", "code"}, f"{where}: {payload}"
    assert isinstance(payload["error"], str) and payload["error"], where
    assert isinstance(payload["code"], str) and payload["code"], where


_ROUTES_SEEN: dict[tuple[str, str, str], bool] = {}


async def route_exists(api: Api, method: str, path: str) -> bool:
    """False only when the app answers 404 "no such route" (the route is not built yet)."""
    probe = (api.base, method, path)
    if probe not in _ROUTES_SEEN:
        status, payload, _ = await send(api, method, path, Request(key=None), {})
        _ROUTES_SEEN[probe] = not (
            status == 404 and isinstance(payload, dict) and payload.get("error") == NO_SUCH_ROUTE
        )
    return _ROUTES_SEEN[probe]


@pytest.fixture(scope="module")
async def keys(api: Api) -> dict[str, str]:
    """A live user key and a revoked one, by sentinel."""
    status, user = await api.call("POST", "/admin/keys", {"name": "user"})
    assert status == 201
    status, gone = await api.call("POST", "/admin/keys", {"name": "gone"})
    assert status == 201
    status, _ = await api.call("DELETE", f"/admin/keys/{gone['id']}")
    assert status == 200
    return {USER_KEY: user["key"], REVOKED_KEY: gone["key"]}


# -- authentication -----------------------------------------------------------------------------

AUTH_CASES: dict[str, tuple[Request, int, str]] = {
    "missing header": (Request(key=None), 401, "unauthorized"),
    "wrong scheme": (
        Request({"Authorization": f"Basic {ADMIN_KEY}"}, key=None),
        401,
        "unauthorized",
    ),
    "scheme only": (Request({"Authorization": "Key"}, key=None), 401, "unauthorized"),
    "empty key": (Request({"Authorization": "Key "}, key=None), 401, "unauthorized"),
    "empty x-api-key": (Request({"x-api-key": ""}, key=None), 401, "unauthorized"),
    "unknown key": (Request(key="mlcp_not-a-real-key"), 401, "unauthorized"),
    "300-char key": (Request(key="k" * 300), 401, "unauthorized"),
    "non-printable key": (Request(key="mlcp_abc\xa0def"), 401, "unauthorized"),
    "non-UTF-8 bytes": (Request(key="mlcp_\xff\xfe"), 401, "unauthorized"),
    "admin key with a suffix": (Request(key=ADMIN_KEY + "x"), 401, "unauthorized"),
    "admin key truncated": (Request(key=ADMIN_KEY[:-1]), 401, "unauthorized"),
    "revoked key": (Request(key=REVOKED_KEY), 401, "unauthorized"),
}

AUTH_TARGETS = [
    ("GET", "/model/list"),
    ("POST", "/model/list"),
    ("GET", "/admin/keys"),
    ("POST", "/admin/keys"),
    ("DELETE", "/admin/keys/1"),
    ("POST", "/model/job"),
    ("POST", "/model/load"),
]


@pytest.mark.parametrize("case", list(AUTH_CASES))
async def test_bad_credentials(api: Api, keys: dict[str, str], case: str) -> None:
    req, expected, code = AUTH_CASES[case]
    tried = 0
    for method, path in AUTH_TARGETS:
        if not await route_exists(api, method, path):
            continue
        tried += 1
        status, payload, headers = await send(api, method, path, req, keys)
        where = f"{case}: {method} {path}"
        assert_envelope(status, payload, where)
        assert (status, payload["code"]) == (expected, code), f"{where}: {payload}"
        assert headers["Content-Type"].startswith("application/json")
    assert tried >= 5


async def test_user_key_on_admin_routes_is_403(api: Api, keys: dict[str, str]) -> None:
    for method, path in [
        ("GET", "/admin/keys"),
        ("POST", "/admin/keys"),
        ("DELETE", "/admin/keys/1"),
    ]:
        status, payload, _ = await send(api, method, path, Request(key=USER_KEY), keys)
        assert_envelope(status, payload, path)
        assert (status, payload["code"]) == (403, "forbidden")


@pytest.mark.parametrize("header", [b"Key mlcp_abc\x7fdef", b"Key mlcp_abc\x01def", b"Key a\x00b"])
async def test_control_characters_in_headers_never_reach_the_app(api: Api, header: bytes) -> None:
    # aiohttp refuses to send these, so write the request by hand; uvicorn's parser answers 400
    # before the app runs (its plain-text body is not ours to shape), and never a 500.
    host, port = api.base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            b"GET /model/list HTTP/1.1\r\nHost: x\r\nAuthorization: "
            + header
            + b"\r\nConnection: close\r\n\r\n"
        )
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    status = int(answer.split(b" ", 2)[1])
    assert status in (400, 401), answer


# -- body shape ---------------------------------------------------------------------------------

BODY_TARGETS = ["/admin/keys", "/model/list", "/model/job", "/model/load"]
# Routes whose body may be left out entirely (all fields optional).
OPTIONAL_BODY = {"/admin/keys": 201, "/model/list": 200}

NESTED = "[" * 100_000 + "]" * 100_000

BODY_CASES: dict[str, tuple[Request, int, str | None]] = {
    "not JSON": (raw("hello"), 400, "invalid_json"),
    "truncated JSON": (raw('{"model": "a/b"'), 400, "invalid_json"),
    "NaN literal": (raw('{"model": NaN}'), 400, "invalid_json"),
    "Infinity literal": (raw('{"name": -Infinity}'), 400, "invalid_json"),
    "single quotes": (raw("{'model': 'a/b'}"), 400, "invalid_json"),
    "trailing comma": (raw('{"model": "a/b",}'), 400, "invalid_json"),
    "two documents": (raw('{"model": "a/b"} {}'), 400, "invalid_json"),
    "invalid UTF-8": (raw(b'{"name": "\xff\xfe"}'), 400, "invalid_json"),
    "deeply nested": (raw(NESTED), 400, "invalid_json"),
    "5000-digit number": (raw('{"model": 1' + "0" * 5000 + "}"), 400, "invalid_json"),
    "array instead of object": (raw("[]"), 422, "invalid_body"),
    "array of objects": (raw('[{"model": "a/b"}]'), 422, "invalid_body"),
    "string instead of object": (raw('"a/b"'), 422, "invalid_body"),
    "number instead of object": (raw("42"), 422, "invalid_body"),
    "null instead of object": (raw("null"), 422, "invalid_body"),
    "multipart/form-data": (
        raw(
            '--b\r\nContent-Disposition: form-data; name="model"\r\n\r\na/b\r\n--b--\r\n',
            "multipart/form-data; boundary=b",
        ),
        415,
        "unsupported_media_type",
    ),
    "application/xml": (
        raw("<model>a/b</model>", "application/xml"),
        415,
        "unsupported_media_type",
    ),
    "image/png": (raw(b"\x89PNG\r\n", "image/png"), 415, "unsupported_media_type"),
    "body over 1 MiB with Content-Length": (
        raw(b'{"name": "' + b"x" * (MIB + 1) + b'"}'),
        413,
        "payload_too_large",
    ),
    "body over 1 MiB, chunked": (
        Request({"Content-Type": "application/json"}, None, chunked=True),
        413,
        "payload_too_large",
    ),
}


@pytest.mark.parametrize("path", BODY_TARGETS)
@pytest.mark.parametrize("case", list(BODY_CASES))
async def test_bad_bodies(api: Api, path: str, case: str) -> None:
    if not await route_exists(api, "POST", path):
        pytest.skip(f"POST {path} does not exist yet")
    req, expected, code = BODY_CASES[case]
    status, payload, _ = await send(api, "POST", path, req, {})
    where = f"{case}: POST {path}"
    assert_envelope(status, payload, where)
    assert status == expected, f"{where}: {payload}"
    if code:
        assert payload["code"] == code, f"{where}: {payload}"


UNKNOWN_FIELDS = {
    "/admin/keys": {"name": "x", "secret": "mine"},
    "/model/list": {"bogus": 1},
    "/model/job": {"model": "acme/x", "bogus": 1},
    "/model/load": {"model": "acme/x", "bogus": 1},
}


@pytest.mark.parametrize("path", BODY_TARGETS)
async def test_unknown_fields_are_422(api: Api, path: str) -> None:
    if not await route_exists(api, "POST", path):
        pytest.skip(f"POST {path} does not exist yet")
    status, payload, _ = await send(api, "POST", path, json_request(UNKNOWN_FIELDS[path]), {})
    assert_envelope(status, payload, path)
    assert (status, payload["code"]) == (422, "unknown_field")
    assert "bogus" in payload["error"] or "secret" in payload["error"]


@pytest.mark.parametrize("path", BODY_TARGETS)
@pytest.mark.parametrize("how", ["no body", "whitespace"])
async def test_empty_bodies(api: Api, path: str, how: str) -> None:
    if not await route_exists(api, "POST", path):
        pytest.skip(f"POST {path} does not exist yet")
    req = Request() if how == "no body" else raw("  \n ")
    status, payload, _ = await send(api, "POST", path, req, {})
    if path in OPTIONAL_BODY:
        assert status == OPTIONAL_BODY[path], payload
    else:
        assert_envelope(status, payload, path)
        assert (status, payload["code"]) == (400, "invalid_json")


async def test_json_content_type_variants_are_accepted(api: Api) -> None:
    for content_type in [
        "application/json; charset=utf-8",
        "APPLICATION/JSON",
        "application/vnd.api+json",
        "text/plain",
        "application/x-www-form-urlencoded",
    ]:
        req = raw('{"name": "ct"}', content_type)
        status, payload, _ = await send(api, "POST", "/admin/keys", req, {})
        assert status == 201, (content_type, payload)


# -- model ids ----------------------------------------------------------------------------------

BAD_MODEL_IDS: dict[str, Any] = {
    "path traversal": "../etc/passwd",
    "dot-dot inside": "a/../b",
    "double dash": "org--x/y",
    "97 characters": "x/" + "y" * 95,
    "empty": "",
    "number": 42,
    "null": None,
    "list": ["a/b"],
    "object": {"org": "a", "name": "b"},
    "boolean": True,
    "unicode": "模型/名字",
    "spaces": "my org/my model",
    "absolute path": "/abs",
    "three parts": "a/b/c",
    "no slash": "gpt2",
    "hidden org": ".hidden/x",
    "trailing dash": "x/y-",
    "percent-encoded slash": "a%2Fb",
    "percent-encoded dots": "%2e%2e/etc",
    "backslash": "a\\b/c",
    "newline": "a/b\n",
    "NUL byte": "a/b\u0000",
    "home folder": "~/x",
    "lone surrogate": "\ud800/x",
}

MODEL_TARGETS = ["/model/job", "/model/load"]


@pytest.mark.parametrize("path", MODEL_TARGETS)
@pytest.mark.parametrize("case", [*BAD_MODEL_IDS, "missing"])
async def test_bad_model_ids(api: Api, path: str, case: str) -> None:
    if not await route_exists(api, "POST", path):
        pytest.skip(f"POST {path} does not exist yet")
    body = {} if case == "missing" else {"model": BAD_MODEL_IDS[case]}
    status, payload, _ = await send(api, "POST", path, json_request(body), {})
    where = f"{case}: POST {path}"
    assert_envelope(status, payload, where)
    # A lone surrogate is refused with the body, before the model id is looked at.
    codes = ("invalid_model", "invalid_unicode") if case == "lone surrogate" else ("invalid_model",)
    assert status == 422 and payload["code"] in codes, f"{where}: {payload}"
    # The refusal never echoes a path it might have touched.
    assert "/etc" not in payload["error"] and str(api.settings.data_dir) not in payload["error"]


@pytest.mark.parametrize("path", MODEL_TARGETS)
async def test_overflowing_number_as_model_id(api: Api, path: str) -> None:
    if not await route_exists(api, "POST", path):
        pytest.skip(f"POST {path} does not exist yet")
    # 1e999 is valid JSON that Python decodes to inf: a number, so not a model id.
    status, payload, _ = await send(api, "POST", path, raw('{"model": 1e999}'), {})
    assert_envelope(status, payload, path)
    assert (status, payload["code"]) == (422, "invalid_model")


async def test_bad_model_ids_touch_no_files(api: Api) -> None:
    for path in MODEL_TARGETS:
        if await route_exists(api, "POST", path):
            for value in BAD_MODEL_IDS.values():
                await send(api, "POST", path, json_request({"model": value}), {})
    store = api.settings.model_store
    made = sorted(p.name for p in store.rglob("*")) if store.exists() else []
    assert made == []


# -- routing ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/nope",
        "/model",
        "/model/",
        "/model/list/extra",
        "/admin",
        "/admin/keys/1/x",
        # Three segments: `/{owner}/{api}` (issue 11) makes a two-segment path a possible API,
        # which needs a key (401 without one) and is 404 not_found when it is none.
        "/%2e%2e/etc/passwd/x",
        "/model/%00",
    ],
)
async def test_unknown_routes_are_404_in_the_envelope(api: Api, path: str) -> None:
    for key in (ADMIN_KEY, None):
        status, payload, headers = await send(api, "GET", path, Request(key=key), {})
        assert_envelope(status, payload, path)
        assert (status, payload) == (404, {"error": NO_SUCH_ROUTE, "code": "not_found"})
        assert headers["Content-Type"].startswith("application/json")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("DELETE", "/model/list"),
        ("PUT", "/model/list"),
        ("PATCH", "/admin/keys"),
        ("DELETE", "/admin/keys"),
        ("GET", "/admin/keys/1"),
        ("POST", "/health"),
        ("POST", "/ready"),
        ("POST", "/openapi.json"),
        ("GET", "/model/load"),
        ("GET", "/model/job"),
    ],
)
async def test_wrong_methods_are_405_in_the_envelope(api: Api, method: str, path: str) -> None:
    if path in MODEL_TARGETS and not await route_exists(api, "POST", path):
        pytest.skip(f"{path} does not exist yet")
    status, payload, headers = await send(api, method, path, Request(), {})
    assert_envelope(status, payload, f"{method} {path}")
    assert (status, payload["code"]) == (405, "method_not_allowed")
    assert "Allow" in headers


# -- inputs a fault probe found answered 500 or a misleading 503 (issue 17, defect 3) -----------

PROBED_RUNS: dict[str, tuple[Request, int, str]] = {
    "role is an object": (
        json_request({"model": "org/name", "prompt": [{"role": {}, "content": "x"}]}),
        422,
        "invalid_prompt",
    ),
    "role is a list": (
        json_request({"model": "org/name", "prompt": [{"role": [1], "content": "x"}]}),
        422,
        "invalid_prompt",
    ),
    "lone surrogate prompt": (
        raw('{"model": "org/name", "prompt": "\\ud800"}'),
        422,
        "invalid_unicode",
    ),
    "lone surrogate in a message": (
        raw('{"model": "org/name", "prompt": [{"role": "user", "content": "a\\udfffb"}]}'),
        422,
        "invalid_unicode",
    ),
    "surrogate bytes in UTF-8": (
        raw(b'{"model": "org/name", "prompt": "\xed\xa0\x80"}'),
        400,
        "invalid_json",
    ),
    "Prefer: wait with 5,000 digits": (
        Request(
            {"Content-Type": "application/json", "Prefer": "wait=" + "9" * 5000},
            json.dumps({"model": "org/nothing-loaded", "prompt": "x"}).encode(),
        ),
        404,
        "model_not_found",
    ),
}


@pytest.mark.parametrize("case", list(PROBED_RUNS))
async def test_probed_run_inputs(api: Api, keys: dict[str, str], case: str) -> None:
    req, want_status, want_code = PROBED_RUNS[case]
    status, payload, headers = await send(api, "POST", "/model/run", req, keys)
    assert_envelope(status, payload, case)
    assert (status, payload["code"]) == (want_status, want_code), (case, payload)
    assert "Retry-After" not in headers, case


async def test_valid_surrogate_pair_is_text(api: Api, keys: dict[str, str]) -> None:
    # "\ud83d\ude00" is one emoji, escaped: it must pass the surrogate check.
    req = raw('{"model": "org/nothing-loaded", "prompt": "\\ud83d\\ude00"}')
    status, payload, _ = await send(api, "POST", "/model/run", req, keys)
    assert_envelope(status, payload, "pair")
    assert payload["code"] != "invalid_unicode", payload


@pytest.mark.parametrize("tail", ["9" * 5000, "0" * 5000 + "1", "10000000000"])
async def test_logs_tail_with_many_digits_is_422(api: Api, keys: dict[str, str], tail: str) -> None:
    status, payload, _ = await send(
        api, "GET", f"/model/logs?model=org/name&tail={tail}", Request(), keys
    )
    assert_envelope(status, payload, "tail")
    assert (status, payload["code"]) == (422, "invalid_field"), payload
