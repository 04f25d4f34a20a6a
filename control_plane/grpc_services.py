"""Which API serves each gRPC `package.Service`: compiled from the projects' own `.proto` files.

A handler project in the catalog (a folder with `mlcp.yaml` under `MLCP_MODEL_DIRS`) whose spec
names `handler.protobuf_path` has its proto compiled here with grpcio-tools, exactly as its agent
will compile it (`instance_agent.proto`; a child process, never the user's Python code). The
services it defines become entries of the `ServiceTable` the gRPC front routes by. Two APIs may
not serve one `package.Service`: the first by model name keeps it and the other is refused, its
reason logged and kept for `refused`. Compiling is cached by the proto's content, so a catalog
refresh of unchanged projects costs a file read each.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from control_plane.auth import Principal
from control_plane.errors import GrpcServiceTaken, InvalidProjectSpec
from instance_agent.proto import ProtoInvalid, compile_proto
from instance_agent.protocol import LoadFailed
from instance_agent.user_code import read_project_spec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedService:
    """One `package.Service` and the API (catalog model) that serves it."""

    service: str
    model: str
    # Full method path ("/pkg.Service/Method") -> whether the RPC streams its replies.
    methods: dict[str, bool]
    descriptor_set: bytes
    concurrency: int = 1
    # The spec's expirationPeriodSeconds: idle time before a cold-loaded instance stops.
    expiration_s: int = 600
    # None: a project of MLCP_MODEL_DIRS, every key may call it; else the deployed API's owner
    # (a key's name) and admins only, unless its spec says public.
    owner: str | None = None
    public: bool = False


def may_call(entry: ServedService, principal: Principal) -> bool:
    """Whether `principal` may call the API: another owner's private API does not exist to it."""
    return (
        entry.owner is None or entry.public or principal.is_admin or entry.owner == principal.name
    )


def assign(candidates: Iterable[ServedService]) -> tuple[dict[str, ServedService], list[str]]:
    """The table (service -> entry) and the refusals: a service two APIs define goes to the
    first by model name, and every service of the later API is refused with it (an API is
    served whole or not at all)."""
    by_model: dict[str, list[ServedService]] = {}
    for entry in candidates:
        by_model.setdefault(entry.model, []).append(entry)
    table: dict[str, ServedService] = {}
    refused: list[str] = []
    for model in sorted(by_model):
        entries = by_model[model]
        taken = [e.service for e in entries if e.service in table]
        if taken:
            owner = table[taken[0]].model
            refused.append(
                f"{model}: gRPC service {taken[0]} is already served by {owner}; "
                "rename the package or the service"
            )
            continue
        for entry in entries:
            table[entry.service] = entry
    return table, refused


@dataclass
class ServiceTable:
    """The current `package.Service` -> API map, replaced whole at each refresh."""

    services: dict[str, ServedService] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)
    # Bumped at each change, so the front rebuilds reflection only when something changed.
    version: int = 0

    def lookup(self, service: str) -> ServedService | None:
        return self.services.get(service)

    def replace(self, services: dict[str, ServedService], refused: list[str]) -> None:
        if services != self.services:
            self.version += 1
        self.services = services
        self.refused = refused


def split_method(path: str) -> tuple[str, str] | None:
    """`/pkg.Service/Method` -> ("pkg.Service", "Method"), or None for anything else."""
    if not path.startswith("/"):
        return None
    service, sep, method = path[1:].partition("/")
    if not sep or not service or not method or "/" in method:
        return None
    return service, method


class ProjectCompiler:
    """Compiles catalog projects' protos, caching each result by the proto's bytes."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, str, bytes, str | None], list[ServedService] | str] = {}

    def project_services(
        self, model: str, project_dir: Path, owner: str | None = None
    ) -> list[ServedService]:
        """The services a project's proto defines; raises `ProtoInvalid` or `LoadFailed`."""
        spec = read_project_spec(project_dir)
        if spec.protobuf_path is None:
            return []
        proto = project_dir / spec.protobuf_path
        try:
            digest = hashlib.sha256(proto.read_bytes()).digest()
        except OSError as exc:
            raise ProtoInvalid(f"{spec.protobuf_path} cannot be read") from exc
        key = (model, str(project_dir), digest, owner)
        cached = self._cache.get(key)
        if isinstance(cached, str):
            raise ProtoInvalid(cached)
        if cached is not None:
            return cached
        with tempfile.TemporaryDirectory(prefix="mlcp-proto-") as out:
            try:
                compiled = compile_proto(project_dir, spec.protobuf_path, Path(out))
            except ProtoInvalid as exc:
                self._cache[key] = exc.message
                raise
        entries = [
            ServedService(
                service=service.full_name,
                model=model,
                methods={m.path: m.server_streaming for m in service.methods},
                descriptor_set=compiled.descriptor_set,
                concurrency=spec.concurrency,
                expiration_s=spec.expiration_s,
                owner=owner,
                public=spec.public,
            )
            for service in compiled.services
        ]
        self._cache[key] = entries
        return entries


async def build_table(
    compiler: ProjectCompiler, projects: Iterable[tuple[str, Path, str | None]]
) -> tuple[dict[str, ServedService], list[str]]:
    """Compile every project (on a thread: protoc is a child process) and assign services.

    `projects` are (model, folder, owner): owner None for MLCP_MODEL_DIRS projects.
    """
    candidates: list[ServedService] = []
    refused: list[str] = []
    for model, folder, owner in projects:
        try:
            candidates.extend(
                await asyncio.to_thread(compiler.project_services, model, folder, owner)
            )
        except LoadFailed as exc:  # ProtoInvalid is one
            refused.append(f"{model}: {exc.message}")
    table, duplicates = assign(candidates)
    for reason in (*refused, *duplicates):
        logger.warning("gRPC not served for %s", reason)
    return table, [*refused, *duplicates]


async def check_deploy(
    compiler: ProjectCompiler, table: ServiceTable, model: str, folder: Path, owner: str
) -> None:
    """Refuse a deploy whose .proto does not compile (protoc's message) or defines a service
    another API serves; a redeploy of the API serving it keeps it."""
    try:
        services = await asyncio.to_thread(compiler.project_services, model, folder, owner)
    except LoadFailed as exc:
        raise InvalidProjectSpec(exc.message) from exc
    for entry in services:
        holder = table.services.get(entry.service)
        if holder is not None and holder.model != model:
            raise GrpcServiceTaken(
                f"the gRPC service {entry.service} is already served by another API; "
                "rename its package or service"
            )
