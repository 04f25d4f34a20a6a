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

Spares (MLCP_DOCKER_SPARES, default 1): warm containers of the agent image whose process has
imported torch and transformers already (`instance_agent.spare`), which take the imports out of
a container's cold start. They mount the catalog's model folders (`spare_roots`: MLCP_MODEL_DIRS,
the model store, the packaged models) read-only at their own paths, since a spare does not know
its model yet; so only catalog models on the CPU use them (not a deployed API's code or
environment, not a GPU: device requests are fixed when a container is created). Starting such an
instance claims a spare: the container is renamed for the instance (a spare's labels cannot
change, so `list()` reads a claimed one's instance from its name), given the instance's memory
limit, and told the agent's options; then a new spare is made. A spare lives while its control
plane holds a connection to it; one left exited by a control plane that died is removed by the
next one.

The docker SDK is synchronous: each operation runs in a worker thread, every request under the
client's timeout. Engine errors become `RuntimeFailed` with a fixed message; the engine's own
text (which names host paths) is only logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.client
import io
import json
import logging
import math
import re
import secrets
import tarfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
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
from instance_agent.spare import TOKEN_ENV, TOKEN_HEADER

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
SPARE = "mlcp.spare"
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
# A spare's process answers on its port within this long of its container's start.
SPARE_CONNECT_S = 60.0
SPARE_CLAIM_TIMEOUT_S = 5.0
# After a spare could not be made (no image yet, engine trouble), the next try waits this long.
SPARE_RETRY_S = 30.0


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
        "environment": _base_env(lease_grace_s),
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


def _base_env(lease_grace_s: float) -> dict[str, str]:
    return {
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        # The agent exits once no control plane renews it (MLCP_INSTANCE_LEASE_GRACE_S).
        LEASE_ENV: f"{lease_grace_s:g}",
    }


def distinct_roots(roots: Iterable[Path]) -> tuple[Path, ...]:
    """Existing folders, resolved, less those inside another (one mount covers them)."""
    found = sorted({r.resolve() for r in roots if r.is_dir()}, key=lambda p: len(p.parts))
    kept: list[Path] = []
    for root in found:
        if not any(root.is_relative_to(k) for k in kept):
            kept.append(root)
    return tuple(kept)


def spare_fits(spec: InstanceSpec, roots: tuple[Path, ...], command: tuple[str, ...]) -> bool:
    """Whether a spare can become `spec`'s agent: a catalog model under a mounted folder, on
    the CPU, run by the image's own agent."""
    return (
        command == DEFAULT_COMMAND
        and spec.python is None
        and spec.project_dir is None
        and not spec.device.startswith("cuda")
        and any(spec.model_dir.resolve().is_relative_to(root) for root in roots)
    )


def spare_name(cluster: str, token: str) -> str:
    safe = re.sub(r"[^a-zA-Z0-9_.-]", "-", cluster)
    return f"mlcp-{safe}-spare-{token[:12]}"


def instance_of_name(cluster: str, name: str) -> tuple[int, int] | None:
    """(instance id, generation) of a claimed spare, from the name `container_name` gave it."""
    safe = re.sub(r"[^a-zA-Z0-9_.-]", "-", cluster)
    match = re.fullmatch(rf"mlcp-{re.escape(safe)}-(\d+)-(\d+)", name)
    return (int(match.group(1)), int(match.group(2))) if match else None


def spare_config(
    *,
    cluster: str,
    image: str,
    network: Network,
    host_port: int,
    roots: tuple[Path, ...],
    token: str,
    lease_grace_s: float = DEFAULT_LEASE_GRACE_S,
) -> dict[str, Any]:
    """Keyword arguments for `containers.create` that start a spare agent."""
    port = host_port if network == "host" else AGENT_PORT
    host = "127.0.0.1" if network == "host" else "0.0.0.0"
    config: dict[str, Any] = {
        "image": image,
        "entrypoint": list(DEFAULT_COMMAND),
        "command": ["spare", "--host", host, "--port", str(port)],
        "name": spare_name(cluster, token),
        "labels": {MANAGED: "true", CLUSTER: cluster, SPARE: "true"},
        "volumes": {str(root): {"bind": str(root), "mode": "ro"} for root in roots},
        "environment": {**_base_env(lease_grace_s), TOKEN_ENV: token},
        "user": "0:0",
        "init": True,
        "detach": True,
    }
    if network == "host":
        config["network_mode"] = "host"
    else:
        config["ports"] = {f"{AGENT_PORT}/tcp": ("127.0.0.1",)}
    return config


def claim_argv(spec: InstanceSpec, network: Network, host_port: int) -> list[str]:
    """The `serve` options a spare is claimed with: the model at its own (mounted) path."""
    port = host_port if network == "host" else AGENT_PORT
    args = replace(spec, model_dir=spec.model_dir.resolve()).agent_args(port)
    argv = serve_command(args, list(DEFAULT_COMMAND))[len(DEFAULT_COMMAND) :]
    if network == "bridge":
        argv[argv.index("--host") + 1] = "0.0.0.0"
    return argv


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


@dataclass
class _Spare:
    """A spare container this control plane holds (the connection it lives by)."""

    container_id: str
    endpoint: str
    token: str
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    ready: bool = False


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
        spares: int = 0,
        spare_roots: Iterable[Path] = (),
    ) -> None:
        self.cluster = cluster
        self.lease_grace_s = lease_grace_s
        self.image = image
        self.network: Network = network
        self.command = tuple(command or DEFAULT_COMMAND)
        self.timeout_s = timeout_s
        self._client: DockerClient | None = None
        self._connecting = threading.Lock()
        self.spares = spares if self.command == DEFAULT_COMMAND else 0
        self.spare_roots = distinct_roots(spare_roots)
        self._pool: list[_Spare] = []
        self._refill = asyncio.Event()
        self._maintainer: asyncio.Task[None] | None = None
        self._watchers: set[asyncio.Task[None]] = set()
        # Instances started from a spare so far (the rest were fresh containers).
        self.claimed = 0

    # -- spares -----------------------------------------------------------------------------

    def warm_up(self) -> None:
        """Make the spares in the background, so the first load already claims one."""
        if self.spares > 0 and self.spare_roots and self._maintainer is None:
            self._maintainer = asyncio.create_task(self._maintain())

    def spares_ready(self) -> int:
        return sum(1 for spare in self._pool if spare.ready)

    async def close(self) -> None:
        """Remove this control plane's spares; instances keep running (a restart adopts them)."""
        if self._maintainer is not None:
            self._maintainer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._maintainer
        for task in list(self._watchers):
            task.cancel()
        spares, self._pool = self._pool, []
        for spare in spares:
            spare.writer.close()
        if spares:
            ids = [spare.container_id for spare in spares]
            with contextlib.suppress(RuntimeFailed):
                await self._run("remove the spare containers", lambda c: _remove_ids(c, ids))

    async def _maintain(self) -> None:
        with contextlib.suppress(RuntimeFailed):
            await self._run("remove spares left exited", self._remove_exited_spares)
        while True:
            self._refill.clear()
            while len(self._pool) < self.spares:
                try:
                    self._pool.append(await self._make_spare())
                except (RuntimeFailed, OSError, TimeoutError) as exc:
                    logger.warning("docker: no spare container (%s); next try in a while", exc)
                    await asyncio.sleep(SPARE_RETRY_S)
            await self._refill.wait()

    def _remove_exited_spares(self, client: DockerClient) -> None:
        for container in client.containers.list(
            all=True,
            filters={"label": [f"{SPARE}=true", f"{CLUSTER}={self.cluster}"]},
            ignore_removed=True,
        ):
            unclaimed = instance_of_name(self.cluster, container.name) is None
            if unclaimed and container.status not in ALIVE:
                _remove_quietly(container)

    async def _make_spare(self) -> _Spare:
        token = secrets.token_hex(16)
        host_port = free_loopback_port() if self.network == "host" else AGENT_PORT
        config = spare_config(
            cluster=self.cluster,
            image=self.image,
            network=self.network,
            host_port=host_port,
            roots=self.spare_roots,
            token=token,
            lease_grace_s=self.lease_grace_s,
        )

        def start(client: DockerClient) -> tuple[str, str]:
            return self._create_and_start(client, config, "spare")

        starting = asyncio.ensure_future(self._run("start a spare container", start))
        try:
            container_id, endpoint = await asyncio.shield(starting)
        except asyncio.CancelledError:
            # Closing while the engine starts it: the container is removed once it exists.
            with contextlib.suppress(Exception):
                made, _ = await starting
                await self._run("remove a spare", lambda c: _remove_ids(c, [made]))
            raise
        try:
            reader, writer = await _hold(endpoint, token)
        except BaseException:
            with contextlib.suppress(RuntimeFailed):
                await self._run("remove a spare", lambda c: _remove_ids(c, [container_id]))
            raise
        spare = _Spare(container_id, endpoint, token, reader, writer)
        task = asyncio.ensure_future(self._watch(spare))
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)
        return spare

    async def _watch(self, spare: _Spare) -> None:
        """Note when the spare is ready; drop it if it goes away unclaimed."""
        with contextlib.suppress(OSError):
            while line := await spare.reader.readline():
                if line.strip() == b"ready":
                    spare.ready = True
        if spare in self._pool:  # it died (or was removed) before anyone claimed it
            self._pool.remove(spare)
            logger.warning("docker: a spare container went away; making another")
            with contextlib.suppress(RuntimeFailed):
                await self._run("remove a spare", lambda c: _remove_ids(c, [spare.container_id]))
            self._refill.set()

    async def _claim(self, spec: InstanceSpec) -> Launched | None:
        """Start `spec` in a spare, or None (none fits or is there, or the claim failed)."""
        if not self._pool or not spare_fits(spec, self.spare_roots, self.command):
            return None
        self._pool.sort(key=lambda s: not s.ready)
        spare = self._pool.pop(0)
        self._refill.set()
        name = container_name(self.cluster, spec)
        port = int(spare.endpoint.rsplit(":", 1)[1])
        body = json.dumps({"argv": claim_argv(spec, self.network, port)}).encode()

        def claim(client: DockerClient) -> None:
            container = client.containers.get(spare.container_id)
            if container.attrs.get("Image") != client.images.get(self.image).id:
                # The image was rebuilt since the spare was made: its agent is not this one.
                raise RuntimeFailed(f"the spare runs an older {self.image}")
            try:
                container.rename(name)
            except docker.errors.APIError as exc:
                if exc.status_code != 409:
                    raise
                # A container of this instance and generation is left from an attempt that
                # died with its control plane: replaced, as `_create` does.
                _remove_quietly(client.containers.get(name))
                container.rename(name)
            if spec.mem_limit_bytes is not None:
                container.update(mem_limit=spec.mem_limit_bytes, memswap_limit=spec.mem_limit_bytes)
            _post_claim(spare.endpoint, spare.token, body)

        try:
            await self._run("claim a spare container", claim)
        except RuntimeFailed as exc:
            logger.warning("docker: claiming a spare failed (%s); starting a fresh container", exc)
            with contextlib.suppress(RuntimeFailed):
                await self._run("remove a spare", lambda c: _remove_ids(c, [spare.container_id]))
            return None
        finally:
            spare.writer.close()
        self.claimed += 1
        return Launched(handle=spare.container_id, endpoint=spare.endpoint)

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
        launched = await self._claim(spec)
        if launched is not None:
            return launched
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
            handle, endpoint = self._create_and_start(client, config, "instance")
            return Launched(handle=handle, endpoint=endpoint)

        return await self._run("start the instance container", start)

    async def project_image(self, project: Path) -> str:
        """Build (or find) a handler project's image from its Dockerfile; its name."""
        try:
            return await self._run(
                "build the project's image", lambda client: ensure_project_image(client, project)
            )
        except RuntimeFailed as exc:
            raise ProjectImageFailed(f"the Docker engine could not build the image: {exc}") from exc

    def _create_and_start(
        self, client: DockerClient, config: dict[str, Any], kind: str
    ) -> tuple[str, str]:
        """Create and start a container; its id and where its agent listens (removed on error)."""
        container = self._create(client, config)
        try:
            container.start()
            container.reload()
            endpoint = endpoint_of(container.attrs)
            if endpoint is None:
                raise RuntimeFailed(f"the {kind} container has no published port")
        except BaseException:
            _remove_quietly(container)
            raise
        return str(container.id), endpoint

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
                    # A claimed spare says which instance it is by its name (labels are fixed
                    # when a container is created); an unclaimed one is no instance.
                    named = instance_of_name(self.cluster, container.name)
                    if named is None:
                        continue
                    instance_id, generation = named
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


def _remove_ids(client: DockerClient, ids: list[str]) -> None:
    for container_id in ids:
        try:
            _remove_quietly(client.containers.get(container_id))
        except docker.errors.NotFound:
            pass


def _post_claim(endpoint: str, token: str, body: bytes) -> None:
    """Tell a spare which agent to become (in a worker thread); RuntimeFailed if it refuses."""
    host, port = endpoint.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=SPARE_CLAIM_TIMEOUT_S)
    try:
        conn.request(
            "POST",
            "/claim",
            body=body,
            headers={TOKEN_HEADER.decode(): token, "Content-Type": "application/json"},
        )
        resp = conn.getresponse()
        answer = resp.read(4096)
    except OSError as exc:
        raise RuntimeFailed(f"the spare did not take the claim: {exc}") from exc
    finally:
        conn.close()
    if resp.status != 200:
        raise RuntimeFailed(f"the spare refused the claim: {resp.status} {answer[:200]!r}")


async def _hold(endpoint: str, token: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open the connection a spare lives by (retrying while its process starts)."""
    host, port = endpoint.removeprefix("http://").rsplit(":", 1)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SPARE_CONNECT_S
    while True:
        try:
            reader, writer = await asyncio.open_connection(host, int(port))
            break
        except OSError:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.1)
    writer.write(
        b"GET /hold HTTP/1.1\r\nHost: spare\r\n"
        + TOKEN_HEADER
        + b": "
        + token.encode()
        + b"\r\n\r\n"
    )
    async with asyncio.timeout(10):
        head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        writer.close()
        raise RuntimeFailed(f"the spare answered {head[:60]!r}")
    return reader, writer


def _remove_quietly(container: Container) -> None:
    try:
        container.remove(force=True)
    except docker.errors.DockerException:
        logger.warning("docker: could not remove container %s", container.short_id)
