"""/apis: weight blobs, deploying a project, listing, reading and deleting APIs.

Deploys themselves are control_plane/deploys.py.

An API belongs to the calling key's name; another owner's API is 404 `api_not_found`, as if it
did not exist, except to admins (`/apis/{owner}/{name}`).
"""

from __future__ import annotations

from typing import Any

import anyio.to_thread
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from control_plane import api_bundle as bundle
from control_plane import deploys, grpc_services
from control_plane.auth import Principal
from control_plane.errors import ApiLimit, ApiNotFound, InvalidField
from control_plane.grpc_services import ProjectCompiler, ServiceTable
from control_plane.handlers import authed
from control_plane.limits import rate_headers
from control_plane.schemas import iso, render_status
from control_plane.state import AppState
from db import api_queries as aq
from db import queries
from db.rows import ApiRow, InstanceRow


def _sha256(request: Request) -> str:
    digest = str(request.path_params["sha256"])
    if not bundle.SHA256.match(digest):
        raise InvalidField("the blob's name must be its SHA-256 in lowercase hex (64 characters)")
    return digest


@authed("user")
async def head_blob(request: Request, state: AppState, principal: Principal) -> Response:
    """200 when the blob is stored (its bytes need not be sent again), else 404."""
    digest = _sha256(request)
    root = bundle.apis_root(state.settings.data_dir)
    size = await aq.use_api_blob(state.pool, digest)
    if size is None or not bundle.blob_path(root, digest).is_file():
        return Response(status_code=404)
    return Response(status_code=200, headers={"Content-Length": str(size)})


@authed("user")
async def put_blob(request: Request, state: AppState, principal: Principal) -> Response:
    """Store a weight file by its SHA-256, verified while it streams in."""
    digest = _sha256(request)
    cap = state.settings.max_project_bytes
    bundle.check_declared_length(request.headers.get("content-length"), cap, "a weight file")
    root = bundle.apis_root(state.settings.data_dir)
    part = bundle.incoming(root)
    try:
        received = await bundle.receive(request.stream(), part, cap, "a weight file")
        await anyio.to_thread.run_sync(bundle.store_blob, root, received, digest)
    finally:
        await anyio.to_thread.run_sync(bundle.remove, part)
    first = await aq.insert_api_blob(state.pool, digest, received.size)
    return JSONResponse(
        {"sha256": digest, "size": received.size}, status_code=201 if first else 200
    )


async def render_api(state: AppState, row: ApiRow) -> dict[str, Any]:
    """An API as `GET /apis/{name}` answers it: its latest instance (or null), and every live
    one with the version it runs (two while a redeploy rolls over)."""
    instance = await queries.latest_instance_for_model(state.pool, row.model)
    live = await queries.live_instances_for_model(state.pool, row.model)
    return {
        "name": row.name,
        "owner": row.owner,
        "model": row.model,
        "version": row.version,
        "status": row.status,
        "reason": row.reason,
        "public": row.public,
        "createdAt": iso(row.created_at),
        "updatedAt": iso(row.updated_at),
        "instance": None if instance is None else _instance(state, instance),
        "instances": [_instance(state, r) for r in live],
    }


def _instance(state: AppState, row: InstanceRow) -> dict[str, Any]:
    return {
        **render_status(
            row,
            pending_inferences=state.activity.pending(row.id),
            in_flight=state.activity.in_flight(row.id),
        ),
        "apiVersion": row.api_version,
    }


# An API limit lasts until the owner deletes one: a retry hint only.
API_LIMIT_RETRY_S = 60


async def _check_api_limit(state: AppState, principal: Principal, name: str) -> None:
    """Refuse a key's new API beyond its maxApis, before the upload is read (a redeploy of one of
    its APIs is a new version, not a new API). Two first deploys at one moment may both pass."""
    most = state.limiter.limits_of(principal).max_apis
    if most and await queries.count_owned_apis(state.pool, principal.name, name) >= most:
        raise ApiLimit(
            f"this key may own {most:,} APIs; delete one first (DELETE /apis/{{name}})",
            retry_after_s=API_LIMIT_RETRY_S,
            rate_limit=rate_headers(most, 0, API_LIMIT_RETRY_S),
        )


@authed("user")
async def deploy(request: Request, state: AppState, principal: Principal) -> Response:
    """`PUT /apis/{name}` with the project's tar.gz: stored, then built and benchmarked."""
    name = deploys.check_api_name(str(request.path_params["name"]))
    owner = principal.name
    deploys.model_of(owner, name)  # refuse a key name that cannot own an API before the upload
    await _check_api_limit(state, principal, name)
    spec_name = request.query_params.get("spec")
    staged = await deploys.stage(state, request, name, spec_name)
    if staged.spec.protobuf_path is not None:
        try:
            await grpc_services.check_deploy(
                state.grpc.compiler if state.grpc is not None else ProjectCompiler(),
                state.grpc.table if state.grpc is not None else ServiceTable(),
                deploys.model_of(owner, name),
                staged.folder,
                owner,
            )
        except BaseException:
            await anyio.to_thread.run_sync(bundle.remove, staged.folder)
            raise
    row = await deploys.store(state, owner, staged)
    state.deploys.start(state, row)
    return JSONResponse(
        {
            "name": row.name,
            "owner": row.owner,
            "model": row.model,
            "version": row.version,
            "status": row.status,
        },
        status_code=202,
    )


@authed("user")
async def list_apis(request: Request, state: AppState, principal: Principal) -> Response:
    """The caller's APIs (an admin's: everyone's)."""
    await state.activity.flush(state.pool)
    rows = await aq.list_apis(state.pool, None if principal.is_admin else principal.name)
    return JSONResponse([await render_api(state, r) for r in rows])


async def _own(state: AppState, principal: Principal, owner: str, name: str) -> ApiRow:
    row = await aq.get_api(state.pool, owner, name)
    if (
        row is None
        or row.status == "deleted"
        or not (principal.is_admin or principal.name == owner)
    ):
        raise ApiNotFound(f"no API {name}" if owner == principal.name else f"no API {owner}/{name}")
    return row


def _target(request: Request, principal: Principal) -> tuple[str, str]:
    params = request.path_params
    return str(params.get("owner", principal.name)), str(params["name"])


@authed("user")
async def get_api(request: Request, state: AppState, principal: Principal) -> Response:
    """One API: its current version's status (and why it failed) and its instance."""
    await state.activity.flush(state.pool)
    row = await _own(state, principal, *_target(request, principal))
    return JSONResponse(await render_api(state, row))


@authed("user")
async def delete_api(request: Request, state: AppState, principal: Principal) -> Response:
    """Stop the API's instance, take it out of the catalog and remove its files."""
    owner, name = _target(request, principal)
    row = await _own(state, principal, owner, name)
    # Two while it rolls over to a new version: both stop.
    for live in await queries.live_instances_for_model(state.pool, row.model):
        await state.supervisor.delete(live)
    await aq.delete_api(state.pool, row.owner, row.name)
    state.api_cache.pop((row.owner, row.name), None)
    root = bundle.apis_root(state.settings.data_dir)
    await anyio.to_thread.run_sync(bundle.remove, root / "versions" / row.owner / row.name)
    return JSONResponse({"name": row.name, "status": "deleted"})


routes = [
    Route("/apis", list_apis, methods=["GET"]),
    Route("/apis/blobs/{sha256}", put_blob, methods=["PUT"]),
    Route("/apis/blobs/{sha256}", head_blob, methods=["HEAD"]),
    Route("/apis/{name}", deploy, methods=["PUT"]),
    Route("/apis/{name}", get_api, methods=["GET"]),
    Route("/apis/{name}", delete_api, methods=["DELETE"]),
    Route("/apis/{owner}/{name}", get_api, methods=["GET"]),
    Route("/apis/{owner}/{name}", delete_api, methods=["DELETE"]),
]
