"""The `docker` runtime: one container per instance, running the instance agent.

Each container carries labels (`mlcp.managed`, `mlcp.cluster`, `mlcp.instance`, `mlcp.generation`,
`mlcp.model`) so a restarted control plane finds it again with `list()`; the handle is the
container id. The model folder is mounted read-only at /model. The agent runs as root in the
container (the image has no other user), so converted model files of mode 0600 stay readable.

Network: "bridge" (the default) publishes the agent's port on 127.0.0.1 only, on a port the engine
picks; "host" shares the host's network and the agent listens on a free loopback port (CI's engine
runs with --bridge=none, so tests use it).

The docker SDK is synchronous: each operation runs in a worker thread, every request under the
client's timeout. Engine errors become `RuntimeFailed` with a fixed message; the engine's own
text (which names host paths) is only logged.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
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
from control_plane.runtimes.base import Exited, InstanceSpec, Launched, Listed
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
            config = container_config(
                spec,
                cluster=self.cluster,
                image=self.image,
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
