"""A control plane SIGKILLed with the embedded PostgreSQL: the next one adopts the server and
its clean exit stops it (issue 17, defect 5)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.server import (
    assert_graceful,
    http,
    postmaster_pid,
    start,
    stop,
    stop_postgres,
    wait_postgres_gone,
)

pytestmark = pytest.mark.faults


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    data = tmp_path / "mlcp"
    yield data
    stop_postgres(data / "pg")


def test_server_left_by_a_sigkilled_owner_is_adopted_and_stopped(
    data_dir: Path, tmp_path: Path
) -> None:
    pgdata = data_dir / "pg"
    first = start(data_dir, tmp_path, "first")
    first.proc.kill()
    first.proc.wait(10)
    pid = postmaster_pid(pgdata)
    assert pid is not None, "the embedded PostgreSQL died with its owner"
    handles = json.loads((pgdata / ".handle_pids.json").read_text())
    assert first.proc.pid in handles, "the dead owner's handle should be what this test exercises"

    second = start(data_dir, tmp_path, "second")
    try:
        assert http("GET", second.base + "/ready")[0] == 200
        assert postmaster_pid(pgdata) == pid, "the running server should be adopted, not replaced"
        assert first.proc.pid not in json.loads((pgdata / ".handle_pids.json").read_text())
    finally:
        code = stop(second)
    assert_graceful(code, second)
    assert wait_postgres_gone(pgdata), "PostgreSQL still runs after the adopting server exited"
