"""Deploy and cold-call times of a handler API, through the `mlcp` CLI as a user runs it.

A real control plane (a subprocess, as `make run` serves) and `mlcp deploy` as a subprocess, on
the project `mlcp init` writes, whose requirements.txt names a local package (so each distinct
requirements file builds its own virtualenv, offline). Prints the median of REPEATS rounds:

- `mlcp deploy` → available for a changed project (new code and new requirements: a new
  virtualenv) and for the same project unchanged (cached environment, weights already stored),
  and unchanged ÷ changed;
- the first call to the deployed API once its instance is stopped (`POST /{name}`: a cold load
  through the control plane) ÷ a bare `python` that imports and initialises the same handler
  and calls it once.
Run: .venv/bin/python -m benchmarks.bench_deploy
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.error import HTTPError
from urllib.request import Request, urlopen

from benchmarks.harness import ADMIN_KEY, ROOT, control_plane
from control_plane.cli.scaffold import write_project

REPEATS = 3
NAME = "bench-deploy"
OWNER = "bench"
DEPLOY_TIMEOUT_S = 600

LIB = """\
[project]
name = "benchlib{i}"
version = "0.0.{i}"

[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"
"""

BARE_CALL = (
    "import sys, time\n"
    "from instance_agent.user_code import load_handler\n"
    "from pathlib import Path\n"
    "loaded = load_handler(Path(sys.argv[1]))\n"
    "assert loaded.call is not None\n"
    "loaded.call('so simple and quick!')\n"
)


def _request(base: str, method: str, path: str, key: str, body: object = None) -> object:
    data = None if body is None else json.dumps(body).encode()
    req = Request(
        base + path,
        data=data,
        method=method,
        headers={"Authorization": f"Key {key}", "Content-Type": "application/json"},
    )
    with urlopen(req, timeout=DEPLOY_TIMEOUT_S) as resp:
        return json.loads(resp.read())


def _mlcp(base: str, key: str, *args: str, cwd: Path) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLCP_")}
    env.update(MLCP_URL=base, MLCP_KEY=key, PYTHONPATH=str(ROOT))
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "control_plane", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        timeout=DEPLOY_TIMEOUT_S,
        check=False,
    )
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"mlcp {' '.join(args)} failed: {done.stderr.decode()[-2000:]}")
    return elapsed


def _change(project: Path, i: int) -> None:
    """New code and a new requirements file (a local package of its own): a new environment."""
    lib = project / "pkgs" / f"lib{i}"
    lib.mkdir(parents=True)
    (lib / "pyproject.toml").write_text(LIB.format(i=i))
    (lib / f"benchlib{i}.py").write_text(f"ROUND = {i}\n")
    (project / "requirements.txt").write_text(f"./pkgs/lib{i}\n")
    main = project / "src" / "main.py"
    main.write_text(main.read_text().split("\n# round")[0] + f"\n# round {i}\n")


def _cold_call(base: str, key: str) -> float:
    try:
        _request(base, "POST", "/model/delete", key, {"model": f"{OWNER}/{NAME}"})
    except HTTPError as exc:
        if exc.code != 404:  # 404: no instance is running, so the next call is cold anyway
            raise
    started = time.perf_counter()
    _request(base, "POST", f"/{NAME}", key, "so simple and quick!")
    return time.perf_counter() - started


def _bare(project: Path) -> float:
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", BARE_CALL, str(project)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=True,
        capture_output=True,
        timeout=120,
    )
    return time.perf_counter() - started


def main() -> None:
    changed: list[float] = []
    unchanged: list[float] = []
    cold: list[float] = []
    bare: list[float] = []
    with tempfile.TemporaryDirectory(prefix="mlcp-bench-deploy-") as tmp:
        project = Path(tmp) / NAME
        write_project(project, NAME)
        (project / "model" / "weights.bin").write_bytes(os.urandom(8 << 20))
        with control_plane(MLCP_INCLUDE_PACKAGED_MODELS="false") as cp:
            created = _request(
                cp.base, "POST", "/admin/keys", ADMIN_KEY, {"name": OWNER, "scope": "user"}
            )
            assert isinstance(created, dict)
            key = str(created["key"])
            for i in range(REPEATS):
                _change(project, i)
                changed.append(_mlcp(cp.base, key, "deploy", cwd=project))
                unchanged.append(_mlcp(cp.base, key, "deploy", cwd=project))
                cold.append(_cold_call(cp.base, key))
                bare.append(_bare(project))
    med = statistics.median
    print(f"mlcp deploy → available, changed project (new env): {med(changed):.2f} s")
    print(f"mlcp deploy → available, unchanged (cached env):    {med(unchanged):.2f} s")
    print(f"  unchanged ÷ changed: {med(unchanged) / med(changed):.2f}x")
    print(
        f"cold first call POST /{{api}}: {med(cold):.2f} s, bare import+init+call {med(bare):.2f} s"
    )
    print(f"  cold ÷ bare: {med(cold) / med(bare):.2f}x")


if __name__ == "__main__":
    main()
