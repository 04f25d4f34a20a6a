"""The OpenAPI entries of deployed handler APIs (/apis and the two call shapes), merged into
openapi.py's: deploy (PUT /apis/{name}), weights blobs, status, delete, and calling an API."""

from __future__ import annotations

from typing import Any

from control_plane.openapi import _TS, Operation

# An API's name (instance_agent/project.py): lowercase letters, digits and '-', 1-63.
_NAME_SCHEMA = {"type": "string", "pattern": "^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$"}
_OWNER_SCHEMA = {"type": "string", "pattern": "^[A-Za-z0-9_]+(?:[.-][A-Za-z0-9_]+)*$"}
_NAME = {"name": "name", "in": "path", "required": True, "schema": _NAME_SCHEMA}
_OWNER = {"name": "owner", "in": "path", "required": True, "schema": _OWNER_SCHEMA}
_API = {"name": "api", "in": "path", "required": True, "schema": _NAME_SCHEMA}
_SHA256 = {
    "name": "sha256",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
}
_SPEC = {
    "name": "spec",
    "in": "query",
    "required": False,
    "schema": {"type": "string", "pattern": r"^[A-Za-z0-9_.-]{1,100}\.ya?ml$"},
}
_REF = {"$ref": "#/components/schemas/Api"}
_ERRORS = (400, 401, 404, 413, 415, 422)

SCHEMAS: dict[str, dict[str, Any]] = {
    "ProjectArchive": {"type": "string", "format": "binary"},
    "Blob": {"type": "string", "format": "binary"},
    "Payload": {"description": "any JSON value: the handler's input"},
    "Api": {
        "type": "object",
        "required": ["name", "owner", "model", "version", "status"],
        "properties": {
            "name": {"type": "string"},
            "owner": {"type": "string"},
            "model": {"type": "string", "description": "its catalog model, owner/name"},
            "version": {"type": "integer"},
            "status": {"enum": ["building", "benchmarking", "available", "failed"]},
            "reason": {"type": ["string", "null"]},
            "public": {"type": "boolean"},
            "createdAt": _TS,
            "updatedAt": _TS,
            "instance": {"type": ["object", "null"], "description": "as /model/status"},
            "instances": {
                "type": "array",
                "items": {"type": "object"},
                "description": "every live instance as /model/status, with the apiVersion it "
                "runs (two while a redeploy rolls over)",
            },
        },
    },
}

OPERATIONS: list[Operation] = [
    Operation(
        "put",
        "/apis/{name}",
        "Deploy a project (tar.gz of its code and .mlcp-weights.json): a new version, built "
        "and benchmarked in the background",
        "user",
        body="ProjectArchive",
        # application/gzip is accepted as well (what `mlcp deploy` sends).
        body_media="application/octet-stream",
        response={"type": "object"},
        ok_status=202,
        errors=(*_ERRORS, 409, 429),
        parameters=(_NAME, _SPEC),
    ),
    Operation(
        "get",
        "/apis",
        "The caller's APIs (an admin key: every API)",
        "user",
        response={"type": "array", "items": _REF},
        errors=(400, 401),
    ),
    Operation(
        "get",
        "/apis/{name}",
        "One of the caller's APIs: its version's status, why it failed, its instance",
        "user",
        response=_REF,
        errors=(400, 401, 404),
        parameters=(_NAME,),
    ),
    Operation(
        "delete",
        "/apis/{name}",
        "Delete one of the caller's APIs: its instance stops, its files go",
        "user",
        response={"type": "object"},
        errors=(400, 401, 404),
        parameters=(_NAME,),
    ),
    Operation(
        "get",
        "/apis/{owner}/{name}",
        "Another owner's API (admin keys; a user key sees its own only)",
        "user",
        response=_REF,
        errors=(400, 401, 404),
        parameters=(_OWNER, _NAME),
    ),
    Operation(
        "delete",
        "/apis/{owner}/{name}",
        "Delete another owner's API (admin keys)",
        "user",
        response={"type": "object"},
        errors=(400, 401, 404),
        parameters=(_OWNER, _NAME),
    ),
    Operation(
        "head",
        "/apis/blobs/{sha256}",
        "Whether a weights file with this SHA-256 is stored (200) or not (404)",
        "user",
        errors=(401, 404),
        parameters=(_SHA256,),
    ),
    Operation(
        "put",
        "/apis/blobs/{sha256}",
        "Store a weights file, its hash checked while it streams in",
        "user",
        body="Blob",
        body_media="application/octet-stream",
        response={"type": "object"},
        ok_status=201,
        errors=(*_ERRORS, 409),
        parameters=(_SHA256,),
    ),
    Operation(
        "post",
        "/{api}",
        "Call one of the caller's APIs (Cortex): the handler's return value as JSON",
        "user",
        body="Payload",
        response={},
        errors=(*_ERRORS, 409, 429, 502, 503, 504),
        parameters=(_API,),
    ),
    Operation(
        "get",
        "/{owner}/{api}",
        "Load an API and answer its status (CellStrat)",
        "user",
        response={"type": "object"},
        errors=(400, 401, 404, 409, 429, 503),
        parameters=(_OWNER, _API),
    ),
    Operation(
        "post",
        "/{owner}/{api}",
        'Call an API (CellStrat): {"statusCode": 200, "body": {"output": ...}}',
        "user",
        body="Payload",
        response={"type": "object"},
        errors=(*_ERRORS, 409, 429, 502, 503, 504),
        parameters=(_OWNER, _API),
    ),
]
