"""The agent's handler engine with real processes: both seeds' handlers and every misbehaviour.

Each project is imported in its own `python -m instance_agent serve` process; calls go over HTTP.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.agent_process import AgentExited, AgentProcess
from tests.handler_projects import (
    broken_project,
    cellstrat_sentiment,
    cortex_text_generator,
    misbehaving,
)


def post(url: str, body: bytes | Any, timeout_s: float = 30) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.fixture(scope="module")
def odd_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    project = misbehaving(tmp_path_factory.mktemp("odd") / "odd")
    process = AgentProcess(
        project, "--concurrency", "2", "--max-queue", "1", "--handler-timeout-s", "1"
    )
    try:
        process.wait_ready(timeout_s=30)
        yield process
    finally:
        process.stop()


def test_health_reports_a_ready_handler(odd_agent: AgentProcess) -> None:
    status, body = odd_agent.health()
    assert status == 200
    assert body["task"] == "handler"
    assert body["concurrency"] == 2


def test_a_call_answers_the_return_value_and_model_dir_is_set(
    odd_agent: AgentProcess, tmp_path: Path
) -> None:
    status, body = post(f"{odd_agent.url}/handle", "so simple and quick!")
    assert status == 200, body
    assert body["output"]["echo"] == "so simple and quick!"
    assert body["output"]["model_dir"].endswith("/odd/model")
    assert body["time_seconds"] >= 0


def test_the_module_is_imported_once(odd_agent: AgentProcess) -> None:
    first = post(f"{odd_agent.url}/handle", {})[1]["output"]["loaded_at"]
    second = post(f"{odd_agent.url}/handle", {})[1]["output"]["loaded_at"]
    assert first == second


@pytest.mark.parametrize(
    ("payload", "status", "code", "fragment"),
    [
        ({"raise": "no such label"}, 502, "handler_error", "ValueError: no such label"),
        ({"exit": 3}, 502, "handler_error", "SystemExit"),
        ({"bad_output": 1}, 502, "handler_bad_output", "not JSON"),
        ({"nan": 1}, 502, "handler_bad_output", "float"),
        ({"sleep": 3}, 504, "handler_timeout", "within 1 s"),
    ],
)
def test_a_misbehaving_call_is_a_clear_error(
    odd_agent: AgentProcess, payload: Any, status: int, code: str, fragment: str
) -> None:
    got_status, body = post(f"{odd_agent.url}/handle", payload)
    assert (got_status, body["code"]) == (status, code), body
    assert fragment in body["error"]
    # The instance survives every one of them.
    assert odd_agent.proc.poll() is None


def test_the_traceback_goes_to_the_instance_log(odd_agent: AgentProcess) -> None:
    post(f"{odd_agent.url}/handle", {"raise": "logged-marker"})
    deadline = time.monotonic() + 5
    while "logged-marker" not in odd_agent.output() and time.monotonic() < deadline:
        time.sleep(0.05)
    log = odd_agent.output()
    assert "Traceback" in log
    assert "ValueError: logged-marker" in log


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 400, "invalid_json"),
        (b"x" * (2 * 1024 * 1024), 413, "payload_too_large"),
    ],
)
def test_bad_bodies_are_refused(
    odd_agent: AgentProcess, body: bytes, status: int, code: str
) -> None:
    assert post(f"{odd_agent.url}/handle", body)[1]["code"] == code
    assert post(f"{odd_agent.url}/handle", body)[0] == status


def test_other_routes_say_it_is_a_handler(odd_agent: AgentProcess) -> None:
    status, body = post(f"{odd_agent.url}/run", {"prompt": "hi"})
    assert (status, body["code"]) == (422, "wrong_task")
    assert "/handle" in body["error"]


def test_concurrency_runs_calls_at_once_and_the_queue_is_bounded(
    odd_agent: AgentProcess,
) -> None:
    # A timed-out call above still holds its place until its thread returns.
    deadline = time.monotonic() + 10
    while odd_agent.health()[1]["inFlight"] and time.monotonic() < deadline:
        time.sleep(0.05)
    # Two run at once, one waits, the fourth is refused with 503 and Retry-After.
    with ThreadPoolExecutor(4) as pool:
        started = time.monotonic()
        slow = [pool.submit(post, f"{odd_agent.url}/handle", {"sleep": 0.6}) for _ in range(2)]
        time.sleep(0.2)
        queued = pool.submit(post, f"{odd_agent.url}/handle", {"sleep": 0.1})
        time.sleep(0.1)
        refused = post(f"{odd_agent.url}/handle", {})
        results = [future.result() for future in slow]
        assert queued.result()[0] == 200
        elapsed = time.monotonic() - started
    assert [status for status, _ in results] == [200, 200]
    assert refused[0] == 503 and refused[1]["code"] == "instance_busy"
    # The two slow ones overlapped (sequential would take 1.2 s before the queued one).
    assert elapsed < 1.15


@pytest.mark.parametrize(
    ("main_py", "path", "reason"),
    [
        ("raise RuntimeError('bad import')\n", "src/main.py", "RuntimeError: bad import"),
        (
            "class Handler:\n    def __init__(self, config):\n        raise KeyError('x')\n"
            "    def handle_post(self, payload):\n        return 1\n",
            "src/main.py",
            "Handler(config) failed: KeyError",
        ),
        ("def inference_handler(inputs, _):\n    return 1\n", "src/main.py", "exactly one"),
        ("class Handler:\n    pass\n", "src/main.py", "no handle_post"),
        ("x = 1\n", "src/other.py", "is not in the project"),
        ("x = 1\n", "../outside.py", "must stay inside the project"),
        ("import sys\nsys.exit(5)\n", "src/main.py", "SystemExit"),
    ],
)
def test_a_project_that_cannot_load_exits_with_the_reason(
    tmp_path: Path, main_py: str, path: str, reason: str
) -> None:
    project = broken_project(tmp_path / "broken", main_py, path=path)
    process = AgentProcess(project)
    try:
        with pytest.raises(AgentExited) as failure:
            process.wait_ready(timeout_s=30)
        assert process.proc.returncode == 3
        assert "load failed" in str(failure.value)
        assert reason in str(failure.value)
    finally:
        process.stop()


def test_cellstrat_sentiment_answers_its_output_shape(tmp_path: Path) -> None:
    project = cellstrat_sentiment(tmp_path / "sentiment-analyser")
    process = AgentProcess(project)
    try:
        process.wait_ready(timeout_s=90)
        status, body = post(f"{process.url}/handle", ["so simple and quick!", "meh"])
        assert status == 200, body
        output = body["output"]
        assert len(output) == 2
        for row in output:
            assert sorted(label for label, _ in row) == ["Negative", "Positive"]
            assert abs(sum(score for _, score in row) - 100) < 0.1
    finally:
        process.stop()


def test_cortex_text_generator_deploys_unchanged(tmp_path: Path) -> None:
    project = cortex_text_generator(tmp_path / "text-generator")
    process = AgentProcess(project, "--task", "handler")
    try:
        process.wait_ready(timeout_s=90)
        status, body = post(f"{process.url}/handle", {"text": "The quick brown"})
        assert status == 200, body
        assert body["output"]["generated_text"].startswith("The quick brown")
        status, body = post(f"{process.url}/handle", {"no text": 1})
        assert (status, body["code"]) == (502, "handler_error")
        assert "KeyError" in body["error"]
    finally:
        process.stop()
