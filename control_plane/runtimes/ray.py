"""The `ray` runtime: each instance is a detached, named Ray actor on a node admission chose.

The actor (instance_agent/ray_actor.py) runs the instance agent as its child, listening on the
node's address as Ray reports it; its name, `mlcp-<cluster>-<instance id>-<generation>` in the
`mlcp` namespace, is the handle, so a restarted control plane finds it again with `list()`.
It asks Ray for the memory (and GPU) admission reserved, pinned to the node with a hard
NodeAffinitySchedulingStrategy: PostgreSQL's reservation ledger decides, Ray enforces.

The Ray API blocks: every call runs in a worker thread under a deadline, and Ray's errors
become RuntimeFailed (ClusterUnavailable when the cluster does not answer).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import re
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, TypeVar

import ray
import ray.exceptions
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from control_plane.device_names import local_of, node_of
from control_plane.errors import ClusterUnavailable, RuntimeFailed
from control_plane.nodes import NODE_LOST, Node, cluster_devices, parse_node_table
from control_plane.placement import Device
from control_plane.runtimes.base import Exited, InstanceSpec, Launched, Listed
from control_plane.runtimes.process import LABEL_ENV, exit_reason
from instance_agent.launch import serve_command
from instance_agent.lease import DEFAULT_LEASE_GRACE_S, LEASE_ENV
from instance_agent.ray_actor import InstanceActor, gpu_totals

logger = logging.getLogger(__name__)

T = TypeVar("T")

NAMESPACE = "mlcp"
DEFAULT_ADDRESS = "127.0.0.1:6379"
KILLED = "the instance's Ray actor was killed (ray.kill)"
GONE = "the instance's Ray actor is gone"
RESTARTED = "the Ray cluster restarted (a new head, a new cluster: the actor is gone)"
CONNECT_TIMEOUT_S = 5.0
# The GCS port is tried before each Ray call: a call left waiting on a dead GCS aborts this
# process when a new head answers on the address (Ray checks the cluster id and crashes).
PROBE_TIMEOUT_S = 0.5
# ray.init and ray.shutdown in a thread under a limit: on a dead GCS they may block for minutes.
REJOIN_TIMEOUT_S = 30.0
CALL_TIMEOUT_S = 10.0
NODES_TIMEOUT_S = 5.0
# A node table older than this is not placed on (the scheduled read runs every 2 s).
STALE_NODES_S = 10.0
RAY_THREADS = 8
RECONNECT_ENV = "RAY_gcs_rpc_server_reconnect_timeout_s"
RECONNECT_S = 7 * 86_400
# Creating the actor on its node (a worker process started there) and the agent spawned.
PLACE_TIMEOUT_S = 60.0
REMOVE_WAIT_S = 10.0
LOG_TAIL_FOR_REASON = 20


# -- decisions (pure) ------------------------------------------------------------------------


def actor_name(cluster: str, instance_id: int, generation: int) -> str:
    safe = re.sub(r"[^a-zA-Z0-9_.-]", "-", cluster)
    return f"mlcp-{safe}-{instance_id}-{generation}"


def parse_actor_name(cluster: str, name: str) -> tuple[int, int] | None:
    """(instance id, generation) of one of this cluster's actors; None for any other name."""
    prefix = actor_name(cluster, 0, 0).removesuffix("0-0")
    if not name.startswith(prefix):
        return None
    instance_id, _, generation = name[len(prefix) :].partition("-")
    if not (instance_id.isdigit() and generation.isdigit()):
        return None
    return int(instance_id), int(generation)


def death_reason(message: str) -> str:
    """A human reason from the text of Ray's actor-death error."""
    if "node has died" in message or "node was terminated" in message:
        return NODE_LOST
    if "ray.kill" in message:
        return KILLED
    if "not schedulable" in message or "infeasible" in message:
        return "Ray could not place the instance on the node admission chose"
    first = next((line.strip() for line in message.splitlines() if line.strip()), "")
    return f"the instance's Ray actor died: {first[:300]}"


def split_address(address: str) -> tuple[str, int]:
    """(host, port) of a GCS address; ValueError when it is not `host:port`."""
    host, sep, port = address.strip().removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"MLCP_RAY_ADDRESS {address!r} is not host:port")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def actor_options(name: str, spec: InstanceSpec) -> dict[str, Any]:
    """Ray options for `spec`'s actor: its name, what it reserves, the node it is pinned to."""
    node = node_of(spec.device)
    if node is None:
        raise RuntimeFailed("the ray runtime needs a node for the instance; it has none")
    options: dict[str, Any] = {
        "name": name,
        "namespace": NAMESPACE,
        "lifetime": "detached",
        "num_cpus": 0,
        "max_restarts": 0,
        # poll/tail answer while terminate waits for the agent.
        "max_concurrency": 4,
        "scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=False),
    }
    if spec.reserve_bytes > 0:
        options["memory"] = spec.reserve_bytes
    if local_of(spec.device).startswith("cuda"):
        options["num_gpus"] = 1
    return options


# -- the runtime (IO) ------------------------------------------------------------------------


class RayRuntime:
    name = "ray"

    def __init__(
        self,
        *,
        cluster: str,
        address: str | None,
        command: list[str] | None = None,
        lease_grace_s: float = DEFAULT_LEASE_GRACE_S,
        stale_after_s: float = STALE_NODES_S,
    ) -> None:
        self.cluster = cluster
        self.stale_after_s = stale_after_s
        self._nodes_read_at: float | None = None  # monotonic
        # Ray's calls block, some until their deadline while the cluster is away: their own
        # threads, so they never take the default executor's few (6 on 2 cores) from the rest.
        self._threads = ThreadPoolExecutor(RAY_THREADS, thread_name_prefix="mlcp-ray")
        self.address = address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
        self.command = command
        self.lease_grace_s = lease_grace_s
        self.nodes: list[Node] = []
        self._actors: dict[str, Any] = {}
        self._node_of: dict[str, str] = {}  # handle → node id
        self._gpu_bytes: dict[str, dict[int, int]] = {}
        self._actor_class: Any = None
        # Disconnected from a cluster that stopped answering: no Ray call until it is back.
        self.down = False
        # Nodes of a cluster that was replaced by a new one (their instances' reason: RESTARTED).
        self.replaced_nodes: set[str] = set()
        self._rejoin = asyncio.Lock()

    # -- connection ------------------------------------------------------------------------

    def connect(self) -> None:
        """Join the Ray cluster as a driver; ClusterUnavailable with the reason when it cannot.

        The GCS port is tried first with a short timeout: `ray.init` retries an unreachable
        address for minutes.
        """
        if ray.is_initialized():
            return
        # Ray ends a driver whose GCS stays away for 60 s: the control plane must outlive an
        # outage of the cluster (running instances keep serving; loads answer 503).
        os.environ.setdefault(RECONNECT_ENV, str(RECONNECT_S))
        try:
            host, port = split_address(self.address)
        except ValueError as exc:
            raise ClusterUnavailable(str(exc)) from exc
        try:
            socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
        except OSError as exc:
            raise ClusterUnavailable(
                f"the Ray cluster at {self.address} is unreachable ({exc.strerror or exc}); "
                "start it with `ray start --head` or set MLCP_RAY_ADDRESS"
            ) from exc
        try:
            with _loopback_as_is(is_loopback(host)):
                ray.init(
                    address=f"{host}:{port}",
                    namespace=NAMESPACE,
                    log_to_driver=False,
                    logging_level=logging.WARNING,
                )
        except Exception as exc:  # Ray raises bare RuntimeErrors and ConnectionErrors here
            raise ClusterUnavailable(
                f"could not join the Ray cluster at {self.address} ({str(exc)[:300]}); the "
                "control plane must run on a node of the cluster (`ray start` there first)"
            ) from exc

    async def close(self) -> None:
        """Let go of the threads; the driver stays connected (actors are detached anyway)."""
        self._threads.shutdown(wait=False, cancel_futures=True)

    async def _call(self, what: str, fn: Callable[[], T], timeout_s: float = CALL_TIMEOUT_S) -> T:
        """Run a blocking Ray call in a thread under a deadline; Ray's errors translated.

        Not while the cluster is away (`down`): the call would wait on the dead GCS.
        """
        if self.down:
            raise ClusterUnavailable(f"the Ray cluster at {self.address} is unreachable")
        return await self._run(what, fn, timeout_s)

    async def _run(self, what: str, fn: Callable[[], T], timeout_s: float) -> T:
        try:
            loop = asyncio.get_running_loop()
            return await asyncio.wait_for(
                loop.run_in_executor(self._threads, self._probed, fn), timeout_s
            )
        except RuntimeFailed:
            raise
        except TimeoutError as exc:
            raise ClusterUnavailable(f"the Ray cluster did not answer to {what}") from exc
        except (ray.exceptions.RayError, ConnectionError, OSError) as exc:
            logger.warning("ray: could not %s: %s", what, exc)
            raise ClusterUnavailable(f"the Ray cluster could not {what}") from exc

    def _probed(self, fn: Callable[[], T]) -> T:
        if not self.gcs_reachable():
            raise ClusterUnavailable(f"the Ray cluster at {self.address} is unreachable")
        return fn()

    # -- nodes -----------------------------------------------------------------------------

    def gcs_reachable(self) -> bool:
        """Whether the GCS port accepts a connection now (a plain TCP connect, no Ray call)."""
        try:
            host, port = split_address(self.address)
            socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
        except (OSError, ValueError):
            return False
        return True

    async def _leave(self) -> None:
        """The GCS is gone: disconnect this driver before a new head can answer on the address."""
        self.down = True
        logger.warning("ray: the cluster at %s is unreachable; disconnected", self.address)
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.run_in_executor(None, ray.shutdown), REJOIN_TIMEOUT_S)
        except TimeoutError:
            logger.warning("ray: disconnecting from the lost cluster did not finish")

    async def _come_back(self) -> None:
        """Join the cluster again once its GCS answers; a new cluster replaces the old nodes."""
        if not self.gcs_reachable():
            raise ClusterUnavailable(f"the Ray cluster at {self.address} is unreachable")
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.run_in_executor(None, self.connect), REJOIN_TIMEOUT_S)
        except TimeoutError as exc:
            raise ClusterUnavailable(
                f"the Ray cluster at {self.address} did not let this control plane join again"
            ) from exc
        before = {n.node_id for n in self.nodes}
        self._actors.clear()
        self._actor_class = None
        # Still `down` while the new table is read: an instance check asking about an actor
        # meanwhile would see the old table and say GONE instead of RESTARTED.
        try:
            table = parse_node_table(await self._run("list its nodes", ray.nodes, NODES_TIMEOUT_S))
        finally:
            self.down = False
        if before and not before & {n.node_id for n in table}:
            self.replaced_nodes |= before
            self._gpu_bytes.clear()
            logger.warning("ray: joined the cluster at %s again: it restarted", self.address)
        else:
            logger.warning("ray: joined the cluster at %s again", self.address)

    def loss_reason(self, node_id: str | None) -> str:
        """Why an instance of a node no longer in the table is gone."""
        return RESTARTED if node_id in self.replaced_nodes else NODE_LOST

    async def refresh_nodes(self) -> list[Node]:
        """Read Ray's node table (and each GPU node's GPU memory once); keep it as `nodes`.

        The GCS port is tried first: a cluster gone disconnects this driver (ClusterUnavailable
        until it is back); one that answers again is joined again, and a new cluster's nodes
        replace the old ones (whose instances `watch_nodes` then fails as RESTARTED).
        """
        async with self._rejoin:
            if self.down:
                await self._come_back()
            elif not await asyncio.to_thread(self.gcs_reachable):
                await self._leave()
                raise ClusterUnavailable(f"the Ray cluster at {self.address} is unreachable")
        table = parse_node_table(await self._call("list its nodes", ray.nodes, NODES_TIMEOUT_S))
        for node in table:
            if node.alive and node.gpus and node.node_id not in self._gpu_bytes:
                self._gpu_bytes[node.node_id] = await self._probe_gpus(node.node_id)
        self.nodes = [replace(n, gpu_bytes=self._gpu_bytes.get(n.node_id, {})) for n in table]
        self._nodes_read_at = time.monotonic()
        return self.nodes

    async def _probe_gpus(self, node_id: str) -> dict[int, int]:
        probe = ray.remote(num_cpus=0)(gpu_totals).options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)
        )
        try:
            found: dict[int, int] = await self._call(
                "read a node's GPUs", lambda: ray.get(probe.remote(), timeout=CALL_TIMEOUT_S)
            )
        except RuntimeFailed:
            return {}
        return found

    async def devices(self) -> list[Device]:
        """Every live node's devices, reading the node table again if it was not read lately.

        A table older than `stale_after_s` (the cluster stopped answering the scheduled reads)
        is not placed on: ClusterUnavailable, a 503 with Retry-After, until Ray answers again.
        """
        read_at = self._nodes_read_at
        if read_at is None or time.monotonic() - read_at > self.stale_after_s:
            await self.refresh_nodes()
        return cluster_devices(self.nodes)

    def node_alive(self, node_id: str) -> bool | None:
        """Whether the node table has `node_id` alive; None before it was read."""
        if not self.nodes:
            return None
        return any(n.node_id == node_id and n.alive for n in self.nodes)

    # -- actors ----------------------------------------------------------------------------

    def _class(self) -> Any:
        if self._actor_class is None:
            self._actor_class = ray.remote(InstanceActor)
        return self._actor_class

    def _find(self, handle: str) -> Any | None:
        """The actor named `handle` (blocking), or None when Ray has no live actor of it."""
        actor = self._actors.get(handle)
        if actor is not None:
            return actor
        try:
            actor = ray.get_actor(handle, namespace=NAMESPACE)
        except ValueError:
            return None
        self._actors[handle] = actor
        return actor

    async def start(self, spec: InstanceSpec) -> Launched:
        name = actor_name(self.cluster, spec.instance_id, spec.generation)
        local = local_of(spec.device)
        env = {
            LABEL_ENV: f"{self.cluster}:{spec.instance_id}:{spec.generation}",
            LEASE_ENV: f"{self.lease_grace_s:g}",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
        if local.startswith("cuda"):
            # The GPU admission chose is the only one the agent sees.
            env["CUDA_VISIBLE_DEVICES"] = local.partition(":")[2] or "0"
            local = "cuda:0"
        args = serve_command(replace(spec, device=local).agent_args(0), [])
        options = actor_options(name, spec)

        command = self.command
        if command is None and spec.python is not None:
            # A handler API's own environment (the same path on every node).
            command = [spec.python, "-m", "instance_agent"]

        def launch() -> Launched:
            actor = self._create(name, options, args, env, command)
            try:
                endpoint = str(ray.get(actor.endpoint.remote(), timeout=PLACE_TIMEOUT_S))
            except ray.exceptions.GetTimeoutError as exc:
                _kill_quietly(actor)
                raise RuntimeFailed(
                    f"Ray did not place the instance on its node within {PLACE_TIMEOUT_S:.0f} s"
                ) from exc
            except ray.exceptions.RayActorError as exc:
                _kill_quietly(actor)
                raise RuntimeFailed(death_reason(str(exc))) from exc
            self._actors[name] = actor
            self._node_of[name] = str(node_of(spec.device))
            return Launched(handle=name, endpoint=endpoint)

        return await self._call("start the instance's actor", launch, PLACE_TIMEOUT_S + 10)

    def _create(
        self,
        name: str,
        options: dict[str, Any],
        args: list[str],
        env: dict[str, str],
        command: list[str] | None,
    ) -> Any:
        label = env[LABEL_ENV]
        try:
            return self._class().options(**options).remote(args, command, env, label)
        except ValueError:
            # The name is taken: an actor of this very instance and generation is left from an
            # attempt that died with its control plane; the database lets only one start run.
            old = self._find(name)
            if old is not None:
                _kill_quietly(old)
                _wait_released(name)
            self._actors.pop(name, None)
            return self._class().options(**options).remote(args, command, env, label)

    async def exited(self, handle: str) -> Exited | None:
        def look() -> Exited | None:
            actor = self._find(handle)
            if actor is None:
                node = self._node_of.get(handle)
                # A node of a replaced cluster may still be in the table until it is read again.
                if node is not None and (
                    node in self.replaced_nodes or self.node_alive(node) is False
                ):
                    return Exited(self.loss_reason(node))
                return Exited(GONE)
            try:
                code = ray.get(actor.poll.remote(), timeout=CALL_TIMEOUT_S)
                if code is None:
                    return None
                tail = ray.get(actor.tail.remote(LOG_TAIL_FOR_REASON), timeout=CALL_TIMEOUT_S)
            except ray.exceptions.GetTimeoutError:
                return None  # busy or not yet placed: the start's deadline covers it
            except ray.exceptions.RayActorError as exc:
                self._actors.pop(handle, None)
                return Exited(death_reason(str(exc)))
            return Exited(exit_reason(int(code), [str(line) for line in tail]))

        return await self._call("ask about the instance's actor", look, CALL_TIMEOUT_S * 2 + 5)

    async def stop(self, handle: str, grace_s: float) -> None:
        def stop() -> None:
            actor = self._find(handle)
            if actor is None:
                return
            with contextlib.suppress(ray.exceptions.RayError):
                ray.get(actor.terminate.remote(grace_s), timeout=grace_s + CALL_TIMEOUT_S)
            _kill_quietly(actor)
            self._actors.pop(handle, None)
            if not _wait_released(handle):
                raise RuntimeFailed("the instance's Ray actor could not be removed")

        await self._call("stop the instance's actor", stop, grace_s + CALL_TIMEOUT_S * 2 + 5)

    async def list(self) -> list[Listed]:
        def find() -> list[Listed]:
            named = ray.util.list_named_actors(all_namespaces=True)
            mine: list[tuple[str, int, int]] = []
            for entry in named:
                if not isinstance(entry, dict) or entry.get("namespace") != NAMESPACE:
                    continue
                parsed = parse_actor_name(self.cluster, str(entry.get("name")))
                if parsed is not None:
                    mine.append((str(entry["name"]), *parsed))
            asked: dict[str, Any] = {}
            for name, _, _ in mine:
                actor = self._find(name)
                if actor is not None:
                    asked[name] = actor.info.remote()
            ready, _ = ray.wait(list(asked.values()), num_returns=len(asked), timeout=5)
            infos: dict[str, dict[str, Any]] = {}
            for name, ref in asked.items():
                if ref in ready:
                    with contextlib.suppress(ray.exceptions.RayError):
                        infos[name] = ray.get(ref, timeout=1)
            found: list[Listed] = []
            for name, instance_id, generation in mine:
                info = infos.get(name)
                if info is not None:
                    self._node_of[name] = str(info.get("node"))
                endpoint = str(info["endpoint"]) if info else None
                found.append(Listed(instance_id, generation, name, endpoint))
            return found

        return await self._call("list the instances' actors", find, CALL_TIMEOUT_S + 10)

    async def logs(self, handle: str, tail_lines: int) -> str:
        def read() -> str:
            actor = self._find(handle)
            if actor is None:
                return ""
            try:
                lines = ray.get(actor.tail.remote(tail_lines), timeout=CALL_TIMEOUT_S)
            except ray.exceptions.RayActorError:
                return ""
            return "\n".join(str(line) for line in lines)

        return await self._call("read the instance's logs", read, CALL_TIMEOUT_S + 5)


def _kill_quietly(actor: Any) -> None:
    with contextlib.suppress(ray.exceptions.RayError, ValueError):
        ray.kill(actor, no_restart=True)


def _wait_released(name: str) -> bool:
    """Wait until Ray no longer knows a live actor of `name`; False if it still does."""
    deadline = time.monotonic() + REMOVE_WAIT_S
    while time.monotonic() < deadline:
        try:
            ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            return True
        time.sleep(0.1)
    return False


@contextlib.contextmanager
def _loopback_as_is(loopback: bool) -> Any:
    """Keep a loopback GCS address as it is while `ray.init` reads it.

    Ray rewrites 127.0.0.1 in the address to this host's outward address, where a cluster
    started with `--node-ip-address 127.0.0.1` does not listen (the driver then retried for
    minutes). Ray skips the rewrite only where it thinks clusters are unsupported; that flag
    is raised for the duration of the call and put back.
    """
    if not loopback:
        yield
        return
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved
