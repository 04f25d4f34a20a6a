"""The docker runtime's decisions, as pure functions: GPU requests, container settings, where an
agent listens, and why a container ended. No engine needed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from control_plane.runtimes.base import InstanceSpec
from control_plane.runtimes.docker import (
    AGENT_PORT,
    DEFAULT_COMMAND,
    OOM_REASON,
    claim_argv,
    container_config,
    container_exit_reason,
    container_name,
    distinct_roots,
    endpoint_of,
    gpu_request,
    instance_of_name,
    spare_config,
    spare_fits,
)
from instance_agent import spare as spare_agent


def spec(**overrides: object) -> InstanceSpec:
    values: dict[str, object] = {
        "instance_id": 7,
        "generation": 3,
        "model": "org/name",
        "model_dir": Path("/srv/models/org/name"),
        "gguf_file": None,
        "concurrency": 2,
        "max_queue": 4,
    }
    values.update(overrides)
    return InstanceSpec(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("device", "free", "ids", "count", "inside"),
    [
        ("cuda:1", None, ["1"], 0, "cuda:0"),
        ("cuda:1", {0: 10, 1: 1}, ["1"], 0, "cuda:0"),  # an explicit choice wins
        ("cuda", {0: 5, 1: 9, 2: 9}, ["1"], 0, "cuda:0"),  # most free memory, lowest index
        ("cuda", None, [], 1, "cuda"),  # no NVML: the engine picks one
        ("cuda", {}, [], 1, "cuda"),
    ],
)
def test_gpu_request(
    device: str, free: dict[int, int] | None, ids: list[str], count: int, inside: str
) -> None:
    requests, agent_device = gpu_request(device, free)
    assert agent_device == inside
    [request] = requests
    assert request["DeviceIDs"] == ids and request["Count"] == count
    assert request["Capabilities"] == [["gpu"]]


def test_cpu_requests_no_gpu() -> None:
    assert gpu_request("cpu", {0: 1}) == ([], "cpu")


def test_bridge_config_publishes_on_loopback_only() -> None:
    config = container_config(
        spec(), cluster="c1", image="img:1", network="bridge", host_port=12345
    )
    assert config["ports"] == {f"{AGENT_PORT}/tcp": ("127.0.0.1",)}
    assert "network_mode" not in config
    argv = config["command"]
    assert argv[argv.index("--host") + 1] == "0.0.0.0"  # inside the container's own network
    assert argv[argv.index("--port") + 1] == str(AGENT_PORT)
    assert config["entrypoint"] == ["python", "-m", "instance_agent"]
    assert argv[0] == "serve" and argv[argv.index("--model-dir") + 1] == "/model"
    assert config["volumes"] == {"/srv/models/org/name": {"bind": "/model", "mode": "ro"}}
    assert config["labels"] == {
        "mlcp.managed": "true",
        "mlcp.cluster": "c1",
        "mlcp.instance": "7",
        "mlcp.generation": "3",
        "mlcp.model": "org/name",
    }
    assert config["name"] == "mlcp-c1-7-3"
    assert config["init"] is True and config["user"] == "0:0"
    assert "mem_limit" not in config and "device_requests" not in config
    assert config["environment"]["MLCP_INSTANCE_LEASE_S"] == "300"


def test_host_config_limits_memory_and_requests_gpus() -> None:
    config = container_config(
        spec(mem_limit_bytes=2**30, device="cuda"),
        cluster="c1",
        image="img:1",
        network="host",
        host_port=41000,
        command=("python", "/model/fake_agent.py"),
        free_gpu_bytes={0: 1, 1: 2},
        lease_grace_s=42.5,
    )
    assert config["environment"]["MLCP_INSTANCE_LEASE_S"] == "42.5"
    assert config["network_mode"] == "host" and "ports" not in config
    argv = config["command"]
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--port") + 1] == "41000"
    assert argv[argv.index("--device") + 1] == "cuda:0"
    assert config["entrypoint"] == ["python", "/model/fake_agent.py"]
    assert config["mem_limit"] == config["memswap_limit"] == 2**30
    assert config["device_requests"][0]["DeviceIDs"] == ["1"]


def test_endpoint_of_host_and_bridge_containers() -> None:
    host = {"HostConfig": {"NetworkMode": "host"}, "Args": ["serve", "--port", "41000"]}
    assert endpoint_of(host) == "http://127.0.0.1:41000"
    bridge = {
        "HostConfig": {"NetworkMode": "bridge"},
        "NetworkSettings": {"Ports": {"8000/tcp": [{"HostIp": "127.0.0.1", "HostPort": "49153"}]}},
    }
    assert endpoint_of(bridge) == "http://127.0.0.1:49153"
    # An exited bridge container has no ports any more.
    assert endpoint_of({"HostConfig": {}, "NetworkSettings": {"Ports": {}}}) is None
    assert endpoint_of({"HostConfig": {"NetworkMode": "host"}, "Args": ["serve"]}) is None


@pytest.mark.parametrize(
    ("state", "tail", "reason"),
    [
        ({"Status": "running"}, [], None),
        ({"Status": "paused"}, [], None),
        ({"Status": "exited", "OOMKilled": True, "ExitCode": 137}, [], OOM_REASON),
        ({"Status": "exited", "ExitCode": 137}, [], "instance process was killed by SIGKILL"),
        ({"Status": "exited", "ExitCode": 1}, [], "instance process exited with code 1"),
        (
            {"Status": "exited", "ExitCode": 3},
            ["loading", "mlcp-agent: load failed: no config.json"],
            "load failed: no config.json",
        ),
        ({"Status": "created"}, [], "the instance container was created but never started"),
        ({"Status": "dead", "ExitCode": 0}, [], "instance process exited with code 0"),
    ],
)
def test_container_exit_reason(
    state: dict[str, object], tail: list[str], reason: str | None
) -> None:
    assert container_exit_reason(state, tail) == reason


def test_a_project_environment_is_mounted_where_it_was_built_and_runs_the_agent() -> None:
    env = "/data/apis/envs/ab12"
    config = container_config(
        spec(python=f"{env}/bin/python"), cluster="c1", image="img:1", network="host", host_port=1
    )
    assert config["entrypoint"] == [f"{env}/bin/python", "-m", "instance_agent"]
    assert config["volumes"][env] == {"bind": env, "mode": "ro"}
    # A test's own agent command is left as it is.
    config = container_config(
        spec(python=f"{env}/bin/python"),
        cluster="c1",
        image="img:1",
        network="host",
        host_port=1,
        command=("python", "/model/fake_agent.py"),
    )
    assert (
        config["entrypoint"] == ["python", "/model/fake_agent.py"] and env not in config["volumes"]
    )


def test_a_spare_fits_a_catalog_model_on_the_cpu_under_a_mounted_folder(tmp_path: Path) -> None:
    models = tmp_path / "models"
    (models / "org" / "name").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    roots = distinct_roots([models, models / "org", tmp_path / "missing"])
    assert roots == (models.resolve(),)  # a folder inside another, and a missing one, dropped
    fits = spec(model_dir=models / "org" / "name")
    assert spare_fits(fits, roots, DEFAULT_COMMAND)
    assert not spare_fits(spec(model_dir=tmp_path / "elsewhere"), roots, DEFAULT_COMMAND)
    assert not spare_fits(spec(model_dir=models, device="cuda:0"), roots, DEFAULT_COMMAND)
    assert not spare_fits(spec(model_dir=models, python="/env/bin/python"), roots, DEFAULT_COMMAND)
    assert not spare_fits(spec(model_dir=models, project_dir=models), roots, DEFAULT_COMMAND)
    assert not spare_fits(fits, roots, ("python", "fake_agent.py"))


def test_a_spare_container_and_its_claim(tmp_path: Path) -> None:
    roots = (tmp_path,)
    config = spare_config(
        cluster="c1", image="img", network="host", host_port=4321, roots=roots, token="t" * 32
    )
    assert config["command"] == ["spare", "--host", "127.0.0.1", "--port", "4321"]
    assert config["volumes"] == {str(tmp_path): {"bind": str(tmp_path), "mode": "ro"}}
    assert config["labels"] == {"mlcp.managed": "true", "mlcp.cluster": "c1", "mlcp.spare": "true"}
    assert config["environment"]["MLCP_SPARE_TOKEN"] == "t" * 32
    assert instance_of_name("c1", config["name"]) is None  # unclaimed: no instance
    claimed = spec(model_dir=tmp_path / "m")
    assert instance_of_name("c1", container_name("c1", claimed)) == (7, 3)
    assert instance_of_name("c2", container_name("c1", claimed)) is None
    argv = claim_argv(claimed, "host", 4321)
    assert argv[:3] == ["serve", "--model-dir", str((tmp_path / "m").resolve())]
    assert argv[argv.index("--port") + 1] == "4321"
    assert spare_agent.claim_argv(json.dumps({"argv": argv}).encode()) == argv
    bridge = claim_argv(claimed, "bridge", 4321)
    assert bridge[bridge.index("--host") + 1] == "0.0.0.0"
    assert bridge[bridge.index("--port") + 1] == str(AGENT_PORT)


@pytest.mark.parametrize(
    "body",
    [b"[]", b'{"argv": []}', b'{"argv": ["zygote", "--socket", "/x"]}', b'{"argv": ["serve", 1]}'],
)
def test_a_spare_takes_only_a_serve_claim(body: bytes) -> None:
    with pytest.raises(ValueError):
        spare_agent.claim_argv(body)


def test_a_spare_reads_whole_requests_only() -> None:
    assert spare_agent.parse_request(b"GET /hold HTTP/1.1\r\nX-A: b") is None
    assert spare_agent.parse_request(b"POST /claim HTTP/1.1\r\nContent-Length: 4\r\n\r\nab") is None
    assert spare_agent.parse_request(b"POST /claim HTTP/1.1\r\nContent-Length: 2\r\n\r\nab") == (
        "POST",
        "/claim",
        {b"content-length": b"2"},
        b"ab",
    )
    with pytest.raises(ValueError):
        spare_agent.parse_request(b"NONSENSE\r\n\r\n")
    with pytest.raises(ValueError):
        spare_agent.parse_request(b"POST / HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n")
