"""A handler API under the docker runtime runs in an image built from its version's Dockerfile
(issue 11): offline (host network, nothing pulled), cached by content; a Dockerfile with RUN
fails the version with the build's last lines and why (the agent image has no shell)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from docker import DockerClient

from control_plane.runtimes.docker import PROJECT_LABEL
from tests.api_deploy import deploy, wait_api
from tests.harness import Api, own_control_plane
from tests.integration.test_apis import HANDLER, VENDORED, owner, project, user_key

pytestmark = [pytest.mark.docker, pytest.mark.timeout(400)]

MAIN = """\
import os
from pathlib import Path

from instance_agent.handler import handler


@handler
def inference_handler(inputs, _):
    extra = Path("/opt/extra.txt")
    return {
        "mark": os.environ.get("MLCP_TEST_MARK"),
        "extra": extra.read_text() if extra.exists() else None,
    }
"""


@pytest.fixture(scope="module")
async def docked(
    pg_dsn: str,
    template_db: str,
    tmp_path_factory: pytest.TempPathFactory,
    agent_image: str,
) -> AsyncIterator[Api]:
    data = tmp_path_factory.mktemp("docker-apis")
    async with own_control_plane(
        pg_dsn,
        template_db,
        data,
        include_packaged_models=False,
        runtime="docker",
        docker_image=agent_image,
        docker_network="host",
    ) as api:
        yield api


def project_images(engine: DockerClient) -> dict[str, str]:
    return {
        tag: image.id
        for image in engine.images.list(filters={"label": f"{PROJECT_LABEL}=true"})
        for tag in image.tags
    }


async def test_a_version_runs_in_the_image_of_its_dockerfile(
    docked: Api,
    engine: DockerClient,
    agent_image: str,
    tmp_path: Path,
) -> None:
    api = docked
    name = owner()
    key = await user_key(api, name)
    dockerfile = f"FROM {agent_image}\nCOPY extra.txt /opt/extra.txt\nENV MLCP_TEST_MARK={name}\n"
    files = {"Dockerfile": dockerfile, "extra.txt": "copied by the build\n"}
    folder = project(tmp_path, "docked", main=MAIN, files=files)
    before = project_images(engine)
    assert (await deploy(api, folder, key, name="docked"))[0] == 202
    await wait_api(api, "docked", key, "available", timeout_s=300)
    built = {t: i for t, i in project_images(engine).items() if t not in before}
    assert len(built) == 1, built
    status, out = await api.call("POST", "/docked", key=key, data='"x"')
    assert status == 200, out
    assert out == {"mark": name, "extra": "copied by the build\n"}
    # The same content deployed again is the same image, not built again.
    assert (await deploy(api, folder, key, name="docked"))[0] == 202
    await wait_api(api, "docked", key, "available", version=2, timeout_s=300)
    assert {t: i for t, i in project_images(engine).items() if t not in before} == built
    assert (await api.call("DELETE", "/apis/docked", key=key))[0] == 200
    for tag in built:
        engine.images.remove(tag, force=True)


async def test_a_dockerfile_with_run_fails_the_version_saying_why(
    docked: Api,
    agent_image: str,
    tmp_path: Path,
) -> None:
    api = docked
    name = owner()
    key = await user_key(api, name)
    files = {"Dockerfile": f"FROM {agent_image}\nRUN echo hello\n"}
    folder = project(tmp_path, "runs", files=files)
    assert (await deploy(api, folder, key, name="runs"))[0] == 202
    failed = await wait_api(api, "runs", key, "failed", timeout_s=300)
    reason = failed["reason"] or ""
    assert reason.startswith("building the project's Dockerfile failed:"), reason
    assert "no shell" in reason and "RUN" in reason, reason
    # Nothing pulled: a FROM this engine lacks is refused by name.
    files = {"Dockerfile": "FROM example.invalid/nothing:1\n"}
    assert (await deploy(api, project(tmp_path, "nofrom", files=files), key, name="nofrom"))[
        0
    ] == 202
    failed = await wait_api(api, "nofrom", key, "failed", timeout_s=120)
    assert "is not an image of this Docker engine" in (failed["reason"] or ""), failed


async def test_a_project_with_requirements_runs_under_its_environment_in_the_container(
    docked: Api, tmp_path: Path
) -> None:
    """The virtualenv built for requirements.txt is mounted into the agent's container."""
    api = docked
    key = await user_key(api, owner())
    folder = project(
        tmp_path,
        "docked-env",
        requirements="./vendored  # built offline\ntorch\n",
        files=VENDORED,
        main=HANDLER.format(version="__import__('mlcp_test_vendored').GREETING"),
    )
    assert (await deploy(api, folder, key, name="docked-env"))[0] == 202
    await wait_api(api, "docked-env", key, "available", timeout_s=300)
    status, out = await api.call("POST", "/docked-env", key=key, data='"x"')
    assert status == 200 and out["version"] == "hi from vendored", out
    envs = (api.settings.data_dir / "apis" / "envs").resolve()
    assert Path(out["python"]).parent.parent.parent == envs, out
    got = (await api.call("GET", "/apis/docked-env", key=key))[1]
    assert got["instance"]["runtime"] == "docker", got
    assert (await api.call("DELETE", "/apis/docked-env", key=key))[0] == 200
