"""A PostgreSQL server of a fault test's own, which the test may stop and start again.

The session's shared server (tests/conftest.py) must never go down under other tests, so each
outage scenario runs its own: pgserver's binaries, a socket in its data directory.
"""

from __future__ import annotations

import os
import subprocess
import warnings
from pathlib import Path
from typing import Any


class OwnPostgres:
    """A PostgreSQL under `root` that `stop()` takes down and `start()` brings back."""

    def __init__(self, root: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pgserver

            self._server: Any = pgserver.get_server(root / "pg", cleanup_mode="delete")
        self.pgdata = root.resolve() / "pg"
        self.dsn: str = self._server.get_uri()
        info = self._server.get_postmaster_info()
        self._socket_dir = str(info.socket_dir)
        self.running = True

    def _pg_ctl(self, *args: str) -> None:
        from pgserver._commands import pg_ctl

        user = "pgserver" if os.geteuid() == 0 else None
        pg_ctl(list(args), pgdata=self.pgdata, user=user, timeout=30)

    def stop(self) -> None:
        """Stop the server at once (fast shutdown: sessions are cut, as in a crash or restart)."""
        self._pg_ctl("-w", "-m", "fast", "stop")
        self.running = False

    def start(self) -> None:
        self._pg_ctl(
            "-w",
            "-o",
            '-h ""',
            "-o",
            f"-k {self._socket_dir}",
            "-l",
            str(self.pgdata / "log"),
            "start",
        )
        self.running = True

    def close(self) -> None:
        if self.running:
            try:
                self.stop()
            except subprocess.CalledProcessError:
                pass
        # Nothing runs now; pgserver's own clean-up only removes the data directory.
        self._server._postmaster_info = None
        self._server.cleanup()
