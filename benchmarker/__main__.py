"""`python -m benchmarker worker`: a standalone benchmark worker, to scale measuring out.

It reads the same MLCP_* settings as the control plane and works on the same queue: the
embedded PostgreSQL under MLCP_DATA_DIR, or MLCP_DATABASE_URL. SIGTERM or Ctrl-C stops it after
the current job, or hands that job back to the queue if it takes longer than the deadline.
Where instances are forked from a zygote (the process runtime's default), the worker starts
a zygote of its own and forks its measuring agents from it, as the control plane's worker does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from benchmarker.measure import agent_env
from benchmarker.settings import BenchmarkerSettings
from benchmarker.worker import SHUTDOWN_DEADLINE_S, ModelBenchmark, Worker
from db import DatabaseError
from db.database import open_database
from db.pool import create_pool
from instance_agent.zygote_client import Zygote, ZygoteUnavailable

logger = logging.getLogger("benchmarker")


async def _serve(settings: BenchmarkerSettings, args: argparse.Namespace) -> int:
    async with open_database(settings) as dsn, _zygote(settings) as zygote:
        pool = await create_pool(dsn, max_size=4)
        try:
            worker = Worker(pool, ModelBenchmark(pool, settings, device=args.device, zygote=zygote))
            if args.once:
                job = await worker.run_once()
                return 0 if job is not None else 1
            await _run_until_signalled(worker, args.grace_s)
        finally:
            await pool.close()
    return 0


@contextlib.asynccontextmanager
async def _zygote(settings: BenchmarkerSettings) -> AsyncIterator[Zygote | None]:
    """This worker's own zygote, importing torch in the background from the start; None where
    instances are not forked."""
    if not settings.measures_forked:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="mlcp-bench-zygote-") as run_dir:
        logs = settings.data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        zygote = Zygote(Path(run_dir), agent_env(), logs / f"benchmark-zygote-{os.getpid()}.log")
        warming = asyncio.create_task(_warm(zygote))
        try:
            yield zygote
        finally:
            warming.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await warming
            await zygote.close()


async def _warm(zygote: Zygote) -> None:
    try:
        await zygote.ensure_started()
    except ZygoteUnavailable as exc:
        logger.warning("agent zygote: %s; measuring in fresh processes", exc)


async def _run_until_signalled(worker: Worker, grace_s: float) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    logger.info("benchmark worker %s waiting for jobs", worker.worker_id)
    task = asyncio.create_task(worker.run(stop), name="mlcp-benchmark-worker")
    stopping = asyncio.create_task(stop.wait(), name="mlcp-worker-stop")
    await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    try:
        await asyncio.wait_for(asyncio.shield(task), grace_s)
    except TimeoutError:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    finally:
        stopping.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarker", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    worker = sub.add_parser("worker", help="claim and measure model jobs until stopped")
    worker.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (as instances run)")
    worker.add_argument("--once", action="store_true", help="process one due job, then exit")
    worker.add_argument(
        "--grace-s",
        type=float,
        default=SHUTDOWN_DEADLINE_S,
        help="on SIGTERM, how long the current job may finish before it is handed back",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return asyncio.run(_serve(BenchmarkerSettings(), args))
    except DatabaseError as exc:
        print(f"mlcp-benchmarker: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
