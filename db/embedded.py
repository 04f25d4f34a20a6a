"""The embedded PostgreSQL used when MLCP_DATABASE_URL is unset (the `pgserver` package)."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import psutil

from db import EmbeddedServerError

logger = logging.getLogger(__name__)

# pgserver's list of processes holding a handle on the server, inside the data directory.
HANDLES_FILE = ".handle_pids.json"


def live_handles(pids: list[int]) -> list[int]:
    """The handle holders of `pids` that still run (a SIGKILLed owner never removes itself)."""
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.Error:
            continue
    return alive


def prune_dead_handles(pgdata: Path) -> list[int]:
    """Drop dead processes from pgserver's handle list; return the pids dropped.

    Without this a control plane killed with SIGKILL stays in the list forever, so the server
    it started is never the last handle's to stop and runs on after every later clean exit.
    The caller holds pgserver's inter-process lock.
    """
    path = pgdata / HANDLES_FILE
    try:
        pids = [int(p) for p in json.loads(path.read_text())]
    except (OSError, ValueError, TypeError):
        return []
    alive = live_handles(pids)
    if alive != pids:
        path.write_text(json.dumps(alive))
    return [p for p in pids if p not in alive]


class EmbeddedPostgres:
    """A PostgreSQL server living under `data_dir`, shared by every process that opens it.

    pgserver counts the processes holding a handle and stops the server when the last one exits,
    so the CLI and the API server can use one data directory at the same time. A server left
    running by an owner that died (SIGKILL) is adopted: its dead handle is dropped, so this
    process's clean exit stops it.
    """

    def __init__(self, data_dir: Path) -> None:
        self.pgdata = data_dir.resolve() / "pg"
        self._server: object | None = None

    def start(self) -> str:
        """Start (or join, or adopt) the server and return its connection URL."""
        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        try:
            with warnings.catch_warnings():
                # platformdirs warns when XDG_RUNTIME_DIR is unset (every CI box); harmless.
                warnings.simplefilter("ignore")
                from pgserver.postgres_server import PostgresServer, get_server

                with PostgresServer._lock:
                    dropped = prune_dead_handles(self.pgdata)
                if dropped:
                    logger.warning(
                        "embedded PostgreSQL under %s: adopted from dead owner(s) %s",
                        self.pgdata,
                        dropped,
                    )
                server = get_server(self.pgdata, cleanup_mode="stop")
        except Exception as exc:
            raise EmbeddedServerError(
                f"could not start the embedded PostgreSQL under {self.pgdata}: "
                f"{type(exc).__name__}; see {self.pgdata / 'log'}"
            ) from exc
        self._server = server
        uri: str = server.get_uri()
        logger.info("embedded PostgreSQL ready under %s", self.pgdata)
        return uri

    def stop(self) -> None:
        """Release this process's handle; the last handle stops the server."""
        if self._server is not None:
            self._server.cleanup()  # type: ignore[attr-defined]
            self._server = None
