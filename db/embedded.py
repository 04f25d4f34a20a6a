"""The embedded PostgreSQL used when MLCP_DATABASE_URL is unset (the `pgserver` package)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

from db import EmbeddedServerError

logger = logging.getLogger(__name__)


class EmbeddedPostgres:
    """A PostgreSQL server living under `data_dir`, shared by every process that opens it.

    pgserver counts the processes holding a handle and stops the server when the last one exits,
    so the CLI and the API server can use one data directory at the same time.
    """

    def __init__(self, data_dir: Path) -> None:
        self.pgdata = data_dir.resolve() / "pg"
        self._server: object | None = None

    def start(self) -> str:
        """Start (or join) the server and return its connection URL."""
        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        try:
            with warnings.catch_warnings():
                # platformdirs warns when XDG_RUNTIME_DIR is unset (every CI box); harmless.
                warnings.simplefilter("ignore")
                from pgserver.postgres_server import get_server

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
