"""`mlcp init` → `deploy` → both routes → `get` → `logs` → `delete`, as a user runs them.

A real control plane (embedded PostgreSQL, uvicorn, the real agent for handler projects) and the
CLI as a subprocess, with a user key `alice`: the API's owner.
"""

from __future__ import annotations

import asyncio
import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.cli.conftest import Cli
from tests.cli.test_cli import assert_clean_error
from tests.handler_projects import cortex_text_generator
from tests.harness import ADMIN_KEY, Api, free_port, make_settings, serve

NAME = "sentiment-analyser"
DEPLOY_TIMEOUT_S = 120.0


@pytest.fixture
async def live(db_dsn: str, tmp_path: Path) -> AsyncIterator[Api]:
    (tmp_path / "models").mkdir()
    settings = make_settings(
        db_dsn,
        tmp_path / "data",
        model_dirs=str(tmp_path / "models"),
        include_packaged_models=False,
        start_timeout_s=60.0,
    )
    async with serve(settings) as base, aiohttp.ClientSession() as session:
        yield Api(base, session, settings)


@pytest.fixture
async def alice(live: Api, tmp_path: Path) -> Cli:
    home = tmp_path / "home"
    home.mkdir()
    admin = Cli(live.base, ADMIN_KEY, home)
    created = await admin("keys", "create", "alice", "--scope", "user", "--json")
    assert created.code == 0, created
    return Cli(live.base, created.json()["key"], home)


async def call(api: Api, method: str, path: str, key: str | None, body: Any = None) -> Any:
    headers = {"x-api-key": key} if key else {}
    data = None if body is None else json.dumps(body)
    if data is not None:
        headers["Content-Type"] = "application/json"
    async with api.session.request(method, api.base + path, headers=headers, data=data) as resp:
        text = await resp.text()
        return resp.status, json.loads(text) if text else None


async def init(cli: Cli, where: Path, *args: str) -> Path:
    made = await cli("init", NAME, *args, cwd=where)
    assert made.code == 0, made
    return where / NAME


async def test_init_deploy_call_get_logs_delete(alice: Cli, live: Api, tmp_path: Path) -> None:
    project = await init(alice, tmp_path)
    deployed = await asyncio.wait_for(alice("deploy", cwd=project), DEPLOY_TIMEOUT_S)
    assert deployed.code == 0, deployed
    assert f"{NAME}: available (version 1)" in deployed.out
    assert f"POST {live.base}/{NAME}" in deployed.out
    assert "1 weights files: 1 sent, 0 already stored" in deployed.err  # model/README.md

    # Cortex's route: the handler's return value as JSON.
    status, body = await call(live, "POST", f"/{NAME}", alice.key, "so simple and quick!")
    assert status == 200, body
    assert body == {"words": 4, "echo": "so simple and quick!"}
    # CellStrat's: GET loads it, POST wraps the output.
    status, body = await call(live, "GET", f"/alice/{NAME}", alice.key)
    assert status == 200, body
    status, body = await call(live, "POST", f"/alice/{NAME}", alice.key, "so simple!")
    assert (status, body) == (
        200,
        {"statusCode": 200, "body": {"output": {"words": 2, "echo": "so simple!"}}},
    )

    listed = await alice("get", "--json")
    assert listed.code == 0, listed
    [api] = listed.json()
    assert (api["name"], api["owner"], api["status"], api["version"]) == (
        NAME,
        "alice",
        "available",
        1,
    )
    assert api["model"] == f"alice/{NAME}"
    table = await alice("get")
    lines = table.out.splitlines()
    assert lines[0].split() == ["NAME", "STATUS", "VERSION", "INSTANCE", "UNTIL"]
    assert lines[1].split()[:4] == [NAME, "available", "1", "RUNNING"]
    assert "from now" in lines[1]
    one = await alice("get", NAME, "--json")
    assert one.code == 0 and one.json()["instance"]["status"] == "RUNNING"

    # An admin names it by its owner.
    admin = Cli(live.base, ADMIN_KEY, alice.home)
    theirs = await admin("get", f"alice/{NAME}", "--json")
    assert theirs.code == 0 and theirs.json()["owner"] == "alice", theirs
    assert_clean_error(await admin("get", NAME), "api_not_found")  # not the admin's own

    logs = await alice("logs", NAME, "--json")
    assert logs.code == 0, logs
    assert logs.json()["model"] == f"alice/{NAME}" and isinstance(logs.json()["lines"], list)

    # Redeploying the unchanged project reuses the stored weights.
    again = await asyncio.wait_for(alice("deploy", cwd=project), DEPLOY_TIMEOUT_S)
    assert again.code == 0, again
    assert "0 sent, 1 already stored" in again.err
    assert f"{NAME}: available (version 2)" in again.out

    deleted = await alice("delete", NAME, "--json")
    assert deleted.code == 0 and deleted.json() == {"name": NAME, "status": "deleted"}
    status, body = await call(live, "POST", f"/{NAME}", alice.key, "hello")
    assert status == 404, body
    assert_clean_error(await alice("get", NAME), "api_not_found")
    assert (await alice("get", "--json")).json() == []


async def test_cortex_layout_deploys_by_its_spec_file(
    alice: Cli, live: Api, tmp_path: Path
) -> None:
    project = await init(alice, tmp_path, "--template", "cortex")
    spec = "sentiment_analyser.yaml"
    deployed = await asyncio.wait_for(alice("deploy", spec, cwd=project), DEPLOY_TIMEOUT_S)
    assert deployed.code == 0, deployed
    status, body = await call(live, "POST", f"/{NAME}", alice.key, {"text": "hello world"})
    assert (status, body) == (200, {"words": 2, "echo": {"text": "hello world"}})
    # From elsewhere, by the spec's path.
    assert (await alice("delete", NAME)).code == 0
    deployed = await asyncio.wait_for(alice("deploy", str(project / spec)), DEPLOY_TIMEOUT_S)
    assert deployed.code == 0, deployed


async def test_a_failing_handler_shows_its_reason(alice: Cli, tmp_path: Path) -> None:
    project = await init(alice, tmp_path)
    (project / "src" / "main.py").write_text("raise RuntimeError('no weights here')\n")
    failed = await asyncio.wait_for(alice("deploy", cwd=project), DEPLOY_TIMEOUT_S)
    assert failed.code == 1 and "Traceback" not in failed.err, failed
    # The stages as they passed, then the error with the reason.
    assert failed.err.splitlines()[0].startswith(f"{NAME}: uploaded version 1"), failed.err
    error = failed.err[failed.err.index("mlcp: ") :]
    assert error.startswith(f"mlcp: {NAME}: version 1 failed: "), failed.err
    assert "importing src/main.py failed: RuntimeError: no weights here" in error
    listed = await alice("get", NAME, "--json")
    assert listed.json()["status"] == "failed"
    assert "no weights here" in listed.json()["reason"]
    table = await alice("get", NAME)
    assert table.out.splitlines()[1].split()[:4] == [NAME, "failed", "1", "-"], table
    assert f"{NAME}: " in table.out and "RuntimeError: no weights here" in table.out


async def test_get_watch_follows_the_stages(alice: Cli, tmp_path: Path) -> None:
    project = await init(alice, tmp_path)
    uploaded = await alice("deploy", "--no-wait", "--json", cwd=project)
    assert uploaded.code == 0, uploaded
    assert uploaded.json()["status"] == "building"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "control_plane",
        "get",
        NAME,
        "--watch",
        "--json",
        env=alice.env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    seen: list[str] = []
    try:
        while "available" not in seen:
            line = await asyncio.wait_for(proc.stdout.readline(), DEPLOY_TIMEOUT_S)
            assert line, "mlcp get --watch ended"
            seen.append(json.loads(line)["status"])
    finally:
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 20) == 130
    assert seen[-1] == "available"
    assert set(seen) <= {"building", "benchmarking", "available"}

    # In a terminal: a live table, redrawn each second, until Ctrl-C.
    leader, follower = pty.openpty()
    live_table = subprocess.Popen(  # noqa: ASYNC220 (a pty needs the raw fds; returns at once)
        [sys.executable, "-m", "control_plane", "get", "--watch"],
        env=alice.env(),
        stdin=follower,
        stdout=follower,
        stderr=follower,
        close_fds=True,
    )
    os.close(follower)
    try:
        # Drawn, then redrawn a second later; then Ctrl-C.
        drawn = await asyncio.to_thread(read_pty, live_table, leader, 60, b"VERSION", 2)
        live_table.send_signal(signal.SIGINT)
        drawn += await asyncio.to_thread(read_pty, live_table, leader, 10)
        text = drawn.decode(errors="replace")
        code = await asyncio.to_thread(live_table.wait, 10)
    finally:
        if live_table.poll() is None:
            live_table.kill()
            live_table.wait(10)
        os.close(leader)
    assert code == 130, text
    assert "Traceback" not in text
    assert text.count("VERSION") >= 2, text
    assert NAME in text and "available" in text


def read_pty(
    proc: subprocess.Popen[bytes],
    leader: int,
    deadline_s: float,
    until: bytes | None = None,
    times: int = 1,
) -> bytes:
    """What the process writes to its terminal until it ends (or `until` came `times` times)."""
    seen = b""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if until is not None and seen.count(until) >= times:
            break
        ready = select.select([leader], [], [], 0.2)[0]
        if ready:
            try:
                chunk = os.read(leader, 65536)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
        elif proc.poll() is not None:
            break
    return seen


async def test_deploy_shows_upload_progress_in_a_terminal(alice: Cli, tmp_path: Path) -> None:
    project = await init(alice, tmp_path)
    (project / "model" / "weights.bin").write_bytes(os.urandom(3 << 20))
    leader, follower = pty.openpty()
    proc = subprocess.Popen(  # noqa: ASYNC220 (a pty needs the raw fds; returns at once)
        [sys.executable, "-m", "control_plane", "deploy"],
        cwd=project,
        env=alice.env(),
        stdin=follower,
        stdout=follower,
        stderr=follower,
        close_fds=True,
    )
    os.close(follower)
    try:
        seen = await asyncio.to_thread(read_pty, proc, leader, DEPLOY_TIMEOUT_S)
        code = await asyncio.to_thread(proc.wait, 20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        os.close(leader)
    text = seen.decode(errors="replace")
    assert code == 0, text
    assert "weights" in text and "code" in text and "3.1 MB" in text
    assert f"{NAME}: available" in text


async def test_bad_input_is_one_clear_line(alice: Cli, live: Api, tmp_path: Path) -> None:
    project = await init(alice, tmp_path)
    dead = f"http://127.0.0.1:{free_port()}"
    assert_clean_error(await alice("deploy", cwd=project, url=dead), "cannot reach", dead)
    assert_clean_error(await alice("deploy", cwd=project, url="localhost:8080"), "http://")
    assert_clean_error(await alice("deploy", cwd=project, key="mlcp_wrong"), "401")
    assert_clean_error(await alice("get", url=dead), "cannot reach")
    assert_clean_error(await alice("delete", "nothing-here"), "api_not_found")
    assert_clean_error(await alice("logs", "nothing-here"), "api_not_found")
    assert_clean_error(await alice("deploy", cwd=tmp_path), "no mlcp.yaml")
    assert_clean_error(await alice("deploy", "absent.yaml", cwd=project), "does not exist")

    (project / "model" / "big.bin").write_bytes(b"\0" * 10_000)
    too_big = await alice("deploy", cwd=project, extra_env={"MLCP_MAX_PROJECT_BYTES": "5000"})
    assert_clean_error(too_big, "MLCP_MAX_PROJECT_BYTES", "model/big.bin")
    (project / "model" / "big.bin").unlink()

    (tmp_path / "secret.txt").write_text("not yours")
    (project / "src" / "secret.txt").symlink_to(tmp_path / "secret.txt")
    assert_clean_error(await alice("deploy", cwd=project), "src/secret.txt", "outside the project")
    (project / "src" / "secret.txt").unlink()

    (project / "mlcp.yaml").write_text("name: model\nhandler: {path: src/main.py}\n")
    assert_clean_error(await alice("deploy", cwd=project), "reserved")
    # Nothing was deployed by any of these.
    assert (await alice("get", "--json")).json() == []


FAILING_ON_REQUEST = """\
from instance_agent.handler import handler


@handler
def inference_handler(inputs, context):
    if inputs == "boom":
        raise ValueError("boom-marker")
    return inputs
"""


async def test_logs_follow_an_apis_instance(alice: Cli, live: Api, tmp_path: Path) -> None:
    project = await init(alice, tmp_path)
    (project / "src" / "main.py").write_text(FAILING_ON_REQUEST)
    assert (await asyncio.wait_for(alice("deploy", cwd=project), DEPLOY_TIMEOUT_S)).code == 0
    assert (await call(live, "POST", f"/{NAME}", alice.key, "hi"))[0] == 200
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "control_plane",
        "logs",
        NAME,
        "-f",
        env=alice.env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    try:
        await asyncio.sleep(1.5)  # its first read is done: what follows is new
        status, body = await call(live, "POST", f"/{NAME}", alice.key, "boom")
        assert status == 502 and "boom-marker" in body["error"], body
        lines: list[str] = []
        while not any("ValueError: boom-marker" in line for line in lines):
            line = await asyncio.wait_for(proc.stdout.readline(), 20)
            assert line, "mlcp logs -f ended"
            lines.append(line.decode())
        assert any("Traceback" in line for line in lines)
    finally:
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 20) == 130


async def test_the_servers_own_cap_is_a_clear_error(
    db_dsn: str, tmp_path: Path, alice: Cli
) -> None:
    settings = make_settings(
        db_dsn,
        tmp_path / "small-data",
        model_dirs=str(tmp_path / "models"),
        include_packaged_models=False,
        max_project_bytes=4000,
    )
    async with serve(settings) as base:
        small = Cli(base, ADMIN_KEY, alice.home)
        project = await init(small, tmp_path)
        (project / "model" / "big.bin").write_bytes(os.urandom(200_000))
        refused = await small("deploy", cwd=project)
        assert refused.code == 1 and "Traceback" not in refused.err, refused
        assert "413" in refused.err or "closed the connection" in refused.err, refused


@pytest.mark.slow
@pytest.mark.timeout(400)
async def test_the_cortex_walkthrough_with_mlcp(alice: Cli, live: Api, tmp_path: Path) -> None:
    """The seed's commands with `mlcp` for `cortex`: deploy, get, request, logs, delete."""
    project = cortex_text_generator(tmp_path / "text-generator")
    deployed = await asyncio.wait_for(alice("deploy", "text_generator.yaml", cwd=project), 300)
    assert deployed.code == 0, deployed
    got = await alice("get", "text-generator", "--json")
    assert got.code == 0 and got.json()["status"] == "available", got
    status, body = await call(live, "POST", "/text-generator", alice.key, {"text": "hello world"})
    assert status == 200 and body["generated_text"].startswith("hello world"), body
    logs = await alice("logs", "text-generator")
    assert logs.code == 0, logs
    assert (await alice("delete", "text-generator")).code == 0
