"""Measuring a model as a Ray task on a node of the device kind it measures (MLCP_RUNTIME=ray).

The task runs the very measurement a local job runs (`measure.measure`: the real agent as a
child, its memory peaks) on the node it is pinned to with a hard NodeAffinitySchedulingStrategy,
asking Ray for a CPU, the weights' bytes of memory and, for a GPU, one GPU. Only plain data
crosses between the worker and the task: the target as a dict in, the profile (or the failure's
code and message) as a dict out, so a failure becomes the same BenchmarkError a local one does.
Ray's own failures (the node lost, the task's worker killed by Ray's memory monitor) map onto
the same tree. Cancelling the job cancels the task; its worker process is killed, and the
measuring agent with it (it dies with its parent).

Ray is imported inside the functions: only deployments on a Ray cluster load it, and the worker
process on the node imports just this module and `measure`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from benchmarker import (
    BenchmarkError,
    HandlerFailed,
    LoadFailed,
    ModelNotFound,
    NeedsRemoteCode,
    OutOfMemory,
    UnsafeWeights,
)
from benchmarker.estimate import Phase, Profile
from benchmarker.measure import (
    CONCURRENCIES,
    LOAD_TIMEOUT_S,
    RUN_TIMEOUT_S,
    Target,
    device_kind,
    measure,
)

logger = logging.getLogger(__name__)

# The whole task, placement included: a load, three rounds of generations and a margin.
TASK_TIMEOUT_S = LOAD_TIMEOUT_S + 3 * RUN_TIMEOUT_S + 60
CALL_TIMEOUT_S = 10.0
ERRORS: dict[str, type[BenchmarkError]] = {
    cls.code: cls
    for cls in (ModelNotFound, UnsafeWeights, NeedsRemoteCode, OutOfMemory, HandlerFailed)
}


# -- decisions (pure) ------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeEntry:
    """One row of Ray's node table; control_plane/nodes.py builds its nodes from these too."""

    node_id: str
    alive: bool
    memory_bytes: int  # what Ray grants actors on it (its `memory` resource)
    gpus: int
    address: str = ""


def node_entries(table: Iterable[Mapping[str, Any]]) -> list[NodeEntry]:
    """Ray's node table (`ray.nodes()`) as the fields a placement reads; malformed rows left out."""
    out: list[NodeEntry] = []
    for entry in table:
        try:
            resources = entry.get("Resources") or {}
            out.append(
                NodeEntry(
                    str(entry["NodeID"]),
                    bool(entry.get("Alive")),
                    int(resources.get("memory", 0)),
                    int(resources.get("GPU", 0)),
                    str(entry.get("NodeManagerAddress") or ""),
                )
            )
        except (KeyError, TypeError, ValueError):
            continue
    return out


def choose_node(nodes: Iterable[NodeEntry], kind: str, need_bytes: int) -> str | None:
    """The node a measurement of `kind` ('cpu' or 'cuda') needing `need_bytes` runs on.

    A live node with at least that much memory (Ray's `memory` resource) and, for 'cuda', a GPU;
    the one with the most memory, so the measurement disturbs packed nodes least. None: none fits.
    """
    fit = [
        n
        for n in nodes
        if n.alive and n.memory_bytes >= need_bytes and (kind != "cuda" or n.gpus >= 1)
    ]
    if not fit:
        return None
    return max(fit, key=lambda n: (n.memory_bytes, n.node_id)).node_id


def task_options(node_id: str, kind: str, need_bytes: int) -> dict[str, Any]:
    """The task's resources, pinned to `node_id` (not soft: Ray must not move it elsewhere)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    options: dict[str, Any] = {
        "num_cpus": 1,
        "max_retries": 0,  # the job's retries are the worker's (with backoff)
        "retry_exceptions": False,
        "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=False),
    }
    if need_bytes > 0:
        options["memory"] = need_bytes
    if kind == "cuda":
        options["num_gpus"] = 1
    return options


def weights_bytes(target: Target) -> int:
    """The bytes of the target's weights (safetensors, or its GGUF file): a floor for a load."""
    folder = target.model_dir
    files = list(folder.glob("*.safetensors"))
    if target.gguf_file:
        files.append(folder / target.gguf_file)
    return sum(f.stat().st_size for f in files if f.is_file())


def target_json(target: Target) -> dict[str, Any]:
    return {
        "model": target.model,
        "model_dir": str(target.model_dir),
        "gguf_file": target.gguf_file,
        "device": target.device,
        "python": target.python,
        "engine": target.engine,
    }


def target_of(data: Mapping[str, Any]) -> Target:
    return Target(
        model=str(data["model"]),
        model_dir=Path(str(data["model_dir"])),
        gguf_file=data.get("gguf_file"),
        device=str(data.get("device") or "cpu"),
        python=data.get("python"),
        engine=data.get("engine"),
    )


def profile_json(profile: Profile) -> dict[str, Any]:
    return {
        "device_kind": profile.device_kind,
        "load_s": profile.load_s,
        "loaded_rss_bytes": profile.loaded_rss_bytes,
        "phases": [
            {
                "concurrency": p.concurrency,
                "peak_rss_bytes": p.peak_rss_bytes,
                "peak_gpu_bytes": p.peak_gpu_bytes,
                "tokens": p.tokens,
                "seconds": p.seconds,
            }
            for p in profile.phases
        ],
    }


def profile_of(data: Mapping[str, Any]) -> Profile:
    return Profile(
        str(data["device_kind"]),
        float(data["load_s"]),
        int(data["loaded_rss_bytes"]),
        tuple(
            Phase(
                int(p["concurrency"]),
                int(p["peak_rss_bytes"]),
                None if p.get("peak_gpu_bytes") is None else int(p["peak_gpu_bytes"]),
                int(p["tokens"]),
                float(p["seconds"]),
            )
            for p in data["phases"]
        ),
    )


def error_of(data: Mapping[str, Any]) -> BenchmarkError:
    """The BenchmarkError a task's failure stands for (a code not known here: a load error)."""
    message = str(data.get("message") or "")
    return ERRORS.get(str(data.get("code")), LoadFailed)(message or None)


def ray_failure(exc: BaseException, model: str, node_id: str) -> BenchmarkError:
    """What a failure of Ray itself (not of the model) means for the job."""
    import ray.exceptions

    if isinstance(exc, ray.exceptions.OutOfMemoryError):
        return OutOfMemory(
            f"Out of memory: Ray's memory monitor killed the measurement of {model} "
            f"on node {node_id}"
        )
    if isinstance(exc, ray.exceptions.NodeDiedError | ray.exceptions.LocalRayletDiedError):
        return LoadFailed(f"Load error: the Ray node {node_id} measuring {model} was lost")
    if isinstance(exc, ray.exceptions.WorkerCrashedError):
        return LoadFailed(
            f"Load error: the Ray worker measuring {model} on node {node_id} died "
            "(its node lost, or the process killed)"
        )
    if isinstance(exc, ray.exceptions.TaskUnschedulableError):
        return LoadFailed(f"Load error: Ray could not run the measurement on node {node_id}")
    if isinstance(exc, ray.exceptions.TaskCancelledError):
        return LoadFailed(f"Load error: the measurement of {model} on Ray was cancelled")
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return LoadFailed(f"Load error: the Ray task measuring {model} failed: {first[:300]}")


# -- the task (runs on the node) -------------------------------------------------------------


def measure_here(
    target: dict[str, Any], concurrencies: list[int], command: list[str] | None
) -> dict[str, Any]:
    """The Ray task: measure on this node; {"node", "pid"} and "profile" or "error" (plain data)."""
    import ray

    node = str(ray.get_runtime_context().get_node_id())
    out: dict[str, Any] = {"node": node, "pid": os.getpid()}
    folder = Path(str(target["model_dir"]))
    if not folder.is_dir():
        out["error"] = {
            "code": LoadFailed.code,
            "message": (
                f"Load error: the model folder {folder.name} is not on Ray node {node}: every "
                "node must see the model store at the same path (MLCP_MODEL_STORE on shared "
                "storage)"
            ),
        }
        return out
    try:
        profile = asyncio.run(
            measure(target_of(target), concurrencies=tuple(concurrencies), command=command)
        )
    except BenchmarkError as exc:
        out["error"] = {"code": exc.code, "message": exc.message}
    else:
        out["profile"] = profile_json(profile)
    return out


# -- the worker's side -----------------------------------------------------------------------


class RayMeasure:
    """A `measure_fn` for ModelBenchmark: each measurement a Ray task on a fitting node.

    Needs this process to be a Ray driver already (the control plane's runtime connects). The
    task asks for the target's weights in memory, the least a load of them needs (the model
    store is shared, so they are counted here), on a node that has that much.
    """

    def __init__(
        self,
        *,
        command: list[str] | None = None,
        concurrencies: tuple[int, ...] = CONCURRENCIES,
        timeout_s: float = TASK_TIMEOUT_S,
        reachable: Callable[[], bool] | None = None,
    ) -> None:
        # Whether the cluster's GCS answers now: no Ray call is left waiting on a dead one.
        self.reachable = reachable
        self.command = command
        self.concurrencies = concurrencies
        self.timeout_s = timeout_s
        self._remote: Any = None

    async def __call__(self, target: Target) -> Profile:
        import ray
        import ray.exceptions

        kind = device_kind(target.device)
        need_bytes = await asyncio.to_thread(weights_bytes, target)
        node_id = await self._node(target.model, kind, need_bytes)
        if kind == "cuda":
            # Ray makes the task's GPU the only one it sees.
            target = replace(target, device="cuda:0")
        options = task_options(node_id, kind, need_bytes)
        if self._remote is None:
            self._remote = ray.remote(measure_here)
        task = self._remote.options(**options)
        ref = await _blocking(
            "submit the measurement",
            lambda: task.remote(target_json(target), list(self.concurrencies), self.command),
        )
        logger.info("measuring %s as a Ray task on node %s", target.model, node_id)
        try:
            answer: dict[str, Any] = await asyncio.wait_for(_awaited(ref), self.timeout_s)
        except asyncio.CancelledError:
            await _cancel(ref)
            raise
        except TimeoutError as exc:
            await _cancel(ref)
            raise LoadFailed(
                f"Load error: the measurement of {target.model} on Ray node {node_id} did not "
                f"finish within {self.timeout_s:.0f} s"
            ) from exc
        except ray.exceptions.RayError as exc:
            logger.warning("the Ray task measuring %s failed: %s", target.model, exc)
            raise ray_failure(exc, target.model, node_id) from exc
        logger.info(
            "measured %s on Ray node %s (worker pid %s)",
            target.model,
            answer.get("node"),
            answer.get("pid"),
        )
        if "error" in answer:
            raise error_of(answer["error"])
        return profile_of(answer["profile"])

    async def _node(self, model: str, kind: str, need_bytes: int) -> str:
        import ray

        if not ray.is_initialized() or (
            self.reachable is not None and not await asyncio.to_thread(self.reachable)
        ):
            raise LoadFailed("Load error: not connected to the Ray cluster")
        table = await _blocking("list its nodes", ray.nodes)
        nodes = node_entries(table)
        node_id = choose_node(nodes, kind, need_bytes)
        if node_id is None:
            if any(n.alive and (kind != "cuda" or n.gpus) for n in nodes):
                raise OutOfMemory(
                    f"Out of memory: {model} needs more than {need_bytes / 1e9:.1f} GB, more "
                    "than any Ray node has"
                )
            raise LoadFailed(f"Load error: no live Ray node has a {kind} device to measure on")
        return node_id


async def _awaited(ref: Any) -> Any:
    return await ref


async def _blocking(what: str, fn: Any) -> Any:
    """A blocking Ray call in a thread under a deadline; a load error when Ray does not answer."""
    import ray.exceptions

    try:
        return await asyncio.wait_for(asyncio.to_thread(fn), CALL_TIMEOUT_S)
    except TimeoutError as exc:
        raise LoadFailed(f"Load error: the Ray cluster did not answer to {what}") from exc
    except (ray.exceptions.RayError, ConnectionError, OSError) as exc:
        raise LoadFailed(f"Load error: the Ray cluster could not {what}") from exc


async def _cancel(ref: Any) -> None:
    """Cancel the task, killing its worker (the measuring agent dies with it)."""
    import ray

    with contextlib.suppress(Exception):
        await asyncio.shield(
            asyncio.wait_for(
                asyncio.to_thread(ray.cancel, ref, force=True, recursive=True), CALL_TIMEOUT_S
            )
        )
