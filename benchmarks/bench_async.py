"""Async requests: how fast the PostgreSQL queue turns over, and what the async path costs.

1. Queue throughput: no-op requests submitted, claimed, started and finished per second by two
   worker processes (as two control planes) on one database, each running the control plane's
   own queue loop (`control_plane/async_queue.py`: batched claims, grouped starts and finishes,
   heartbeats) at MLCP_ASYNC_WORKERS' default, and submitted through the submit route's grouped
   insert, ÷ procrastinate (a PostgreSQL job queue) doing the same with two worker processes on
   the same server, side by side. Goal: mlcp ≥ 1,000/s.
2. A short text generation through `POST /v1/async/...` until `success` ÷ the same request through
   `/model/run`, against a control plane with a fast fake agent.

procrastinate is installed by the benchmark into its own folder (never into the project's
environment); without network access its line is skipped with the reason.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.request import Request, urlopen

import asyncpg

from benchmarks.harness import ADMIN_KEY, FAKE_AGENT, ROOT, control_plane, percentile
from control_plane.async_queue import GroupCommit, QueueWorker
from control_plane.settings import Settings
from db import async_queries as aq
from db import queries
from db.embedded import EmbeddedPostgres
from db.migrate import migrate
from db.pool import create_pool
from db.rows import AsyncRequestRow
from tests.fake_agent import write_fake_model

REQUESTS = 4000
# Requests one control plane runs at once: MLCP_ASYNC_WORKERS, at its default.
CAPACITY = Settings.model_fields["async_workers"].default
LEASE_S = Settings.model_fields["async_lease_s"].default
# Clients submitting at once.
SUBMITTERS = 8
KEYS = 50
MODEL = "bench/async-noop"
PEERS = Path(tempfile.gettempdir()) / "mlcp-bench-peers" / "procrastinate"
GENERATIONS = 40
PEER_PACKAGES = ("procrastinate", "psycopg[binary]", "psycopg-pool")


# -- mlcp's queue ------------------------------------------------------------------------------


async def _worker_process(dsn: str, total: int) -> None:
    """One 'control plane': the control plane's own queue loop (async_queue.QueueWorker, with
    its batched claims, grouped starts and finishes, and heartbeats) running a handler that
    starts and finishes each request, until all are done."""
    pool = await create_pool(dsn, min_size=2, max_size=10)

    async def noop(row: AsyncRequestRow) -> None:
        if await worker.start(row):
            await worker.finish(row, "success", {"text": ""})

    worker = QueueWorker(pool, f"bench-{os.getpid()}", CAPACITY, LEASE_S, noop)
    stop = asyncio.Event()

    async def until_done() -> None:
        while True:
            if await _succeeded(pool) >= total:
                stop.set()
                return
            await asyncio.sleep(0.25)

    await asyncio.gather(worker.run(stop), until_done())
    await pool.close()


async def _succeeded(pool: asyncpg.Pool) -> int:
    return int(await pool.fetchval("SELECT count(*) FROM async_requests WHERE state = 'success'"))


async def _prepare(dsn: str) -> list[int]:
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn)
        await queries.upsert_discovered_model(conn, MODEL, "text-generation", "dir", "/x", None, 1)
        keys = []
        for i in range(KEYS):
            key = await queries.insert_key(conn, f"bench-{i}", "mlcp_x", os.urandom(32), "user")
            keys.append(key.id)
        return keys
    finally:
        await conn.close()


async def mlcp_queue_rate(dsn: str) -> float:
    keys = await _prepare(dsn)
    workers = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-m", "benchmarks.bench_async", "worker", dsn, str(REQUESTS), cwd=ROOT
        )
        for _ in range(2)
    ]
    pool = await create_pool(dsn, min_size=8, max_size=8)
    try:
        await asyncio.sleep(1.0)  # both workers connected and polling
        # Timed by the database's clock, from here to the last finish, so how often this
        # process looks whether all are done does not change the figure.
        started = await pool.fetchval("SELECT clock_timestamp()")
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(REQUESTS):
            queue.put_nowait(i)
        # The submit route's own path: concurrent submits are stored a burst per statement.
        store = GroupCommit(functools.partial(aq.insert_async_requests, pool))

        async def submit() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                new = aq.NewAsyncRequest(
                    uuid.uuid4(), keys[i % KEYS], MODEL, {"prompt": "x"}, REQUESTS
                )
                assert await store(new) is not None

        await asyncio.gather(*(submit() for _ in range(SUBMITTERS)))
        while True:
            if await _succeeded(pool) >= REQUESTS:
                break
            await asyncio.sleep(0.05)
        last = await pool.fetchval("SELECT max(finished_at) FROM async_requests")
        elapsed = (last - started).total_seconds()
    finally:
        await pool.close()
        for proc in workers:
            await asyncio.wait_for(proc.wait(), 60)
    return REQUESTS / elapsed


# -- procrastinate, the baseline --------------------------------------------------------------

_PEER_SCRIPT = """
import asyncio, sys, time
import procrastinate
import psycopg

dsn, role, total = sys.argv[1], sys.argv[2], int(sys.argv[3])
app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=dsn))

@app.task(name="noop")
async def noop() -> None:
    return None

async def main() -> None:
    async with app.open_async():
        if role == "schema":
            await app.schema_manager.apply_schema_async()
        elif role == "worker":
            await app.run_worker_async(concurrency=8, wait=True, install_signal_handlers=True)
        else:
            started = time.perf_counter()
            sem = asyncio.Semaphore(8)
            async def one() -> None:
                async with sem:
                    await noop.defer_async()
            await asyncio.gather(*(one() for _ in range(total)))
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                while True:
                    cur = await conn.execute(
                        "SELECT count(*) FROM procrastinate_jobs WHERE status = 'succeeded'")
                    done = (await cur.fetchone())[0]
                    if done >= total:
                        break
                    await asyncio.sleep(0.05)
            print(total / (time.perf_counter() - started))

asyncio.run(main())
"""


def _install_peer() -> str | None:
    """Install procrastinate into the benchmark's own folder; the reason when it cannot be."""
    if (PEERS / "procrastinate").is_dir():
        return None
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--target", str(PEERS), *PEER_PACKAGES],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if proc.returncode != 0:
        return (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
    return None


def procrastinate_rate(dsn: str) -> float:
    env = {**os.environ, "PYTHONPATH": str(PEERS)}
    script = Path(tempfile.mkdtemp(prefix="mlcp-bench-")) / "peer.py"
    script.write_text(_PEER_SCRIPT)

    def run(role: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, str(script), dsn, role, str(REQUESTS)],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )

    if run("schema").wait(120) != 0:
        raise RuntimeError("procrastinate's schema could not be applied")
    workers = [run("worker") for _ in range(2)]
    try:
        time.sleep(2.0)
        submitter = run("submit")
        out, _ = submitter.communicate(timeout=900)
        return float(out.strip().splitlines()[-1])
    finally:
        for proc in workers:
            proc.terminate()
            proc.wait(60)


# -- the async path against /model/run --------------------------------------------------------


def _call(base: str, method: str, path: str, body: object | None = None) -> Any:
    req = Request(
        base + path,
        data=json.dumps(body).encode() if body is not None else None,
        method=method,
        headers={"Authorization": f"Key {ADMIN_KEY}", "Content-Type": "application/json"},
    )
    with urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def async_overhead() -> tuple[float, float]:
    with tempfile.TemporaryDirectory(prefix="mlcp-bench-") as tmp:
        models = Path(tmp) / "models"
        name = "fake/async-bench"
        write_fake_model(models, name, mode="ok", delay_s=0.002)
        with control_plane([models], fake_agent=FAKE_AGENT) as cp:
            cp.mark_measured([name], 50_000_000)
            cp.call("/model/load", {"model": name, "expirationPeriodSeconds": 600})
            cp.wait_running(name)
            body = {"model": name, "prompt": "hello", "params": {"max_new_tokens": 4}}
            sync_s, async_s = [], []
            for _ in range(GENERATIONS):
                t0 = time.perf_counter()
                cp.call("/model/run", body)
                sync_s.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                submitted = _call(
                    cp.base, "POST", f"/v1/async/{name}", {"input": {"prompt": "hello"}}
                )
                poll = submitted["response"]["urls"]["GET"]
                path = poll[poll.index("/v1/") :]
                while _call(cp.base, "GET", path)["status"] not in ("success", "failed"):
                    time.sleep(0.002)
                async_s.append(time.perf_counter() - t0)
    return percentile(async_s, 0.5), percentile(sync_s, 0.5)


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="mlcp-bench-pg-") as tmp:
        server = EmbeddedPostgres(Path(tmp))
        dsn = server.start()
        try:
            asyncio.run(_create(dsn, "mlcp_queue"))
            asyncio.run(_create(dsn, "peer_queue"))
            ours = asyncio.run(mlcp_queue_rate(_db(dsn, "mlcp_queue")))
            print(f"queue: mlcp {ours:.0f} requests/s with 2 workers (goal >= 1000)")
            reason = _install_peer()
            if reason is not None:
                print(f"queue: procrastinate skipped: {reason}")
            else:
                peer = procrastinate_rate(_db(dsn, "peer_queue"))
                ratio = ours / peer
                print(f"queue: procrastinate {peer:.0f} jobs/s; mlcp ÷ procrastinate {ratio:.2f}")
        finally:
            server.stop()
    async_p50, sync_p50 = async_overhead()
    print(
        f"short generation: async to success p50 {async_p50 * 1000:.1f} ms, /model/run p50 "
        f"{sync_p50 * 1000:.1f} ms; async ÷ /model/run {async_p50 / sync_p50:.2f}"
    )


async def _create(dsn: str, name: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


def _db(dsn: str, name: str) -> str:
    base, _, query = dsn.partition("?")
    return base.rsplit("/", 1)[0] + "/" + name + ("?" + query if query else "")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "worker":
        asyncio.run(_worker_process(sys.argv[2], int(sys.argv[3])))
    else:
        main()
