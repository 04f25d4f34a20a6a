"""/v1/input: ask for a signed upload URL, then PUT a file to it (control_plane/uploads.py)."""

from __future__ import annotations

from datetime import UTC, datetime

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from control_plane import uploads
from control_plane.auth import Principal
from control_plane.handlers import authed, json_body
from control_plane.schemas import iso, reject_unknown, require_object
from control_plane.state import AppState, state_of


@authed("user")
async def create(request: Request, state: AppState, principal: Principal) -> Response:
    """A new upload slot of this key: 201 with the signed URL to PUT the file to."""
    extension = uploads.check_extension(request.query_params.get("extension"))
    reject_unknown(require_object(await json_body(request, state, empty={})), frozenset())
    row = await uploads.create(state, principal.key_id, extension)
    url = uploads.upload_url(str(request.base_url), state.upload_secret, row)
    return JSONResponse(
        {
            "uploadUrl": {"PUT": url},
            "id": str(row.id),
            "expiresAt": iso(row.expires_at),
            "maxBytes": state.settings.max_upload_bytes,
        },
        status_code=201,
    )


async def put(request: Request) -> Response:
    """`PUT <signed url>`: the file's bytes; the signature in the URL is the credential."""
    state = state_of(request)
    ref = uploads.parse_ref(request.path_params["id"], _query(request))
    row = await uploads.receive(state, request, ref, datetime.now(UTC))
    return JSONResponse({"id": str(row.id), "size_bytes": row.size_bytes, "status": row.state})


def _query(request: Request) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, value in request.query_params.multi_items():
        out.setdefault(name, []).append(value)
    return out


routes = [
    Route("/v1/input/upload-url", create, methods=["POST"]),
    Route("/v1/input/uploads/{id}", put, methods=["PUT"]),
]
