"""The install step's torch choice: the CPU pin, or the CUDA build the driver can run."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "torch_choice.py"


def load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("torch_choice", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["torch_choice"] = module
    spec.loader.exec_module(module)
    return module


tc = load()
TAGS = ("cu126", "cu128", "cu130")


def test_the_cpu_pin_is_the_agent_extras() -> None:
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert f"torch=={tc.TORCH_VERSION}" in extra["agent"]


@pytest.mark.parametrize(
    ("mode", "driver", "build"),
    [
        ("auto", None, "cpu"),  # no driver: the CPU pin, as before
        ("cpu", 13000, "cpu"),  # asked for: a GPU host keeps the small build
        ("auto", 13000, "cu130"),
        ("auto", 13020, "cu130"),  # a newer driver runs the newest build
        ("auto", 12090, "cu128"),  # the newest build not above what the driver supports
        ("cuda", 12080, "cu128"),
        ("auto", 12060, "cu126"),
        ("auto", 12040, "cpu"),  # older than every build: auto falls back to the host
    ],
)
def test_choice(mode: str, driver: int | None, build: str) -> None:
    choice = tc.choose(mode, driver, TAGS)
    assert choice.build == build
    assert choice.requirement == f"torch=={tc.TORCH_VERSION}"
    if build == "cpu":
        assert choice.index_url is None
    else:
        assert choice.index_url == f"https://download.pytorch.org/whl/{build}"
        assert "supports CUDA" in choice.reason


@pytest.mark.parametrize(
    ("mode", "driver", "message"),
    [
        ("cuda", None, "no NVIDIA driver"),
        ("cuda", 11080, "older than every torch"),
        ("gpu", 13000, "must be one of auto, cpu, cuda, system"),
        ("system", 13000, "no torch installed"),
    ],
)
def test_refusals(mode: str, driver: int | None, message: str) -> None:
    with pytest.raises(tc.ChoiceError, match=message):
        tc.choose(mode, driver, TAGS)


def test_system_takes_the_torch_already_there() -> None:
    choice = tc.choose("system", 13000, TAGS, system_torch="2.11.0+cu130")
    assert choice.build == "system" and choice.index_url is None
    assert choice.reason == "torch 2.11.0+cu130 found"


def test_tag_versions() -> None:
    assert tc.tag_version("cu128") == 12080 and tc.tag_version("cu130") == 13000
    assert tc.driver_text(12080) == "12.8"
    with pytest.raises(ValueError):
        tc.tag_version("rocm6.2")


def test_the_script_on_this_host_says_what_it_chose() -> None:
    # Whatever the host: one line naming the build, and `cpu` refused nothing.
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "show"],
        env={"MLCP_TORCH": "cpu", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert re.fullmatch(r"torch: cpu build \(MLCP_TORCH=cpu\)\n", done.stdout)
    bad = subprocess.run(
        [sys.executable, str(SCRIPT), "show"],
        env={"MLCP_TORCH": "gpu", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode == 2 and "MLCP_TORCH must be one of" in bad.stderr
