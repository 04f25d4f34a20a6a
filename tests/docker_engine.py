"""Fixtures and helpers for tests that need a Docker engine (marked `docker`).

Without an engine those tests skip, unless MLCP_REQUIRE_DOCKER=1 (set by .ci/run) turns that into
a failure. The agent image is built offline (`python -m instance_agent.image build`) and reused
while nothing changed. Containers use host networking, so all traffic stays on loopback.
"""

from __future__ import annotations

import gc
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest
from docker import DockerClient

from control_plane.runtimes.docker import API_VERSION
from instance_agent.image import build
from tests.fake_agent import write_fake_model

MANAGED = {"label": "mlcp.managed=true"}
# The fake agent travels inside the mounted model folder, so the image needs nothing extra.
FAKE_AGENT_SOURCE = Path(__file__).resolve().parent / "fake_agent.py"
FAKE_IN_CONTAINER = ["python", "/model/fake_agent.py"]


@pytest.fixture(scope="session")
def engine() -> Iterator[DockerClient]:
    """The Docker engine; at the end, removes every labelled container the tests left (by id)."""
    client = docker.DockerClient.from_env(timeout=60, version=API_VERSION)
    problem = ""
    with warnings.catch_warnings():
        # The SDK leaves the socket of a failed connection open; collect it here, quietly.
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            client.ping()
        except (docker.errors.DockerException, OSError) as exc:
            problem = f"{type(exc).__name__}: {exc}"
        if problem:
            client.close()
            gc.collect()
    if problem:
        if os.environ.get("MLCP_REQUIRE_DOCKER") == "1":
            pytest.fail(f"MLCP_REQUIRE_DOCKER=1 but no Docker engine answers: {problem}")
        pytest.skip(f"no Docker engine answers ({problem}); start dockerd to run these")
    before = {c.id for c in client.containers.list(all=True, filters=MANAGED)}
    yield client
    for container in client.containers.list(all=True, filters=MANAGED):
        if container.id not in before:
            container.remove(force=True)
    client.close()


@pytest.fixture(scope="session")
def agent_image(engine: DockerClient) -> str:
    """The agent image for this checkout: built once (~25 s), then found by its content hash."""
    return build()


def fake_model(root: Path, name: str, mode: str = "ok", **behaviour: Any) -> Path:
    """A fake model folder that also holds the fake agent, with every file mode 0600."""
    folder = write_fake_model(root, name, mode, **behaviour)
    shutil.copy(FAKE_AGENT_SOURCE, folder / "fake_agent.py")
    # Converted models are written 0600; the container must read them all the same.
    for path in folder.iterdir():
        path.chmod(0o600)
    return folder
