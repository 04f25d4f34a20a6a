"""The `docker` runtime: one container per instance, running the instance agent.

Each container carries labels (`mlcp.managed`, `mlcp.cluster`, `mlcp.instance`, `mlcp.generation`,
`mlcp.model`) so a restarted control plane finds it again with `list()`; the handle is the
container id. The model folder is mounted read-only at /model. The agent runs as root in the
container (the image has no other user), so converted model files of mode 0600 stay readable.

A handler API's version with a `Dockerfile` at its root runs in an image built from it
(`project_image`): the project's files less `model/` (the weights stay mounted) are the build's
context, the build runs offline (host network, nothing pulled: its `FROM` is an image of this
engine, the scaffolded one the agent image), and the image is tagged `mlcp-api:<hash>` of the
context and the ids of its base images, so an unchanged version is built once. The agent image
has no shell, so a `RUN` step cannot work on it; such a build fails with that said.

Network: "bridge" (the default) publishes the agent's port on 127.0.0.1 only, on a port the engine
picks; "host" shares the host's network and the agent listens on a free loopback port (CI's engine
runs with --bridge=none, so tests use it).

The docker SDK is synchronous: each operation runs in a worker thread, every request under the
client's timeout. Engine errors become `RuntimeFailed` with a fixed message; the engine's own
text (which names host paths) is only logged.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import math
import re
import tarfile
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import docker
import docker.errors
from docker.types import DeviceRequest

from control_plane.errors import RuntimeFailed
from control_plane.runtimes.base import (
    Exited,
    InstanceSpec,
    Launched,
    Listed,
    ProjectImageFailed,
)
from control_plane.runtimes.process import exit_reason
from instance_agent.launch import free_loopback_port, serve_command
from instance_agent.lease import DEFAULT_LEASE_GRACE_S, LEASE_ENV
from instance_agent.nvml import session as nvml_session

if TYPE_CHECKING:
    from docker import DockerClient
    from docker.models.containers import Container

logger = logging.getLogger(__name__)

T = TypeVar("T")
Network = Literal["bridge", "host"]

MANAGED = "mlcp.managed"
CLUSTER = "mlcp.cluster"
INSTANCE = "mlcp.instance"
GENERATION = "mlcp.generation"
MODEL = "mlcp.model"
DEFAULT_COMMAND = ("python", "-m", "instance_agent")
MODEL_MOUNT = "/model"
AGENT_PORT = 8000  # inside the container, bridge mode only
CLIENT_TIMEOUT_S = 30
# Docker 20.10+ (device requests need 1.40). Fixed rather than negotiated: negotiating is a
# request at connection time, whose failure would leave a socket open.
API_VERSION = "1.41"
# Bounds the wait for a removed container to disappear from the engine's listing.
REMOVE_WAIT_S = 10.0
LOG_TAIL_FOR_REASON = 20
# States in which the container's process may still be alive; "created" is not one: start()
# starts what it creates at once, so a container left in it was never going to run.
ALIVE = frozenset({"running", "restarting", "paused"})
OOM_REASON = "out of memory: the instance exceeded its memory limit and was killed"
# Handler projects' images (one per distinct project content and base image).
PROJECT_REPOSITORY = "mlcp-api"
PROJECT_LABEL = "mlcp.project"
DOCKERFILE = "Dockerfile"
# The context leaves out the weights: they are mounted with the rest of the version folder.
CONTEXT_SKIP = ("model",)
BUILD_TAIL_LINES = 15
NO_SHELL = (
    "the agent image has no shell, so a RUN step cannot work on it: use COPY, ENV, WORKDIR or "
    "LABEL (packages the code needs go in requirements.txt)"
)
_FROM = re.compile(r"^\s*FROM\s+(?:--\S+\s+)*(\S+)", re.IGNORECASE | re.MULTILINE)
_RUN = re.compile(r"^\s*RUN\b", re.IGNORECASE | re.MULTILINE)


# -- decisions (pure) ------------------------------------------------------------------------


def gpu_request(device: str, free_bytes: dict[int, int] | None) -> tuple[list[DeviceRequest], str]:
    """The device requests for `device`, and the device name the agent sees inside.

    `free_bytes` maps GPU index → free memory (from NVML), or is None when NVML is unavailable.
    A GPU chosen here is the only one in the container, so the agent sees it as cuda:0.
    """
    if not device.startswith("cuda"):
        return [], device
    _, _, index = device.partition(":")
    if index:
        chosen = index
    elif free_bytes:
        chosen = str(min(free_bytes, key=lambda i: (-free_bytes[i], i)))
    else:
        # Without NVML the engine picks one GPU; which one is unknown, so say just "cuda".
        return [DeviceRequest(count=1, capabilities=[["gpu"]])], "cuda"
    return [DeviceRequest(device_ids=[chosen], capabilities=[["gpu"]])], "cuda:0"


def container_name(cluster: str, spec: InstanceSpec) -> str:
    safe = re.sub(r"[^a-zA-Z0-9_.-]", "-", cluster)
    return f"mlcp-{safe}-{spec.instance_id}-{spec.generation}"


def container_config(
    spec: InstanceSpec,
    *,
    cluster: str,
    image: str,
    network: Network,
    host_port: int,
    command: tuple[str, ...] = DEFAULT_COMMAND,
    free_gpu_bytes: dict[int, int] | None = None,
    lease_grace_s: float = DEFAULT_LEASE_GRACE_S,
) -> dict[str, Any]:
    """Keyword arguments for `containers.create` that start `spec`'s agent."""
    device_requests, agent_device = gpu_request(spec.device, free_gpu_bytes)
    inside = replace(spec, model_dir=Path(MODEL_MOUNT), device=agent_device)
    port = host_port if network == "host" else AGENT_PORT
    argv = serve_command(inside.agent_args(port), list(command))[len(command) :]
    if network == "bridge":
        # Reachable only through the published port, which the engine binds to 127.0.0.1.
        argv[argv.index("--host") + 1] = "0.0.0.0"
    config: dict[str, Any] = {
        "image": image,
        "entrypoint": list(command),
        "command": argv,
        "name": container_name(cluster, spec),
        "labels": {
            MANAGED: "true",
            CLUSTER: cluster,
            INSTANCE: str(spec.instance_id),
            GENERATION: str(spec.generation),
            MODEL: spec.model,
        },
        "volumes": {str(spec.model_dir.resolve()): {"bind": MODEL_MOUNT, "mode": "ro"}},
        "environment": {
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            # The agent exits once no control plane renews it (MLCP_INSTANCE_LEASE_GRACE_S).
            LEASE_ENV: f"{lease_grace_s:g}",
        },
        "user": "0:0",
        # An init process forwards SIGTERM to the agent: as PID 1 it would ignore it until
        # uvicorn installs its handlers, turning every stop during loading into a kill.
        "init": True,
        "detach": True,
    }
    if spec.python is not None and tuple(command) == DEFAULT_COMMAND:
        # The project's virtualenv (api_envs.py), built on this host with the interpreter the
        # image holds at the same path: mounted where it was built, it runs as it does here.
        env = Path(spec.python).parent.parent
        config["volumes"][str(env)] = {"bind": str(env), "mode": "ro"}
        config["entrypoint"] = [spec.python, "-m", "instance_agent"]
    if network == "host":
        config["network_mode"] = "host"
    else:
        config["ports"] = {f"{AGENT_PORT}/tcp": ("127.0.0.1",)}
    if spec.mem_limit_bytes is not None:
        config["mem_limit"] = spec.mem_limit_bytes
        config["memswap_limit"] = spec.mem_limit_bytes  # no swap beyond the limit
    if device_requests:
        config["device_requests"] = device_requests
    return config


def endpoint_of(attrs: dict[str, Any]) -> str | None:
    """Where the agent of a container (its inspect data) listens, seen from this host."""
    if (attrs.get("HostConfig") or {}).get("NetworkMode") == "host":
        args: list[str] = attrs.get("Args") or []
        if "--port" in args and args.index("--port") + 1 < len(args):
            return f"http://127.0.0.1:{args[args.index('--port') + 1]}"
        return None
    ports = (attrs.get("NetworkSettings") or {}).get("Ports") or {}
    for binding in ports.get(f"{AGENT_PORT}/tcp") or []:
        if binding.get("HostPort"):
            return f"http://127.0.0.1:{binding['HostPort']}"
    return None


def container_exit_reason(state: dict[str, Any], log_tail: list[str]) -> str | None:
    """None while the container's process may be alive; why it ended otherwise."""
    status = state.get("Status")
    if status in ALIVE:
        return None
    if status == "created":
        return "the instance container was created but never started"
    if state.get("OOMKilled"):
        return OOM_REASON
    code = int(state.get("ExitCode") or 0)
    # The engine reports death by signal N as 128 + N, as a shell does.
    return exit_reason(-(code - 128) if code > 128 else code, log_tail)


def context_files(project: Path) -> list[tuple[str, Path]]:
    """The build context of a project's image: its files less `model/`, by relative path."""
    found: list[tuple[str, Path]] = []
    for path in sorted(project.rglob("*")):
        rel = path.relative_to(project)
        if rel.parts[0] in CONTEXT_SKIP or "__pycache__" in rel.parts:
            continue  # bytecode appears once the code is imported: it must not change the tag
        if path.is_symlink() or not path.is_file():
            continue
        found.append((rel.as_posix(), path))
    return found


def base_images(dockerfile: str) -> list[str]:
    """The images a Dockerfile's FROM lines name (stage names excluded)."""
    stages: set[str] = set()
    names: list[str] = []
    for line in dockerfile.splitlines():
        match = _FROM.match(line)
        if match is None:
            continue
        name = match.group(1)
        if name.lower() not in stages:
            names.append(name)
        words = line.split()
        if len(words) >= 2 and words[-2].upper() == "AS":
            stages.add(words[-1].lower())
    return names


def project_tag(files: list[tuple[str, bytes]], base_ids: list[str]) -> str:
    """The image name for a context (paths and contents) over these base images."""
    digest = hashlib.sha256()
    for rel, data in files:
        digest.update(f"{rel}\0{len(data)}\0".encode())
        digest.update(hashlib.sha256(data).digest())
    for image_id in base_ids:
        digest.update(f"from\0{image_id}\0".encode())
    return f"{PROJECT_REPOSITORY}:{digest.hexdigest()[:32]}"


def build_failure(dockerfile: str, output: list[str], error: str) -> str:
    """A failed build's reason: what failed, its last lines, and why a RUN cannot work."""
    tail = [line for line in output if line.strip()][-BUILD_TAIL_LINES:]
    lines = "\n".join([*tail, error] if error and error not in tail else tail)
    reason = f"building the project's Dockerfile failed:\n{lines}".rstrip()
    if _RUN.search(dockerfile):
        reason += f"\n({NO_SHELL})"
    return reason


def _context(files: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for rel, data in files:
            info = tarfile.TarInfo(rel)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def ensure_project_image(client: DockerClient, project: Path) -> str:
    """The project's image, built from its Dockerfile unless one of that content exists."""
    dockerfile = (project / DOCKERFILE).read_text("utf-8", "replace")
    files = [(rel, path.read_bytes()) for rel, path in context_files(project)]
    base_ids = []
    for name in base_images(dockerfile):
        try:
            base_ids.append(str(client.images.get(name).id))
        except docker.errors.ImageNotFound:
            raise ProjectImageFailed(
                f"the Dockerfile's FROM {name} is not an image of this Docker engine (nothing "
                "is pulled from a registry): start it FROM the agent image, as `mlcp init` does"
            ) from None
    if not base_ids:
        raise ProjectImageFailed("the Dockerfile has no FROM line: start it FROM the agent image")
    tag = project_tag(files, base_ids)
    try:
        client.images.get(tag)
        return tag
    except docker.errors.ImageNotFound:
        pass
    output: list[str] = []
    error = ""
    for chunk in client.api.build(
        fileobj=io.BytesIO(_context(files)),
        custom_context=True,
        tag=tag,
        rm=True,
        forcerm=True,
        pull=False,
        network_mode="host",
        labels={PROJECT_LABEL: "true"},
        decode=True,
    ):
        if "stream" in chunk:
            output.extend(str(chunk["stream"]).splitlines())
        if "error" in chunk:
            error = str(chunk["error"]).strip()
    if error:
        raise ProjectImageFailed(build_failure(dockerfile, output, error))
    return tag


def free_gpu_memory() -> dict[int, int] | None:
    """GPU index → free bytes from NVML, or None where there is no NVIDIA driver."""
    with nvml_session() as nvml:
        devices = nvml.devices() if nvml is not None else None
    return {d.index: d.free_bytes for d in devices} if devices is not None else None


# -- the runtime (IO) ------------------------------------------------------------------------


class DockerRuntime:
    name = "docker"

    def __init__(
        self,
        *,
        cluster: str,
        image: str,
        network: Network = "bridge",
        command: list[str] | None = None,
        timeout_s: int = CLIENT_TIMEOUT_S,
        lease_grace_s: float = DEFAULT_LEASE_GRACE_S,
    ) -> None:
        self.cluster = cluster
        self.lease_grace_s = lease_grace_s
        self.image = image
        self.network: Network = network
        self.command = tuple(command or DEFAULT_COMMAND)
        self.timeout_s = timeout_s
        self._client: DockerClient | None = None
        self._connecting = threading.Lock()

    def _connect(self) -> DockerClient:
        with self._connecting:  # called from worker threads
            if self._client is None:
                self._client = docker.DockerClient.from_env(
                    timeout=self.timeout_s, version=API_VERSION
                )
            return self._client

    async def _run(self, what: str, fn: Callable[[DockerClient], T]) -> T:
        """Run `fn` with the client in a worker thread; engine errors become RuntimeFailed."""

        def call() -> T:
            return fn(self._connect())

        try:
            return await asyncio.to_thread(call)
        except RuntimeFailed:
            raise
        # requests' errors (engine unreachable, timed out) are OSErrors.
        except (docker.errors.DockerException, OSError) as exc:
            logger.warning("docker: could not %s: %s", what, exc)
            raise RuntimeFailed(f"the Docker engine could not {what}") from exc

    async def start(self, spec: InstanceSpec) -> Launched:
        host_port = free_loopback_port() if self.network == "host" else AGENT_PORT

        def start(client: DockerClient) -> Launched:
            gpus = free_gpu_memory() if spec.device.startswith("cuda") else None
            image = self.image
            project = spec.project_dir
            if project is not None and (project / DOCKERFILE).is_file():
                try:
                    image = ensure_project_image(client, project)
                except ProjectImageFailed as exc:
                    raise RuntimeFailed(str(exc)) from exc
            config = container_config(
                spec,
                cluster=self.cluster,
                image=image,
                network=self.network,
                host_port=host_port,
                command=self.command,
                free_gpu_bytes=gpus,
                lease_grace_s=self.lease_grace_s,
            )
            container = self._create(client, config)
            try:
                container.start()
                container.reload()
                endpoint = endpoint_of(container.attrs)
                if endpoint is None:
                    raise RuntimeFailed("the instance container has no published port")
            except BaseException:
                _remove_quietly(container)
                raise
            return Launched(handle=str(container.id), endpoint=endpoint)

        return await self._run("start the instance container", start)

    async def project_image(self, project: Path) -> str:
        """Build (or find) a handler project's image from its Dockerfile; its name."""
        try:
            return await self._run(
                "build the project's image", lambda client: ensure_project_image(client, project)
            )
        except RuntimeFailed as exc:
            raise ProjectImageFailed(f"the Docker engine could not build the image: {exc}") from exc

    def _create(self, client: DockerClient, config: dict[str, Any]) -> Container:
        try:
            return client.containers.create(**config)
        except docker.errors.ImageNotFound as exc:
            raise RuntimeFailed(
                f"the instance image {self.image} is missing: build it with `make image`"
            ) from exc
        except docker.errors.APIError as exc:
            if exc.status_code != 409:
                raise
        # 409: a container of this very instance and generation is left from an attempt that
        # died with its control plane; the database lets only one start run, so replace it.
        try:
            _remove_quietly(client.containers.get(config["name"]))
        except docker.errors.NotFound:
            pass
        return client.containers.create(**config)

    async def exited(self, handle: str) -> Exited | None:
        def look(client: DockerClient) -> Exited | None:
            try:
                container = client.containers.get(handle)
                state = container.attrs.get("State") or {}
                if container_exit_reason(state, []) is None:
                    return None
                # Read the logs only once it has ended: they may name the load failure.
                return Exited(container_exit_reason(state, _tail(container)) or "it stopped")
            except docker.errors.NotFound:
                return Exited("the instance container is gone")

        return await self._run("inspect the instance container", look)

    async def stop(self, handle: str, grace_s: float) -> None:
        def stop(client: DockerClient) -> None:
            try:
                container = client.containers.get(handle)
                if container.status in ALIVE:
                    # The engine sends SIGTERM, waits up to the timeout, then SIGKILL.
                    container.stop(timeout=max(1, math.ceil(grace_s)))
                container.remove(force=True)
            except docker.errors.NotFound:
                return
            except docker.errors.APIError as exc:
                if exc.status_code != 409:  # 409: another caller is removing it already
                    raise
            deadline = time.monotonic() + REMOVE_WAIT_S
            while time.monotonic() < deadline:
                try:
                    client.containers.get(handle)
                except docker.errors.NotFound:
                    return
                time.sleep(0.1)
            raise RuntimeFailed("the instance container could not be removed")

        await self._run("stop the instance container", stop)

    async def list(self) -> list[Listed]:
        def find(client: DockerClient) -> list[Listed]:
            found: list[Listed] = []
            containers = client.containers.list(
                all=True,  # an exited container is still ours to remove, with its exit reason
                filters={"label": [f"{MANAGED}=true", f"{CLUSTER}={self.cluster}"]},
                ignore_removed=True,
            )
            for container in containers:
                labels = container.labels
                try:
                    instance_id, generation = int(labels[INSTANCE]), int(labels[GENERATION])
                except (KeyError, ValueError):
                    continue
                endpoint = endpoint_of(container.attrs)
                found.append(Listed(instance_id, generation, str(container.id), endpoint))
            return found

        return await self._run("list the instance containers", find)

    async def logs(self, handle: str, tail_lines: int) -> str:
        def read(client: DockerClient) -> str:
            try:
                return "\n".join(_tail(client.containers.get(handle), tail_lines))
            except docker.errors.NotFound:
                return ""

        return await self._run("read the instance container's logs", read)


def _tail(container: Container, lines: int = LOG_TAIL_FOR_REASON) -> list[str]:
    raw: bytes = container.logs(stdout=True, stderr=True, tail=lines)
    return raw.decode("utf-8", "replace").splitlines()


def _remove_quietly(container: Container) -> None:
    try:
        container.remove(force=True)
    except docker.errors.DockerException:
        logger.warning("docker: could not remove container %s", container.short_id)
