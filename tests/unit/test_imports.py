"""The control plane never imports torch or transformers (docs/architecture.md: heavy imports).

Each check runs in a fresh interpreter: this test process may already hold torch from other tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

HEAVY = ("torch", "transformers", "accelerate", "safetensors", "gguf", "tokenizers", "llama_cpp")


def modules_after(code: str) -> list[str]:
    script = textwrap.dedent(code) + textwrap.dedent(
        """
        import json, sys
        print(json.dumps(sorted(sys.modules)))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    loaded: list[str] = json.loads(proc.stdout.strip().splitlines()[-1])
    return loaded


def heavy_in(loaded: list[str]) -> list[str]:
    return [m for m in loaded if m.split(".")[0] in HEAVY]


def test_import_control_plane_app_stays_light() -> None:
    loaded = modules_after("import control_plane.app; control_plane.app.create_app")
    assert "control_plane.app" in loaded
    assert heavy_in(loaded) == []


def test_building_the_app_stays_light() -> None:
    loaded = modules_after(
        """
        from control_plane.app import create_app
        from control_plane.settings import Settings
        create_app(Settings(database_url="postgresql://localhost/none"))
        import control_plane.__main__
        """
    )
    assert heavy_in(loaded) == []


@pytest.mark.parametrize("package", ["control_plane", "db"])
def test_every_module_of_the_package_stays_light(package: str) -> None:
    loaded = modules_after(
        f"""
        import importlib, pkgutil
        import {package}
        for info in pkgutil.walk_packages({package}.__path__, "{package}."):
            importlib.import_module(info.name)
        """
    )
    assert heavy_in(loaded) == []


def test_wire_protocol_stays_light() -> None:
    loaded = modules_after("import instance_agent.protocol")
    assert heavy_in(loaded) == []
