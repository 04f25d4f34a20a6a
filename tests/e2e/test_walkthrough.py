"""The README's curl walkthrough against a server started as `make run` does, with the real
SmolLM2 demo model: request it, load it, run it (JSON and streaming), list, delete."""

from __future__ import annotations

import json
import time
from http.client import HTTPConnection
from pathlib import Path

import psutil
import pytest

from benchmarker.catalog import DEMO_MODEL
from tests.e2e.server import http, start, stop

KEY = "mlcp_walkthrough-admin-key-0123456789abcdef"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def poll(base: str, path: str, body: dict[str, object], until: str, field: str, limit_s: float):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + limit_s
    last: object = None
    while time.monotonic() < deadline:
        status, last = http("POST", base + path, KEY, body, timeout=30)
        assert status == 200, last
        assert isinstance(last, dict)
        if last.get(field) == until:
            return last
        assert last.get("success", True) is not False, last
        assert last.get("status") != "FAILED", last
        time.sleep(0.5)
    raise AssertionError(f"{path} never reached {until!r}: {last}")


def stream_chunks(base: str, body: dict[str, object]) -> list[bytes]:
    host, port = base.removeprefix("http://").split(":")
    conn = HTTPConnection(host, int(port), timeout=120)
    conn.request(
        "POST",
        "/model/run",
        json.dumps(body),
        {"Authorization": f"Key {KEY}", "Content-Type": "application/json"},
    )
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("content-type", "").startswith("text/plain")
    chunks = []
    while chunk := resp.read1(65536):
        chunks.append(chunk)
    conn.close()
    return chunks


def instance_processes(root: Path) -> list[psutil.Process]:
    """Agents started under `root` that serve an instance: the fork server (the zygote) stays
    up between instances, while its forked children, which share its command line, must not."""
    agents = {
        p.pid: p
        for p in psutil.process_iter(["cmdline", "ppid"])
        if "instance_agent" in " ".join(p.info["cmdline"] or [])
        and str(root) in " ".join(p.info["cmdline"] or [])
    }
    return [
        p
        for p in agents.values()
        if "zygote" not in (p.info["cmdline"] or []) or p.info["ppid"] in agents
    ]


def test_curl_walkthrough_with_smollm2(tmp_path: Path) -> None:
    # Stop instances with the server, so a failing run leaves nothing behind.
    server = start(
        tmp_path / "mlcp",
        tmp_path,
        "walkthrough",
        MLCP_ADMIN_KEY=KEY,
        MLCP_STOP_INSTANCES_ON_EXIT="true",
    )
    try:
        base = server.base
        model = {"model": DEMO_MODEL}
        status, listed = http("GET", base + "/model/list", KEY)
        assert status == 200 and DEMO_MODEL in [m["name"] for m in listed]

        status, job = http("POST", base + "/model/job", KEY, model)
        assert status == 200 and job["success"] is True
        assert job["message"] in ("Model is already queued", "Model available")
        poll(base, "/model/job", model, "Model available", "message", 900)
        status, listed = http("GET", base + "/model/list", KEY)
        demo = next(m for m in listed if m["name"] == DEMO_MODEL)
        assert demo["benchmarked"] is True and 0.2 < demo["requiredRAM"] < 4

        status, started = http(
            "POST",
            base + "/model/load",
            KEY,
            {**model, "concurrency": 2, "expirationPeriodSeconds": 300},
        )
        assert status == 200 and started["status"] == "started", started
        running = poll(base, "/model/status", model, "RUNNING", "status", 180)
        assert running["concurrency"] == 2 and running["expirationPeriodSeconds"] == 300

        status, out = http(
            "POST",
            base + "/model/run",
            KEY,
            {
                **model,
                "prompt": "Which city is the capital of France?",
                "params": {"max_new_tokens": 32},
            },
            timeout=300,
        )
        assert status == 200 and out["error"] is None, out
        assert "Paris" in out["output"], out
        assert out["tokens_generated"] > 0 and out["tokens_per_second"] > 0

        chunks = stream_chunks(base, {**model, "prompt": "Once upon a time", "stream": True})
        text = b"".join(chunks).decode()
        assert len(chunks) > 1 and len(text.split()) > 5 and "[error" not in text

        status, instances = http("GET", base + "/model/instances", KEY)
        assert [i["model"] for i in instances] == [DEMO_MODEL]
        assert instances[0]["inferences"] == 2

        status, deleted = http("POST", base + "/model/delete", KEY, model)
        assert status == 200 and deleted["status"] == "STOPPED"
        status, instances = http("GET", base + "/model/instances", KEY)
        assert instances == []
        agents = instance_processes(tmp_path)
        assert agents == [], "the instance's process must be gone after delete"
    finally:
        stop(server)
