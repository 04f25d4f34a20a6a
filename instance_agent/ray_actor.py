"""The Ray actor that hosts one instance agent on a node of a Ray cluster (MLCP_RUNTIME=ray).

The control plane creates it as a detached, named actor pinned to the node admission chose; its
constructor starts the agent as a child process listening on the node's address (as Ray reports
it) and a free port there, so the control plane learns the endpoint from `endpoint()`. The
agent's output is kept in a ring buffer (`tail`) and echoed to the actor's stdout, which Ray
keeps in the worker's log. The child dies with the actor (PR_SET_PDEATHSIG), and its lease
ends it anyway if no control plane renews it.

Only the standard library here, and Ray inside the methods: the class is defined as plain
Python and turned into an actor by the control plane (`ray.remote(InstanceActor)`), so a node
imports just this module to run it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque

from instance_agent.launch import LOAD_FAILED_MARK

PR_SET_PDEATHSIG = 1
# The agent's own exit status for a model it cannot load (instance_agent/__main__.py).
MISSING_EXIT = 3
TAIL_LINES = 2000


def _die_with_parent() -> None:
    """In the child before exec: receive SIGKILL when the actor's process dies."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def node_address() -> str:
    """The address Ray knows this node by (what other nodes reach it at)."""
    import ray

    return str(ray.util.get_node_ip_address())  # type: ignore[no-untyped-call]


def bind(argv: list[str], host: str, port: int) -> list[str]:
    """The agent's command line with `--host` and `--port` set to where it must listen."""
    out = list(argv)
    for flag, value in (("--host", host), ("--port", str(port))):
        if flag in out and out.index(flag) + 1 < len(out):
            out[out.index(flag) + 1] = value
        else:
            out += [flag, value]
    return out


def missing_model_dir(args: list[str], host: str) -> str | None:
    """Why the agent cannot start here when its model folder is not on this node, else None."""
    if "--model-dir" not in args or args.index("--model-dir") + 1 >= len(args):
        return None
    folder = args[args.index("--model-dir") + 1]
    if os.path.isdir(folder):
        return None
    return (
        f"the model folder {folder} is not on node {host}: every node must see the model "
        "store at the same path (MLCP_MODEL_STORE on shared storage)"
    )


class InstanceActor:
    """One instance agent as a child of this actor's process."""

    def __init__(
        self, args: list[str], base: list[str] | None, env: dict[str, str], label: str
    ) -> None:
        host = node_address()
        port = free_port(host)
        command = [*(base or [sys.executable, "-m", "instance_agent"]), *args]
        self.label = label
        self.url = f"http://{host}:{port}"
        self.lines: deque[str] = deque(maxlen=TAIL_LINES)
        self.proc: subprocess.Popen[bytes] | None = None
        missing = missing_model_dir(args, host)
        if missing:
            self.lines.append(f"{LOAD_FAILED_MARK} {missing}")
            return
        self.proc = subprocess.Popen(
            bind(command, host, port),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        self.pump = threading.Thread(target=self._pump, name="mlcp-agent-output", daemon=True)
        self.pump.start()

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines.append(line)
            print(line, flush=True)  # into the Ray worker's log as well

    def endpoint(self) -> str:
        return self.url

    def info(self) -> dict[str, object]:
        import ray

        return {
            "label": self.label,
            "endpoint": self.url,
            "node": ray.get_runtime_context().get_node_id(),
            "pid": None if self.proc is None else self.proc.pid,
        }

    def poll(self) -> int | None:
        """None while the agent runs; its exit status otherwise (negative: a signal)."""
        if self.proc is None:
            return MISSING_EXIT
        return self.proc.poll()

    def tail(self, lines: int) -> list[str]:
        if self.proc is not None and self.proc.poll() is not None:
            self.pump.join(timeout=1)  # the last lines of an agent that ended
        return list(self.lines)[-lines:] if lines > 0 else []

    def terminate(self, grace_s: float) -> int | None:
        """SIGTERM the agent's process group, SIGKILL it after `grace_s`; its exit status."""
        if self.proc is None:
            return MISSING_EXIT
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            while self.proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        return self.proc.poll()


def gpu_totals() -> dict[int, int]:
    """Each GPU's total memory on this node, from NVML (run as a Ray task there); {} without."""
    from instance_agent.nvml import device_memory

    return {d.index: d.total_bytes for d in device_memory()}
