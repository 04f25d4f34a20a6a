"""`mlcp init`: the scaffold is served by the real agent and answers on the first try."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from instance_agent.project import parse_spec
from tests.agent_process import AgentProcess
from tests.cli.conftest import Result, cli_env


def mlcp(cwd: Path, *args: str) -> Result:
    done = subprocess.run(
        [sys.executable, "-m", "control_plane", *args],
        cwd=cwd,
        env=cli_env(cwd, None, None),
        capture_output=True,
        timeout=60,
        check=False,
    )
    return Result(done.returncode, done.stdout.decode(), done.stderr.decode())


def handle(url: str, payload: Any) -> Any:
    request = urllib.request.Request(
        f"{url}/handle",
        data=json.dumps(payload).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as reply:
        return json.loads(reply.read())


@pytest.mark.parametrize(
    ("template", "spec_file", "handler_file"),
    [
        ("cellstrat", "mlcp.yaml", "src/main.py"),
        ("cortex", "sentiment_analyser.yaml", "handler.py"),
    ],
)
def test_init_writes_a_project_the_agent_serves(
    tmp_path: Path, template: str, spec_file: str, handler_file: str
) -> None:
    made = mlcp(tmp_path, "init", "sentiment-analyser", "--template", template)
    assert made.code == 0, made
    project = tmp_path / "sentiment-analyser"
    files = sorted(str(p.relative_to(project)) for p in project.rglob("*") if p.is_file())
    assert files == sorted(
        [spec_file, handler_file, "requirements.txt", "model/README.md", "Dockerfile", "README.md"]
    )
    spec = parse_spec((project / spec_file).read_text())
    assert spec.name == "sentiment-analyser" and spec.handler_path == handler_file
    assert spec.public is False and spec.concurrency == 1 and spec.example is not None
    assert (project / "Dockerfile").read_text().splitlines()[-1] == "FROM mlcp-agent:latest"
    requirements = (project / "requirements.txt").read_text().splitlines()
    assert all(line.startswith("#") for line in requirements)
    assert "MODEL_DIR" in (project / handler_file).read_text()

    agent = AgentProcess(project, "--task", "handler")
    try:
        assert agent.wait_ready(timeout_s=60)["task"] == "handler"
        answer = handle(agent.url, spec.example)
        assert answer["output"] == {"words": 4, "echo": spec.example}
    finally:
        agent.stop()


def test_init_refuses_bad_names_and_a_used_folder(tmp_path: Path) -> None:
    for name, needle in (
        ("model", "reserved"),
        ("apis", "reserved"),
        ("Bad_Name", "lowercase"),
        ("x-", "lowercase"),
        ("a" * 64, "1-63"),
    ):
        refused = mlcp(tmp_path, "init", name)
        assert refused.code == 1 and needle in refused.err, (name, refused)
        assert "Traceback" not in refused.err
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    refused = mlcp(tmp_path, "init", "taken")
    assert refused.code == 1 and "not empty" in refused.err, refused
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["notes.txt"]
    unknown = mlcp(tmp_path, "init", "fine", "--template", "flask")
    assert unknown.code == 1 and "cellstrat or cortex" in unknown.err, unknown
    # An empty folder may be used, also under another name with --dir.
    (tmp_path / "empty").mkdir()
    assert mlcp(tmp_path, "init", "fine", "--dir", "empty").code == 0
    assert (tmp_path / "empty" / "mlcp.yaml").is_file()
