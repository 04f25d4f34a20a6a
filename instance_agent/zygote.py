"""A fork server (zygote): torch and transformers imported once, one forked child per instance.

A fresh agent process spends most of its cold start importing torch and transformers (issue 15:
6.3 s of the agent's start on a 2-core box, forking a process that had them imported 0.63 s).
The zygote imports them, then waits on a Unix socket; each request forks a child that becomes
`python -m instance_agent serve …` with the request's arguments and environment, in its own
session, writing to its own log file.

The known trap: a child forked after the parent ran a parallel torch operation deadlocks on the
parent's OpenMP pool. So the zygote only imports: it never builds a tensor, never calls
`torch.set_num_threads` and never loads a tokenizer; every child sets its thread count itself
(`model.apply_thread_settings`) from its own environment, as a fresh process would.

Wire (one connection per child): the client sends one JSON line
`{"argv": [...], "env": {...}, "log": "/path", "cwd": "/path"}` (and optionally
`"die_with_zygote": true`: the kernel kills that child when the zygote exits, for the
benchmarker's measuring agents); the zygote answers
`{"pid": N}`, and later `{"exit": code}` when that child ends (a negative code: killed by that
signal, as `subprocess` reports it). The zygote exits when its stdin reaches end of file, so it
never outlives the control plane that started it; its children do, as instances always have.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import os
import random
import selectors
import signal
import socket
import sys
import threading
import traceback
from pathlib import Path
from typing import Any

READY_LINE = "mlcp-zygote: ready"
MAX_REQUEST_BYTES = 1 << 20
_REQUEST_TIMEOUT_S = 5.0
_REAP_INTERVAL_S = 0.1
# Modules a child would otherwise import during its first load: the transformers architectures
# of the catalog's models (each is imported lazily by `from_pretrained`) and the agent's server.
_PRELOAD = (
    "instance_agent.model",
    # llama-cpp-python's bindings: loading libllama starts no thread (ggml's pool starts at the
    # first decode, in the child); missing where it is not installed, which costs nothing.
    "instance_agent.llama_engine",
    "instance_agent.app",
    "uvicorn",
    "transformers.models.llama.modeling_llama",
    "transformers.models.gpt2.modeling_gpt2",
    "transformers.models.auto.tokenization_auto",
    "transformers.generation.utils",
)


def preload() -> None:
    """Import everything a child needs, and nothing that starts a thread pool."""
    for name in _PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError as exc:  # an optional architecture missing costs only its own import
            print(f"mlcp-zygote: preload of {name} skipped: {exc}", file=sys.stderr, flush=True)
    # transformers builds its table of checkpoint renamings (a few thousand regular expressions)
    # at the first load; plain Python, so it is built here once for every child.
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping

        get_checkpoint_conversion_mapping("llama")  # type: ignore[no-untyped-call]
    except ImportError:
        pass


def _read_request(conn: socket.socket) -> dict[str, Any]:
    conn.settimeout(_REQUEST_TIMEOUT_S)
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk:
            raise ValueError("the client closed before sending a request")
        data += chunk
        if len(data) > MAX_REQUEST_BYTES:
            raise ValueError("request too large")
    request = json.loads(data)
    if not (
        isinstance(request, dict)
        and isinstance(request.get("argv"), list)
        and all(isinstance(a, str) for a in request["argv"])
        and isinstance(request.get("env"), dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in request["env"].items())
        and isinstance(request.get("log"), str)
        and isinstance(request.get("cwd"), str)
        and isinstance(request.get("die_with_zygote", False), bool)
    ):
        raise ValueError("malformed request")
    return request


def _die_with(parent: int) -> None:
    """Have the kernel SIGKILL this process when `parent` (the zygote) exits."""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:  # it exited before the prctl took effect
        os._exit(1)


def _become_agent(request: dict[str, Any], close: list[socket.socket], parent: int) -> int:
    """In the forked child: detach, redirect, take the request's environment, serve."""
    if request.get("die_with_zygote") and sys.platform == "linux":
        _die_with(parent)
    os.setsid()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL)
    for sock in close:
        sock.close()
    log_fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    null_fd = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null_fd, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    os.close(null_fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    # Forked children would otherwise share the zygote's random state.
    random.seed()
    from instance_agent import model

    threads = model.apply_thread_settings()
    print(f"mlcp-zygote: forked pid {os.getpid()}, torch threads {threads}", flush=True)
    from instance_agent.__main__ import main

    return main(list(request["argv"]))


def _fork(request: dict[str, Any], close: list[socket.socket]) -> int:
    parent = os.getpid()
    pid = os.fork()
    if pid != 0:
        return pid
    code = 1
    try:
        code = _become_agent(request, close, parent)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 2
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        # Never return into the zygote's loop; the loader thread may still be inside torch.
        os._exit(code)
    return 0  # unreachable


def _send(conn: socket.socket, message: dict[str, int]) -> bool:
    try:
        conn.settimeout(_REQUEST_TIMEOUT_S)
        conn.sendall(json.dumps(message).encode() + b"\n")
    except OSError:
        return False
    return True


def serve(socket_path: Path) -> int:
    """Preload, listen on `socket_path`, fork a child per request until stdin closes."""
    preload()
    if threading.active_count() != 1:
        # A thread alive at fork time leaves its locks held in every child.
        print("mlcp-zygote: refusing to serve: preload started a thread", file=sys.stderr)
        return 3
    socket_path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(socket_path))
    os.chmod(socket_path, 0o600)
    listener.listen(64)
    children: dict[int, socket.socket] = {}
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, "accept")
    selector.register(sys.stdin.fileno(), selectors.EVENT_READ, "stdin")
    print(READY_LINE, flush=True)
    try:
        while True:
            for key, _ in selector.select(_REAP_INTERVAL_S):
                if key.data == "stdin":
                    if not os.read(sys.stdin.fileno(), 4096):
                        return 0  # the control plane is gone
                    continue
                if key.data == "exit":
                    # A child ended: `_reap` below reports it now, not at the next interval.
                    selector.unregister(key.fileobj)
                    os.close(key.fd)
                    continue
                conn, _ = listener.accept()
                try:
                    request = _read_request(conn)
                except (OSError, ValueError) as exc:
                    print(f"mlcp-zygote: bad request: {exc}", file=sys.stderr, flush=True)
                    conn.close()
                    continue
                pid = _fork(request, [listener, conn, *children.values()])
                children[pid] = conn
                _send(conn, {"pid": pid})
                _watch_exit(selector, pid)
            _reap(children)
    finally:
        listener.close()
        socket_path.unlink(missing_ok=True)


def _watch_exit(selector: selectors.BaseSelector, pid: int) -> None:
    """Wake the loop the moment child `pid` exits: its pidfd turns readable (Linux 5.3+).

    A load that evicted the child waits for its exit; without a pidfd the child is reaped at
    the next `_REAP_INTERVAL_S` (0.1 s) instead.
    """
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        return
    selector.register(fd, selectors.EVENT_READ, "exit")


def _reap(children: dict[int, socket.socket]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = children.pop(pid, None)
        if conn is not None:
            _send(conn, {"exit": os.waitstatus_to_exitcode(status)})
            conn.close()
