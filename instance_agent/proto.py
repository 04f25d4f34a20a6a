"""A handler project's `.proto`: compiled with grpcio-tools, checked, and its services described.

`compile_proto` runs protoc (`python -m grpc_tools.protoc`, in a child so its messages land in
our hands and a crash of the compiler cannot take the caller down) with the project as the only
import root besides protobuf's well-known types. protoc itself refuses `..` and absolute import
paths; every file it read is then checked to lie inside the project after resolving symlinks.
The result is the generated `*_pb2.py` modules and a `FileDescriptorSet` (`descriptor.pb`),
which is what the control plane serves reflection from.

`describe_services` reads the services of the project's own file from that set: pure data, so
the control plane can refuse a duplicate `package.Service` without importing generated code.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import ModuleType

from google.protobuf import descriptor_pb2

from instance_agent.protocol import LoadFailed

DESCRIPTOR_SET = "descriptor.pb"
PROTOC_TIMEOUT_S = 60.0
# A project's proto and what it imports; protoc's own limit is far above any sane schema.
MAX_PROTO_BYTES = 1_048_576
_MAX_MESSAGE_CHARS = 2000


class ProtoInvalid(LoadFailed):
    """The project's .proto cannot be compiled or served."""

    code = "invalid_proto"


@dataclass(frozen=True)
class Method:
    """One RPC: its name, full gRPC path, message type names and streaming shape."""

    name: str
    path: str  # "/package.Service/Method"
    input_type: str  # "package.Message", no leading dot
    output_type: str
    client_streaming: bool
    server_streaming: bool


@dataclass(frozen=True)
class Service:
    """One service of the project's proto."""

    full_name: str  # "package.Service"
    methods: tuple[Method, ...]


@dataclass(frozen=True)
class CompiledProto:
    """Where the generated modules lie and what the proto serves."""

    out_dir: Path
    module_name: str  # e.g. "handler_pb2" or "protos.handler_pb2"
    descriptor_set: bytes
    services: tuple[Service, ...]


def _well_known_root() -> Path:
    import grpc_tools

    return Path(grpc_tools.__file__).resolve().parent / "_proto"


def module_name(proto_path: str) -> str:
    """The import name protoc gives the module generated from `proto_path`."""
    pure = PurePosixPath(proto_path)
    return ".".join((*pure.parent.parts, pure.stem + "_pb2"))


def _clean(text: str) -> str:
    return " ".join(text.split())[:_MAX_MESSAGE_CHARS] or "protoc failed without a message"


def _check_files(file_set: descriptor_pb2.FileDescriptorSet, root: Path) -> None:
    well_known = _well_known_root()
    for file in file_set.file:
        candidate = root / file.name
        if candidate.exists():
            if not candidate.resolve().is_relative_to(root):
                raise ProtoInvalid(f"{file.name} leaves the project (a link outside it)")
        elif not (well_known / file.name).is_file():
            raise ProtoInvalid(f"{file.name} is not inside the project")


def describe_services(descriptor_set: bytes, proto_path: str) -> tuple[Service, ...]:
    """The services `proto_path` defines, read from a serialized `FileDescriptorSet`."""
    file_set = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set)
    services: list[Service] = []
    for file in file_set.file:
        if file.name != proto_path:
            continue
        prefix = f"{file.package}." if file.package else ""
        for service in file.service:
            full = prefix + service.name
            methods = tuple(
                Method(
                    name=method.name,
                    path=f"/{full}/{method.name}",
                    input_type=method.input_type.lstrip("."),
                    output_type=method.output_type.lstrip("."),
                    client_streaming=method.client_streaming,
                    server_streaming=method.server_streaming,
                )
                for method in service.method
            )
            services.append(Service(full_name=full, methods=methods))
    return tuple(services)


def compile_proto(project_dir: Path, proto_path: str, out_dir: Path) -> CompiledProto:
    """Compile the project's `proto_path` into `out_dir`; raise `ProtoInvalid` with the reason."""
    root = project_dir.resolve()
    source = (root / proto_path).resolve()
    if not source.is_relative_to(root):
        raise ProtoInvalid(f"{proto_path} leaves the project")
    if not source.is_file():
        raise ProtoInvalid(f"{proto_path} is not in the project")
    if source.stat().st_size > MAX_PROTO_BYTES:
        raise ProtoInvalid(f"{proto_path} is larger than 1 MiB")
    out_dir.mkdir(parents=True, exist_ok=True)
    descriptor_file = out_dir / DESCRIPTOR_SET
    command = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"--proto_path={root}",
        f"--proto_path={_well_known_root()}",
        f"--python_out={out_dir}",
        f"--descriptor_set_out={descriptor_file}",
        "--include_imports",
        proto_path,
    ]
    try:
        done = subprocess.run(
            command,
            cwd=root,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=PROTOC_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ProtoInvalid(f"protoc did not finish within {PROTOC_TIMEOUT_S:g} s") from exc
    if done.returncode != 0:
        # protoc names the file relative to the import root: no host path reaches the user.
        message = _clean(done.stderr.replace(str(root) + "/", ""))
        raise ProtoInvalid(f"protoc: {message}")
    descriptor_set = descriptor_file.read_bytes()
    file_set = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set)
    _check_files(file_set, root)
    services = describe_services(descriptor_set, proto_path)
    if not services:
        raise ProtoInvalid(f"{proto_path} defines no service")
    for service in services:
        for method in service.methods:
            if method.client_streaming:
                raise ProtoInvalid(
                    f"{service.full_name}.{method.name} streams requests from the client; "
                    "only unary and server-streaming RPCs are served"
                )
    return CompiledProto(
        out_dir=out_dir,
        module_name=module_name(proto_path),
        descriptor_set=descriptor_set,
        services=services,
    )


def import_generated(compiled: CompiledProto) -> ModuleType:
    """Import the generated `*_pb2` module (and, through it, the modules it imports)."""
    folder = str(compiled.out_dir)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    try:
        return importlib.import_module(compiled.module_name)
    except Exception as exc:
        raise ProtoInvalid(
            f"the code generated from the proto cannot be imported: {type(exc).__name__}: "
            f"{_clean(str(exc))}"
        ) from exc
