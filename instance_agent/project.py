"""A handler project's spec: `mlcp.yaml` (or Cortex's one-element YAML list), read and checked.

Pure: reads text, never imports the user's code. The agent reads it to find the handler it
serves; the control plane reads it at deploy to refuse a bad project before storing anything.

    name: sentiment-analyser          # lowercase letters, digits and '-', 1-63 characters
    kind: RealtimeAPI
    handler: {type: python, path: src/main.py, config: {...}}
    #   handler.protobuf_path: handler.proto  -> served over gRPC (Cortex's gRPC form)
    compute: {cpu: 1, gpu: 0, mem: 2G}
    concurrency: 1                     # handler calls served at once (worker threads)
    expirationPeriodSeconds: 600       # idle time before the instance is stopped
    example: "so simple and quick!"    # the payload the benchmark calls the handler with
    public: false                      # true: other users may call it too
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import yaml

from instance_agent.protocol import ProtocolError

SPEC_FILE = "mlcp.yaml"
SPEC_MAX_BYTES = 65_536
MAX_HANDLER_CONCURRENCY = 64
DEFAULT_EXPIRATION_S = 600
API_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
# Names that would shadow a control-plane route when used as `POST /{name}`.
RESERVED_NAMES = frozenset(
    {
        "admin",
        "apis",
        "async",
        "capacity",
        "chat",
        "dashboard",
        "docs",
        "events",
        "health",
        "instances",
        "jobs",
        "keys",
        "logs",
        "metrics",
        "model",
        "models",
        "openapi.json",
        "ready",
        "static",
        "uploads",
        "v1",
    }
)
_KNOWN_KEYS = frozenset(
    {
        "name",
        "kind",
        "handler",
        "compute",
        "concurrency",
        "expirationPeriodSeconds",
        "example",
        "public",
        "protobuf_path",
        "networking",
        "autoscaling",
        "pod",
    }
)


class InvalidSpec(ProtocolError):
    """The project spec is invalid."""

    code = "invalid_spec"


@dataclass(frozen=True)
class ProjectSpec:
    """A checked project spec."""

    name: str
    handler_path: str
    handler_config: dict[str, Any] = field(default_factory=dict)
    compute: dict[str, Any] = field(default_factory=dict)
    concurrency: int = 1
    expiration_s: int = DEFAULT_EXPIRATION_S
    example: Any = None
    public: bool = False
    # The project's .proto (relative), when its handler is served over gRPC.
    protobuf_path: str | None = None


def check_name(name: object) -> str:
    """Return a valid, unreserved API name or raise `InvalidSpec`."""
    if isinstance(name, str) and name in RESERVED_NAMES:
        raise InvalidSpec(f"name {name!r} is reserved: it would shadow a route of mlcp")
    if not isinstance(name, str) or not API_NAME.match(name):
        raise InvalidSpec(
            "name must be 1-63 lowercase letters, digits or '-', starting and ending with a "
            "letter or digit"
        )
    return name


def check_handler_path(path: object) -> str:
    """Return a relative `.py` path inside the project or raise `InvalidSpec`."""
    if not isinstance(path, str) or not path.endswith(".py") or "\\" in path or "\0" in path:
        raise InvalidSpec("handler.path must be the relative path of a .py file")
    pure = PurePosixPath(path)
    if pure.is_absolute() or ".." in pure.parts:
        raise InvalidSpec("handler.path must stay inside the project (no '..', not absolute)")
    return str(pure)


def check_protobuf_path(path: object) -> str:
    """Return a relative `.proto` path inside the project or raise `InvalidSpec`."""
    if not isinstance(path, str) or not path.endswith(".proto") or "\\" in path or "\0" in path:
        raise InvalidSpec("handler.protobuf_path must be the relative path of a .proto file")
    pure = PurePosixPath(path)
    if pure.is_absolute() or ".." in pure.parts:
        raise InvalidSpec(
            "handler.protobuf_path must stay inside the project (no '..', not absolute)"
        )
    return str(pure)


def _int_in(body: dict[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidSpec(f"{key} must be an integer from {low} to {high}")
    return value


def parse_spec(text: str) -> ProjectSpec:
    """Parse and check a spec's YAML text; raise `InvalidSpec` with the reason."""
    if len(text.encode()) > SPEC_MAX_BYTES:
        raise InvalidSpec("the spec is larger than 64 KiB")
    try:
        body: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InvalidSpec(f"the spec is not valid YAML: {' '.join(str(exc).split())}") from exc
    if isinstance(body, list):
        # Cortex's form: a list of APIs; a project deploys exactly one.
        if len(body) != 1:
            raise InvalidSpec("a spec list must hold exactly one API")
        body = body[0]
    if not isinstance(body, dict):
        raise InvalidSpec("the spec must be a mapping (or a one-element list of one)")
    unknown = sorted(str(key) for key in body if key not in _KNOWN_KEYS)
    if unknown:
        raise InvalidSpec(f"unknown spec keys: {', '.join(unknown)}")
    name = check_name(body.get("name"))
    kind = body.get("kind", "RealtimeAPI")
    if kind != "RealtimeAPI":
        raise InvalidSpec(f"kind {kind!r} is not supported: use RealtimeAPI")
    handler = body.get("handler")
    if not isinstance(handler, dict):
        raise InvalidSpec("handler must be a mapping with type and path")
    if handler.get("type", "python") != "python":
        raise InvalidSpec("handler.type must be python")
    config = handler.get("config", {})
    if not isinstance(config, dict):
        raise InvalidSpec("handler.config must be a mapping")
    compute = body.get("compute", {})
    if not isinstance(compute, dict):
        raise InvalidSpec("compute must be a mapping")
    # Cortex writes handler.protobuf_path; a top-level protobuf_path is taken the same way.
    proto = handler.get("protobuf_path", body.get("protobuf_path"))
    public = body.get("public", False)
    if not isinstance(public, bool):
        raise InvalidSpec("public must be true or false")
    return ProjectSpec(
        name=name,
        handler_path=check_handler_path(handler.get("path")),
        handler_config=config,
        compute=compute,
        concurrency=_int_in(body, "concurrency", 1, 1, MAX_HANDLER_CONCURRENCY),
        expiration_s=_int_in(body, "expirationPeriodSeconds", DEFAULT_EXPIRATION_S, 1, 86_400),
        example=body.get("example"),
        public=public,
        protobuf_path=None if proto is None else check_protobuf_path(proto),
    )
