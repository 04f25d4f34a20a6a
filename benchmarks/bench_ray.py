"""The ray runtime beside the process runtime, on a 3-node Ray cluster on loopback (issue 16).

1. Cold start: /model/load → RUNNING of the same (fake) agent through a Ray actor ÷ as a
   process; the median of REPEATS rounds each.
2. Added p50 of /model/run to an instance on another Ray node ÷ on the control plane's own
   node (the head). On one machine both are loopback, so this is Ray's placement costing
   nothing on the request path: requests go straight to the agent, not through Ray.
3. Placement: 20 loads of mixed sizes (a fixed seed) on nodes of 3, 2 and 2 GiB; no node may
   be overbooked (reserved ≤ usable on each), and the packing efficiency is the memory reserved
   ÷ the memory usable once the cluster is full.

Admission needs benchmark figures: they are written into the control plane's database.
Run: .venv/bin/python -m benchmarks.bench_ray
"""

from __future__ import annotations

import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from urllib.error import HTTPError

from benchmarks.harness import FAKE_AGENT, ROOT, ControlPlane, control_plane, percentile
from tests.fake_agent import write_fake_model

GiB = 1 << 30
GB = 1_000_000_000
REPEATS = 3
RUNS = 200
LOADS = 20
SIZES_GB = (0.3, 0.5, 0.8, 1.2)


def timed_load(cp: ControlPlane, model: str) -> float:
    started = time.perf_counter()
    cp.call("/model/load", {"model": model, "expirationPeriodSeconds": 600})
    cp.wait_running(model)
    elapsed = time.perf_counter() - started
    cp.call("/model/delete", {"model": model})
    return elapsed


def cold_starts(models: Path, **env: str) -> float:
    with control_plane([models], fake_agent=FAKE_AGENT, **env) as cp:
        cp.mark_measured(["bench/cold"], 50_000_000)
        return statistics.median(timed_load(cp, "bench/cold") for _ in range(REPEATS))


def p50_run_ms(cp: ControlPlane, model: str) -> float:
    times = []
    for i in range(RUNS):
        started = time.perf_counter()
        cp.call("/model/run", {"model": model, "prompt": f"p{i}"})
        times.append((time.perf_counter() - started) * 1000)
    return percentile(times, 0.5)


def try_load(cp: ControlPlane, model: str) -> bool:
    try:
        cp.call("/model/load", {"model": model, "expirationPeriodSeconds": 600})
    except HTTPError as exc:
        if exc.code in (422, 503):  # never fits / full now
            return False
        raise
    return True


def main() -> None:
    from ray.cluster_utils import Cluster

    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
    )
    node = {"node_ip_address": "127.0.0.1", "num_cpus": 1, "object_store_memory": 80 << 20}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={**node, "memory": 3 * GiB, "include_dashboard": False},
        shutdown_at_exit=False,
    )
    try:
        cluster.add_node(**node, memory=2 * GiB)
        cluster.add_node(**node, memory=2 * GiB)
        cluster.wait_for_nodes()
        head = cluster.head_node.node_id
        ray_env = {
            "MLCP_RUNTIME": "ray",
            "MLCP_RAY_ADDRESS": cluster.address,
            "MLCP_USE_GPUS": "false",
            "MLCP_INCLUDE_PACKAGED_MODELS": "false",
        }
        with tempfile.TemporaryDirectory(prefix="mlcp-bench-ray-") as tmp:
            models = Path(tmp) / "models"
            write_fake_model(models, "bench/cold", "ok")
            write_fake_model(models, "bench/local", "ok")
            write_fake_model(models, "bench/remote", "ok")
            sizes = random.Random(16).choices(SIZES_GB, k=LOADS)
            for i in range(LOADS):
                write_fake_model(models, f"bench/pack-{i}", "ok")

            process_s = cold_starts(
                models, MLCP_INCLUDE_PACKAGED_MODELS="false", MLCP_USE_GPUS="false"
            )
            ray_s = cold_starts(models, **ray_env)
            print(
                f"cold start, fake agent: ray {ray_s:.2f} s ÷ process {process_s:.2f} s "
                f"= {ray_s / process_s:.2f}x"
            )

            with control_plane([models], fake_agent=FAKE_AGENT, **ray_env) as cp:
                # 2.5 GB fits only the head (2.7 GB usable); 1.6 GB then only another node.
                cp.mark_measured(["bench/local"], int(2.5 * GB))
                cp.mark_measured(["bench/remote"], int(1.6 * GB))
                cp.call("/model/load", {"model": "bench/local"})
                local = cp.wait_running("bench/local")
                cp.call("/model/load", {"model": "bench/remote"})
                remote = cp.wait_running("bench/remote")
                assert local["node"] == head and remote["node"] != head, (local, remote)
                local_ms = p50_run_ms(cp, "bench/local")
                remote_ms = p50_run_ms(cp, "bench/remote")
                print(
                    f"/model/run p50: another node {remote_ms:.2f} ms ÷ the head "
                    f"{local_ms:.2f} ms = {remote_ms / local_ms:.2f}x"
                )
                for model in ("bench/local", "bench/remote"):
                    cp.call("/model/delete", {"model": model})

            with control_plane([models], fake_agent=FAKE_AGENT, **ray_env) as cp:
                for i, size in enumerate(sizes):
                    cp.mark_measured([f"bench/pack-{i}"], int(size * GB))
                placed = [i for i in range(LOADS) if try_load(cp, f"bench/pack-{i}")]
                for i in placed:
                    cp.wait_running(f"bench/pack-{i}", timeout_s=180)
                capacity = cp.call("/capacity")
                assert isinstance(capacity, dict)
                devices = capacity["devices"]
                over = [d["node"] for d in devices if d["reservedBytes"] > d["usableBytes"]]
                reserved = sum(d["reservedBytes"] for d in devices)
                usable = sum(d["usableBytes"] for d in devices)
                print(
                    f"placement: {len(placed)} of {LOADS} loads placed "
                    f"({sum(sizes):.1f} GB asked of {usable / GB:.2f} GB usable), "
                    f"overbooked nodes: {len(over)}; packing efficiency "
                    f"{reserved / GB:.2f} GB reserved ÷ {usable / GB:.2f} GB usable "
                    f"= {reserved / usable:.2f}"
                )
                assert not over, over
                for i in placed:
                    cp.call("/model/delete", {"model": f"bench/pack-{i}"})
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main()
