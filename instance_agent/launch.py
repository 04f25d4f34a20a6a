"""How an instance agent is started: its command line, its port, and how it says it failed.

Shared by everything that starts an agent (the control plane's runtimes, the benchmarker's
measuring child, benchmarks and tests), so the command line is written once. Light: no torch.
"""

from __future__ import annotations

import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from instance_agent.engines import EngineName

# The agent's last stderr line when it cannot load its model (instance_agent/__main__.py).
LOAD_FAILED_MARK = "mlcp-agent: load failed:"


@dataclass(frozen=True)
class AgentArgs:
    """What one agent serves and how (the `serve` command's options)."""

    model_dir: Path
    model_name: str
    port: int
    concurrency: int
    max_queue: int
    device: str = "cpu"
    gguf_file: str | None = None
    host: str = "127.0.0.1"
    # None: the agent picks (`instance_agent.engines.choose_engine`).
    engine: EngineName | None = None


def serve_command(args: AgentArgs, base: list[str] | None = None) -> list[str]:
    """`python -m instance_agent serve ...` (or `base` + `serve ...`: tests' fake agents)."""
    cmd = [
        *(base if base is not None else [sys.executable, "-m", "instance_agent"]),
        "serve",
        "--model-dir",
        str(args.model_dir),
        "--model-name",
        args.model_name,
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--concurrency",
        str(args.concurrency),
        "--max-queue",
        str(args.max_queue),
        "--device",
        args.device,
    ]
    if args.gguf_file:
        cmd += ["--gguf-file", args.gguf_file]
    if args.engine:
        cmd += ["--engine", args.engine]
    return cmd


# Ports handed out by free_loopback_port, and when: not handed out again for RECENT_S. The kernel
# gives a port just closed to the next bind(0) readily (1.7 repeats in 200 calls in a row here), and
# a port is only probed, then bound by the agent a moment later: two launches close together could
# be given one port, and the second agent then fails to bind it.
RECENT_S = 60.0
_handed_out: dict[int, float] = {}


def free_loopback_port() -> int:
    """A TCP port free on 127.0.0.1 now (the agent binds it a moment later), and not one this
    process handed out in the last RECENT_S seconds."""
    now = time.monotonic()
    for port, when in list(_handed_out.items()):
        if now - when > RECENT_S:
            del _handed_out[port]
    port = 0
    for _ in range(64):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            break
    _handed_out[port] = now
    return port


def load_failure(line: str) -> str | None:
    """The reason in an agent's `load failed` line, or None for any other line."""
    if LOAD_FAILED_MARK not in line:
        return None
    return line.split(LOAD_FAILED_MARK, 1)[1].strip()
