"""`make bench`: run every benchmark; each prints its figures as ratios against a baseline."""

from __future__ import annotations

import importlib
import sys
import time
import traceback

BENCHMARKS = (
    "benchmarks.bench_proxy",
    "benchmarks.bench_reaper",
    "benchmarks.bench_batching",
    "benchmarks.bench_memory",
    "benchmarks.bench_cold_start",
    "benchmarks.bench_load",
    "benchmarks.bench_events",
    "benchmarks.bench_openai",
    "benchmarks.bench_grpc",
    "benchmarks.bench_limits",
    "benchmarks.bench_deploy",
    "benchmarks.bench_async",
    "benchmarks.bench_apis",
    "benchmarks.bench_ray",
    "benchmarks.bench_peers",
)


def main() -> int:
    failed = 0
    for name in BENCHMARKS:
        print(f"== {name}", flush=True)
        started = time.perf_counter()
        try:
            importlib.import_module(name).main()
        except Exception:
            failed += 1
            traceback.print_exc()
        print(f"   ({time.perf_counter() - started:.0f} s)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
