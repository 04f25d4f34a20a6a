"""Reaper lateness: how long after its expiry an idle instance is stopped, with 200 idle
instances of a minimal agent; reported beside the 1 s goal (the Bytez service allows 2 min)."""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

import asyncpg

from benchmarks.harness import ROOT, control_plane, percentile
from tests.fake_agent import write_fake_model

INSTANCES = 200
IDLE_AGENT = [sys.executable, str(ROOT / "benchmarks" / "idle_agent.py")]


async def _lateness(data_dir: Path) -> list[float]:
    conn = await asyncpg.connect(f"postgresql://postgres:@/postgres?host={data_dir / 'pg'}")
    try:
        rows = await conn.fetch(
            "SELECT extract(epoch FROM e.at - i.expires_at) AS late FROM instances i"
            " JOIN instance_events e ON e.instance_id = i.id AND e.to_state = 'STOPPED'"
        )
    finally:
        await conn.close()
    return [float(r["late"]) for r in rows]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp)
        names = [f"idle/m{i:03d}" for i in range(INSTANCES)]
        for name in names:
            write_fake_model(models, name)
        with control_plane(
            [models], fake_agent=IDLE_AGENT, MLCP_INCLUDE_PACKAGED_MODELS="false"
        ) as cp:
            cp.mark_measured(names, 1_000_000)
            t0 = time.monotonic()
            for i, name in enumerate(names):
                # Staggered expiries, long enough for all 200 to be running first.
                cp.call("/model/load", {"model": name, "expirationPeriodSeconds": 45 + i % 10})
            for name in names:
                cp.wait_running(name)
            started_s = time.monotonic() - t0
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                live = cp.call("/model/instances")
                assert isinstance(live, list)
                if not live:
                    break
                time.sleep(0.5)
            late = asyncio.run(_lateness(cp.data_dir))
    if len(late) != INSTANCES:
        raise RuntimeError(f"only {len(late)} of {INSTANCES} instances were reaped")
    p50, p99 = percentile(late, 0.5), percentile(late, 0.99)
    print(
        f"reaper lateness ({INSTANCES} idle instances): p50 {p50:.2f} s, p99 {p99:.2f} s, max "
        f"{max(late):.2f} s; p99 / 1 s goal = {p99:.2f} (Bytez allows 120 s: {p99 / 120:.4f})"
        f" [started {INSTANCES} in {started_s:.0f} s]"
    )


if __name__ == "__main__":
    main()
