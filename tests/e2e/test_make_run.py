"""The server as `make run` starts it: a subprocess with the embedded PostgreSQL, driven by HTTP.

Follows vLLM's RemoteOpenAIServer: a free port, poll /health, tell "exited" from "too slow",
terminate → wait → kill, by PID only.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarker.catalog import DEMO_MODEL
from tests.e2e.server import (
    assert_graceful,
    http,
    postmaster_pid,
    server_env,
    start,
    stop,
    stop_postgres,
    wait_postgres_gone,
)
from tests.harness import free_port

KEY_PATTERN = re.compile(r"\bmlcp_[A-Za-z0-9_-]{20,}")


def generated_keys(text: str) -> list[str]:
    return KEY_PATTERN.findall(text)


def mlcp_cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "control_plane", *args],
        env=server_env(data_dir, free_port()),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    data = tmp_path / "mlcp"
    yield data
    # Whatever happened, leave no PostgreSQL running for this data dir.
    stop_postgres(data / "pg")


def test_make_run_survives_a_restart(data_dir: Path, tmp_path: Path) -> None:
    pgdata = data_dir / "pg"
    first = start(data_dir, tmp_path, "first")
    try:
        keys = generated_keys(first.out())
        assert len(keys) == 1, f"expected one announced admin key:\n{first.out()}"
        admin = keys[0]

        status, models = http("GET", first.base + "/model/list", admin)
        assert status == 200
        demo = {m["name"]: m for m in models}[DEMO_MODEL]
        assert (demo["requiredRAM"], demo["benchmarked"]) == (None, False)

        status, created = http("POST", first.base + "/admin/keys", admin, {"name": "e2e-user"})
        assert status == 201, created
        user = created["key"]
        assert http("GET", first.base + "/model/list", user)[0] == 200
        status, err = http("POST", first.base + "/admin/keys", user, {"name": "nope"})
        assert (status, err["code"]) == (403, "forbidden")

        # The CLI joins the same embedded server while the API runs ...
        listed = mlcp_cli(data_dir, "admin", "keys", "list")
        assert listed.returncode == 0, listed.stderr
        assert "e2e-user" in [k["name"] for k in json.loads(listed.stdout)]
        assert user not in listed.stdout and admin not in listed.stdout
        # ... and leaving does not stop it under the API.
        assert http("GET", first.base + "/ready")[0] == 200
        assert postmaster_pid(pgdata) is not None
    finally:
        code = stop(first)
    assert_graceful(code, first)
    # The API held the last handle: PostgreSQL stops with it.
    assert wait_postgres_gone(pgdata), "embedded PostgreSQL still runs after the server exited"

    second = start(data_dir, tmp_path, "second")
    try:
        assert generated_keys(second.out()) == [], second.out()
        status, listing = http("GET", second.base + "/admin/keys", admin)
        assert status == 200
        assert "e2e-user" in [k["name"] for k in listing]
        status, models = http("GET", second.base + "/model/list", user)
        assert status == 200 and DEMO_MODEL in [m["name"] for m in models]
        assert http("POST", second.base + "/admin/keys", user, {"name": "nope"})[0] == 403
    finally:
        code = stop(second)
    assert_graceful(code, second)
    assert wait_postgres_gone(pgdata), "embedded PostgreSQL still runs after the server exited"
