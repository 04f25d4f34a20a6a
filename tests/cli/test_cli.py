"""Every `mlcp` command against a live control plane, as a user runs it: a subprocess."""

from __future__ import annotations

import asyncio
import os
import pty
import select
import signal
import subprocess
import sys
import time
from json import loads as json_loads
from pathlib import Path

from tests.cli.conftest import Cli, Result, cli_env
from tests.harness import Api, app_state, free_port, wait_status


def assert_clean_error(result: Result, *needles: str) -> None:
    """Exit 1, one clear line naming the problem, never a traceback."""
    code, err = result.code, result.err
    assert code == 1, result
    assert "Traceback" not in err, err
    assert err.startswith("mlcp: "), err
    for needle in needles:
        assert needle in err, err


async def test_list_shows_the_catalog_as_table_and_json(cli: Cli) -> None:
    listed = await cli("list", "--json")
    assert listed.code == 0, listed
    by_name = {m["name"]: m for m in listed.json()}
    assert by_name["fake/ok"]["benchmarked"] is True
    assert by_name["fake/fresh"]["benchmarked"] is False
    table = await cli("list")
    assert table.code == 0, table
    header = table.out.splitlines()[0].split()
    assert header[:2] == ["NAME", "TASK"] and "BENCHMARKED" in header
    ok_line = next(line for line in table.out.splitlines() if line.startswith("fake/ok"))
    assert "0.05 GB" in ok_line and ok_line.split()[-1] == "yes"


async def test_load_ps_status_run_logs_stop(cli: Cli, capi: Api) -> None:
    loaded = await cli("load", "fake/ok", "-c", "2", "--expire", "5m", "--json")
    assert loaded.code == 0, loaded
    assert loaded.json()["concurrency"] == 2 and loaded.json()["expirationPeriodSeconds"] == 300
    await wait_status(capi, "fake/ok", "RUNNING")

    ps = await cli("ps", "--json")
    assert ps.code == 0 and [i["model"] for i in ps.json()] == ["fake/ok"]
    assert ps.json()[0]["device"] == "cpu" and ps.json()[0]["reservedBytes"] > 0
    table = await cli("ps")
    lines = table.out.splitlines()
    header = "NAME STATUS CONCURRENCY IN FLIGHT MEMORY DEVICE UNTIL"
    assert lines[0].split() == header.split()
    assert lines[1].startswith("fake/ok") and "RUNNING" in lines[1] and "from now" in lines[1]

    status = await cli("status", "fake/ok", "--json")
    assert status.code == 0 and status.json()["status"] == "RUNNING"
    assert [h["to"] for h in status.json()["history"]] == ["RUNNING"]
    table = await cli("status", "fake/ok")
    assert "RUNNING" in table.out and "concurrency" in table.out

    ran = await cli("run", "fake/ok", "hello there")
    assert ran.code == 0, ran
    assert ran.out.strip() == "".join(f"tok{i} " for i in range(4)).strip()
    ran = await cli("run", "fake/ok", "hello", "--json")
    assert ran.code == 0 and ran.json()["output"] == "echo: hello"

    logs = await cli("logs", "fake/ok", "--json")
    assert logs.code == 0 and isinstance(logs.json()["lines"], list)

    stopped = await cli("stop", "fake/ok", "--json")
    assert stopped.code == 0 and stopped.json()["status"] == "STOPPED"
    assert (await cli("ps", "--json")).json() == []
    again = await cli("stop", "fake/ok")
    assert again.code in (0, 1) and "Traceback" not in again.err


async def test_pull_shows_progress_in_a_terminal_until_available(cli: Cli) -> None:
    """In a pseudo-terminal the spinner shows the job's message until "Model available"."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(  # noqa: ASYNC220 (a pty needs the raw fds; returns at once)
        [sys.executable, "-m", "control_plane", "pull", "fake/fresh"],
        env=cli.env(),
        stdin=follower,
        stdout=follower,
        stderr=follower,
        close_fds=True,
    )
    os.close(follower)
    seen = b""
    deadline = time.monotonic() + 60
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            ready = await asyncio.to_thread(select.select, [leader], [], [], 0.2)
            if ready[0]:
                try:
                    seen += os.read(leader, 65536)
                except OSError:
                    break
        code = await asyncio.to_thread(proc.wait, 10)
        while True:
            ready = select.select([leader], [], [], 0.1)
            if not ready[0]:
                break
            try:
                chunk = os.read(leader, 65536)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        os.close(leader)
    text = seen.decode(errors="replace")
    assert code == 0, text
    assert "Model is already queued" in text  # the progress line, while it was measured
    assert "fake/fresh: Model available" in text
    listed = await cli("list", "--json")
    assert next(m for m in listed.json() if m["name"] == "fake/fresh")["benchmarked"] is True


async def test_run_streams_and_ctrl_c_cancels_on_the_server(cli: Cli, capi: Api) -> None:
    assert (await cli("load", "fake/slow")).code == 0
    await wait_status(capi, "fake/slow", "RUNNING")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "control_plane",
        "run",
        "fake/slow",
        "a long story",
        env=cli.env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    first = await asyncio.wait_for(proc.stdout.read(4), 20)
    assert first.startswith(b"tok0")  # streaming: the first token came before the rest
    state = app_state(capi)
    instance = (await state.pool.fetchrow("SELECT id FROM instances WHERE model = 'fake/slow'"))[
        "id"
    ]
    assert state.activity.in_flight(instance) == 1
    proc.send_signal(signal.SIGINT)
    code = await asyncio.wait_for(proc.wait(), 20)
    assert code == 130
    # The connection closed: the control plane ended the request long before the 8 s it takes.
    for _ in range(100):
        if state.activity.in_flight(instance) == 0:
            break
        await asyncio.sleep(0.05)
    assert state.activity.in_flight(instance) == 0
    err = (await proc.stderr.read()).decode() if proc.stderr else ""
    assert "Traceback" not in err


async def test_keys_create_list_revoke(cli: Cli) -> None:
    created = await cli("keys", "create", "alice", "--scope", "user", "--json")
    assert created.code == 0, created
    body = created.json()
    assert body["name"] == "alice" and body["key"].startswith("mlcp_")
    listed = await cli("keys", "list", "--json")
    assert "alice" in [k["name"] for k in listed.json()]
    # The new key works, and a user key may not manage keys (the server's message is shown).
    assert (await cli("list", "--json", key=body["key"])).code == 0
    assert_clean_error(await cli("keys", "list", key=body["key"]), "admin")
    revoked = await cli("keys", "revoke", str(body["id"]), "--json")
    assert revoked.code == 0 and revoked.json()["revoked"] is not None
    table = await cli("keys", "list")
    assert "revoked" in table.out
    assert_clean_error(await cli("keys", "revoke", "999999"), "no such key")


async def test_config_file_gives_url_and_key(cli: Cli) -> None:
    (cli.home / "mlcp").mkdir()
    (cli.home / "mlcp" / "config.toml").write_text(f'url = "{cli.url}"\nkey = "{cli.key}"\n')
    listed = await cli("list", "--json", url=None, key=None)
    assert listed.code == 0, listed
    (cli.home / "mlcp" / "config.toml").write_text("url = [broken")
    assert_clean_error(await cli("list", url=None, key=None), "not valid TOML")


async def test_errors_are_one_clear_line_with_exit_1(cli: Cli) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    assert_clean_error(await cli("ps", url=dead), "cannot reach", dead)
    assert_clean_error(await cli("list", url="not a url"), "http:// or https://")
    assert_clean_error(await cli("list", url="ftp://127.0.0.1:1"), "http:// or https://")
    assert_clean_error(await cli("list", key="mlcp_wrong"), "401")
    assert_clean_error(await cli("list", key=None), "401")
    assert_clean_error(await cli("load", "nobody/nothing"), "not in the catalog")
    assert_clean_error(await cli("run", "fake/ok", "hi"), "not loaded")
    assert_clean_error(await cli("status", "no/such"), "not in the catalog")
    assert_clean_error(await cli("pull", "bad id with spaces"))
    # A URL that answers, but is not a control plane: the JSON envelope is missing.
    assert_clean_error(await cli("list", url=cli.url + "/nothing/here"), "404")


async def test_usage_errors_exit_2(cli: Cli) -> None:
    for args in (
        ("load", "fake/ok", "-c", "0"),
        ("load", "fake/ok", "--expire", "soon"),
        ("run",),
        ("no-such-command",),
        ("events", "--tail", "-3"),
    ):
        result = await cli(*args)
        assert result.code == 2, (args, result)
        assert "Traceback" not in result.err


def test_help_needs_no_server(tmp_path: Path) -> None:
    env = cli_env(tmp_path, None, None)
    done = subprocess.run(
        [sys.executable, "-m", "control_plane", "--help"],
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0
    commands = ("list", "pull", "load", "ps", "run", "stop", "status", "logs", "events")
    for command in (*commands, "init", "deploy", "get", "delete"):
        assert command in done.stdout.decode()


async def test_events_lists_and_follows(cli: Cli, capi: Api) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "control_plane",
        "events",
        "-f",
        "--json",
        env=cli.env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    try:
        await asyncio.wait_for(app_state(capi).events.listening.wait(), 10)
        for _ in range(200):  # subscribed before the transition happens
            if app_state(capi).events.subscribers:
                break
            await asyncio.sleep(0.05)
        assert (await cli("load", "fake/ok")).code == 0
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        event = json_loads(line)
        assert event["model"] == "fake/ok" and event["to"] == "STARTING"
        assert event["kind"] == "instance"
    finally:
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 20) == 130
    await wait_status(capi, "fake/ok", "RUNNING")
    listed = await cli("events", "--json", "-n", "10")
    assert listed.code == 0, listed
    moves = [json_loads(x)["to"] for x in listed.out.splitlines()]
    assert moves == ["STARTING", "RUNNING"]
    table = await cli("events")
    assert "fake/ok" in table.out and "STARTING -> RUNNING" in table.out
    replay = await cli("events", "--json", "--since", "0")
    assert [json_loads(x)["to"] for x in replay.out.splitlines()] == ["STARTING", "RUNNING"]


async def test_keys_disable_enable_expire(cli: Cli) -> None:
    created = (await cli("keys", "create", "carol", "--json")).json()
    key_id = str(created["id"])
    disabled = await cli("keys", "disable", key_id, "--json")
    assert disabled.code == 0 and disabled.json()["disabled"] is not None
    assert_clean_error(await cli("list", key=created["key"]), "401")
    table = await cli("keys", "list")
    assert "disabled" in table.out
    assert (await cli("keys", "enable", key_id)).code == 0
    assert (await cli("list", "--json", key=created["key"])).code == 0
    expired = await cli("keys", "expire", key_id, "2030-01-31T00:00:00Z", "--json")
    assert expired.code == 0 and expired.json()["expiresAt"].startswith("2030-01-31")
    assert (await cli("keys", "expire", key_id, "never", "--json")).json()["expiresAt"] is None
    assert_clean_error(await cli("keys", "expire", key_id, "soon"), "expiresAt")


async def test_keys_with_limits_and_usage(cli: Cli, capi: Api) -> None:
    created = await cli(
        "keys", "create", "dave", "--scope", "user", "--monthly-calls", "2", "--rpm", "60", "--json"
    )
    assert created.code == 0, created
    dave = created.json()
    assert dave["limits"]["monthlyCalls"] == 2 and dave["limits"]["requestsPerMinute"] == 60
    key_id = str(dave["id"])
    limited = await cli("keys", "limit", key_id, "--streams", "1", "--reset", "rpm", "--json")
    assert limited.code == 0, limited
    assert limited.json()["limits"]["concurrentStreams"] == 1
    assert limited.json()["limits"]["requestsPerMinute"] is None
    table = await cli("keys", "list")
    header = table.out.splitlines()[0].split()
    assert header[-2:] == ["CALLS/MONTH", "RPM"]
    dave_line = next(line for line in table.out.splitlines() if " dave " in line)
    assert dave_line.split()[-2:] == ["2", "-"]

    await capi.call("POST", "/model/load", {"model": "fake/ok"})
    await wait_status(capi, "fake/ok", "RUNNING")
    for _ in range(2):
        assert (await cli("run", "fake/ok", "hi", key=dave["key"])).code == 0
    assert_clean_error(await cli("run", "fake/ok", "hi", key=dave["key"]), "quota_exceeded")
    mine = await cli("usage", "--json", key=dave["key"])
    assert mine.code == 0, mine
    assert [(k["name"], k["calls"], k["remaining"]) for k in mine.json()["keys"]] == [
        ("dave", 2, 0)
    ]
    every = await cli("usage")
    assert every.code == 0 and every.out.startswith("month ")
    assert any(line.split()[:2] == [key_id, "dave"] for line in every.out.splitlines())

    # Bad input: a clear line, exit 1 (the server refuses) or 2 (the CLI does).
    assert_clean_error(await cli("usage", "--month", "2026-13"), "month")
    assert_clean_error(await cli("keys", "limit", "999999", "--rpm", "5"), "no such key")
    assert_clean_error(
        await cli("keys", "limit", key_id, "--monthly-calls", "99999999999"), "monthlyCalls"
    )
    assert (await cli("keys", "limit", key_id)).code == 2
    assert (await cli("keys", "limit", key_id, "--rpm", "-1")).code == 2
    assert (await cli("keys", "limit", key_id, "--reset", "everything")).code == 2
    assert_clean_error(await cli("keys", "limit", key_id, "--rpm", "5", key=dave["key"]), "admin")
