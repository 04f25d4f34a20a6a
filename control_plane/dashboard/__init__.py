"""The admin dashboard: server-rendered pages (Jinja2, autoescaped) behind a signed session cookie.

Sign-in takes an admin key once and sets an HttpOnly, SameSite=Strict cookie holding only the
key id, an expiry and a CSRF token, signed (control_plane/sessions.py). Every action is
a POST carrying that CSRF token; every answer carries a CSP that allows only this origin's own
script and styles. The page's script counts expiries down and refreshes the instance list when
`/events` (which accepts the session cookie) announces a transition.
"""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import jinja2
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from control_plane.auth import Principal
from control_plane.errors import Forbidden, MlcpError, Unauthorized
from control_plane.lifecycle import State
from control_plane.limits import effective, month_of, render_month
from control_plane.routes.capacity import device_report
from control_plane.schemas import render_status
from control_plane.sessions import COOKIE, SESSION_S, Session, csrf_ok
from control_plane.state import AppState, state_of
from db import queries

_HERE = Path(__file__).resolve().parent
_ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(_HERE / "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
)
# Only these files are served; a request path never names a file.
_STATIC = {
    "app.js": ("application/javascript; charset=utf-8", (_HERE / "static" / "app.js")),
    "app.css": ("text/css; charset=utf-8", (_HERE / "static" / "app.css")),
}
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
MAX_FORM_BYTES = 4096


def _bytes(n: int | None) -> str:
    if not n:
        return "-"
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.0f} MB"


def _page(
    name: str, status_code: int = 200, *, clear_cookie: bool = False, **context: Any
) -> HTMLResponse:
    context.setdefault("session", None)
    context.setdefault("message", None)
    context.setdefault("title", name.removesuffix(".html"))
    resp = HTMLResponse(
        _ENV.get_template(name).render(**context), status_code, headers=SECURITY_HEADERS
    )
    if clear_cookie:
        resp.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
    return resp


async def session_principal(request: Request, state: AppState) -> tuple[Principal, Session] | None:
    """The admin a valid session cookie stands for (the key must still be active), or None."""
    session = state.signer.verify(request.cookies.get(COOKIE))
    if session is None:
        return None
    row = await queries.get_active_key(state.pool, session.key_id)
    if row is None or row.scope != "admin":
        return None
    return Principal(row.id, row.name, row.scope, row.limits), session


async def _signed_in(request: Request) -> tuple[AppState, Session] | HTMLResponse:
    state = state_of(request)
    found = await session_principal(request, state)
    if found is None:
        stale = COOKIE in request.cookies
        message = "Your session has expired; sign in again." if stale else None
        return _page("login.html", 401 if stale else 200, clear_cookie=stale, message=message)
    return state, found[1]


async def _form(request: Request) -> dict[str, str]:
    """A small urlencoded form; anything else is refused with a clear page, never a 500."""
    if request.headers.get("content-type", "").split(";")[0].strip() != (
        "application/x-www-form-urlencoded"
    ):
        raise _FormError(415, "Send the form as application/x-www-form-urlencoded.")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise _FormError(413, "The form is too large.")
    try:
        fields = parse_qs(body.decode("utf-8"), max_num_fields=10, strict_parsing=False)
    except (UnicodeDecodeError, ValueError) as exc:
        raise _FormError(400, "The form could not be read.") from exc
    return {k: v[0] for k, v in fields.items() if v}


class _FormError(Exception):
    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message


async def _action(request: Request) -> tuple[AppState, Session, dict[str, str]] | HTMLResponse:
    """A POST from a signed-in page: session and CSRF token checked before anything happens."""
    got = await _signed_in(request)
    if isinstance(got, HTMLResponse):
        return got
    state, session = got
    try:
        form = await _form(request)
    except _FormError as exc:
        return _page("login.html", exc.status_code, session=session, message=exc.message)
    if not csrf_ok(session, form.get("csrf")):
        return _page("login.html", 403, session=session, message="Invalid or missing CSRF token.")
    return state, session, form


async def login(request: Request) -> Response:
    state = state_of(request)
    try:
        form = await _form(request)
    except _FormError as exc:
        return _page("login.html", exc.status_code, message=exc.message)
    key = form.get("key", "").strip()
    try:
        principal = await state.auth.authenticate(Headers({"authorization": f"Key {key}"}), "admin")
    except Unauthorized:
        return _page("login.html", 401, message="That key is not valid.")
    except Forbidden:
        return _page("login.html", 403, message="The dashboard needs an admin key.")
    cookie, _ = state.signer.issue(principal.key_id)
    resp = RedirectResponse("/dashboard", status_code=303, headers=SECURITY_HEADERS)
    resp.set_cookie(
        COOKIE,
        cookie,
        max_age=SESSION_S,
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return resp


async def logout(request: Request) -> Response:
    got = await _action(request)
    if isinstance(got, HTMLResponse):
        return got
    resp = RedirectResponse("/dashboard", status_code=303, headers=SECURITY_HEADERS)
    resp.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
    return resp


async def _instance_rows(state: AppState) -> list[dict[str, Any]]:
    await state.activity.flush(state.pool)
    # The countdown by the clock the expiry is judged by (the database's), not this host's.
    now = await queries.database_now(state.pool)
    out = []
    for row in await queries.live_instances(state.pool):
        status = render_status(row, pending_inferences=state.activity.pending(row.id))
        expires = status["expiresAt"]
        left = None
        if expires:
            at = datetime.fromisoformat(expires.replace("Z", "+00:00"))
            left = max(0, round((at - now).total_seconds()))
        out.append(
            {
                "model": row.model,
                "status": row.state,
                "device": row.device,
                "reserved": row.reserved_bytes,
                "observed": row.observed_mem_bytes,
                "reserved_text": _bytes(row.reserved_bytes),
                "observed_text": _bytes(row.observed_mem_bytes),
                "in_flight": state.activity.in_flight(row.id),
                "queued": state.supervisor.queued.get(row.id, 0)
                if row.state == State.RUNNING
                else 0,
                "concurrency": row.concurrency,
                "expires": expires,
                "left": left,
            }
        )
    return out


async def instances_page(request: Request) -> Response:
    got = await _signed_in(request)
    if isinstance(got, HTMLResponse):
        return got
    state, session = got
    rows = await _instance_rows(state)
    return _page(
        "instances.html", session=session, csrf=session.csrf, instances=rows, title="Instances"
    )


async def instances_fragment(request: Request) -> Response:
    got = await _signed_in(request)
    if isinstance(got, HTMLResponse):
        return Response(status_code=401, headers=SECURITY_HEADERS)
    state, session = got
    html = _ENV.get_template("instance_rows.html").render(
        instances=await _instance_rows(state), csrf=session.csrf
    )
    return HTMLResponse(html, headers=SECURITY_HEADERS)


async def stop(request: Request) -> Response:
    got = await _action(request)
    if isinstance(got, HTMLResponse):
        return got
    state, session, form = got
    model = form.get("model", "")
    row = await queries.latest_instance_for_model(state.pool, model) if model else None
    if row is None or row.state not in (State.STARTING, State.RUNNING):
        rows = await _instance_rows(state)
        return _page(
            "instances.html",
            404,
            session=session,
            csrf=session.csrf,
            instances=rows,
            message=f"{model or 'That model'} has no live instance.",
        )
    try:
        await state.supervisor.delete(row)
    except MlcpError as exc:
        rows = await _instance_rows(state)
        return _page(
            "instances.html",
            exc.status_code,
            session=session,
            csrf=session.csrf,
            instances=rows,
            message=exc.message,
        )
    return RedirectResponse("/dashboard", status_code=303, headers=SECURITY_HEADERS)


async def models_page(request: Request) -> Response:
    got = await _signed_in(request)
    if isinstance(got, HTMLResponse):
        return got
    state, session = got
    models = []
    for m in await queries.list_models(state.pool):
        job = await queries.latest_model_job(
            state.pool, m.name, ["queued", "benchmarking", "available", "failed"]
        )
        models.append(
            {
                "name": m.name,
                "task": m.task,
                "ram": _bytes(m.required_ram_bytes),
                "benchmarked": m.required_ram_bytes is not None,
                "job": job.state if job else None,
                "reason": job.reason if job and job.state == "failed" else None,
            }
        )
    return _page("models.html", session=session, models=models, title="Models and jobs")


async def capacity_page(request: Request) -> Response:
    got = await _signed_in(request)
    if isinstance(got, HTMLResponse):
        return got
    state, session = got
    devices = await device_report(state)
    for d in devices:
        d["reserved_text"] = _bytes(d["reservedBytes"])
        d["usable_text"] = _bytes(d["usableBytes"])
        d["available_text"] = _bytes(d["availableBytes"])
        d["free_text"] = _bytes(d["observedFreeBytes"])
    return _page("capacity.html", session=session, devices=devices, title="Capacity")


async def keys_page(request: Request) -> Response:
    got = await _signed_in(request)
    if isinstance(got, HTMLResponse):
        return got
    state, session = got
    keys = await queries.list_keys(state.pool)
    wall = time.time()
    month = month_of(wall)
    # This node's served calls are written first; the others' within a second.
    await state.limiter.flush()
    calls = {u.key_id: u.calls for u in await queries.usage_for_month(state.pool, month, None)}
    rows = [
        {
            "key": k,
            "calls": calls.get(k.id, 0),
            "limits": effective(k.limits, k.scope, state.limiter.defaults),
        }
        for k in keys
    ]
    return _page("keys.html", session=session, rows=rows, month=render_month(month), title="Keys")


async def static(request: Request) -> Response:
    entry = _STATIC.get(request.path_params["name"])
    if entry is None:
        return Response("not found", 404, media_type="text/plain", headers=SECURITY_HEADERS)
    media_type, path = entry
    headers = {**SECURITY_HEADERS, "Cache-Control": "max-age=300"}
    return Response(path.read_bytes(), media_type=media_type, headers=headers)


routes = [
    Route("/dashboard", instances_page, methods=["GET"], include_in_schema=False),
    Route("/dashboard/login", login, methods=["POST"], include_in_schema=False),
    Route("/dashboard/logout", logout, methods=["POST"], include_in_schema=False),
    Route("/dashboard/stop", stop, methods=["POST"], include_in_schema=False),
    Route("/dashboard/models", models_page, methods=["GET"], include_in_schema=False),
    Route("/dashboard/capacity", capacity_page, methods=["GET"], include_in_schema=False),
    Route("/dashboard/keys", keys_page, methods=["GET"], include_in_schema=False),
    Route(
        "/dashboard/fragment/instances",
        instances_fragment,
        methods=["GET"],
        include_in_schema=False,
    ),
    Route("/dashboard/static/{name}", static, methods=["GET"], include_in_schema=False),
]
