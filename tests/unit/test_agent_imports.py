"""Only the engines (instance_agent/model.py, encoder.py, llama_engine.py) import torch or
llama-cpp-python: the rest stays light.

Each check runs in a fresh interpreter: this test process may already hold torch.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

HEAVY = ("torch", "transformers", "accelerate", "safetensors", "gguf", "tokenizers", "llama_cpp")


def _heavy_modules_after(code: str) -> list[str]:
    script = textwrap.dedent(code) + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))\n"
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    loaded: list[str] = json.loads(proc.stdout.strip().splitlines()[-1])
    return [name for name in loaded if name.split(".")[0] in HEAVY]


@pytest.mark.parametrize(
    "module",
    [
        "instance_agent.protocol",
        "instance_agent.app",
        "instance_agent.batcher",
        "instance_agent.streaming",
        "instance_agent.memory",
        "instance_agent.weights",
        "instance_agent.state",
        "instance_agent.chat",
        "instance_agent.embeddings",
        "instance_agent.project",
        "instance_agent.handler",
        "instance_agent.user_code",
        "instance_agent.__main__",
        "instance_agent.engines",
        "instance_agent.sampling",
        "instance_agent.launch",
    ],
)
def test_importing_stays_light(module: str) -> None:
    assert _heavy_modules_after(f"import {module}") == []


def test_building_the_app_stays_light() -> None:
    heavy = _heavy_modules_after(
        """
        from pathlib import Path
        from instance_agent.app import AgentConfig, create_app
        create_app(AgentConfig(model_dir=Path("/nonexistent"), model_name="m"))
        """
    )
    assert heavy == []


def test_the_protocol_uses_the_standard_library_only() -> None:
    code = """
        import sys
        before = set(sys.modules)
        import instance_agent.protocol
        added = sorted(set(sys.modules) - before)
        third_party = [m for m in added if not m.startswith("instance_agent")
                       and m.split(".")[0] not in sys.stdlib_module_names]
        assert third_party == [], third_party
    """
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
