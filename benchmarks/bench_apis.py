"""Handler API call overhead: `POST /{api}` through the control plane vs the agent's `/handle`.

A real control plane (a subprocess, as `make run` serves) with a trivial handler deployed over
HTTP (`PUT /apis/{name}`, as `mlcp deploy` does) by a user key, so the call path is the real one:
key, API lookup, ownership, routing, relay. Prints, alternating call by call against the same
instance:

- the p50 (and p99) `POST /{api}` adds over `POST /handle` straight to the agent;
- the same for `POST /model/run {"model", "input"}` on that API, and the difference between the
  two (goal: `POST /{api}` adds at most the `/model/run` figure + 0.1 ms).
Run: .venv/bin/python -m benchmarks.bench_apis
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.harness import ControlPlane, control_plane, percentile
from tests.api_deploy import pack

ROUNDS = 1000
WARMUP = 100
NAME = "bench-echo"
OWNER = "bench"
HANDLER = """\
from instance_agent.handler import handler


@handler
def inference_handler(inputs, _):
    return inputs
"""


def _project(root: Path) -> Path:
    folder = root / NAME
    (folder / "src").mkdir(parents=True)
    (folder / "model").mkdir()
    (folder / "src" / "main.py").write_text(HANDLER)
    (folder / "mlcp.yaml").write_text(
        f"name: {NAME}\nhandler: {{type: python, path: src/main.py}}\nexample: 1\n"
    )
    return folder


async def _deploy(http: aiohttp.ClientSession, cp: ControlPlane, project: Path) -> str:
    admin = {"Authorization": f"Key {cp.key}"}
    async with http.post(
        cp.base + "/admin/keys", json={"name": OWNER, "scope": "user"}, headers=admin
    ) as r:
        key = str((await r.json())["key"])
    archive, blobs = pack(project)
    assert not blobs
    headers = {"Authorization": f"Key {key}", "Content-Type": "application/gzip"}
    async with http.put(f"{cp.base}/apis/{NAME}", data=archive, headers=headers) as r:
        assert r.status == 202, await r.text()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        async with http.get(f"{cp.base}/apis/{NAME}", headers=headers) as r:
            body = await r.json()
        if body["status"] == "available":
            return key
        if body["status"] == "failed":
            raise RuntimeError(f"deploy failed: {body['reason']}")
        await asyncio.sleep(0.2)
    raise RuntimeError("the API was not available within 300 s")


async def _latency(calls: dict[str, Any]) -> dict[str, list[float]]:
    """Milliseconds per call for each named coroutine factory, alternated call by call."""
    out: dict[str, list[float]] = {name: [] for name in calls}
    for i in range(ROUNDS + WARMUP):
        for name, call in calls.items():
            t0 = time.perf_counter()
            await call()
            if i >= WARMUP:
                out[name].append((time.perf_counter() - t0) * 1000)
    return out


async def _run(cp: ControlPlane, project: Path) -> None:
    async with aiohttp.ClientSession() as http:
        key = await _deploy(http, cp, project)
        user = {"Authorization": f"Key {key}", "Content-Type": "application/json"}
        async with http.post(f"{cp.base}/{NAME}", data="1", headers=user) as r:  # cold load
            assert r.status == 200, await r.text()
        status = cp.call("/model/status", {"model": f"{OWNER}/{NAME}"})
        assert isinstance(status, dict)
        endpoint = str(status["endpoint"])

        async def direct() -> None:
            async with http.post(endpoint + "/handle", data="1", headers=user) as r:
                await r.read()
                assert r.status == 200

        async def cortex() -> None:
            async with http.post(f"{cp.base}/{NAME}", data="1", headers=user) as r:
                await r.read()
                assert r.status == 200

        run_body = f'{{"model": "{OWNER}/{NAME}", "input": 1}}'

        async def model_run() -> None:
            async with http.post(f"{cp.base}/model/run", data=run_body, headers=user) as r:
                await r.read()
                assert r.status == 200

        times = await _latency({"direct": direct, "api": cortex, "run": model_run})
    d50, d99 = percentile(times["direct"], 0.5), percentile(times["direct"], 0.99)
    a50, a99 = percentile(times["api"], 0.5), percentile(times["api"], 0.99)
    r50 = percentile(times["run"], 0.5)
    print(
        f"POST /{{api}} via mlcp: added p50 {a50 - d50:.2f} ms, added p99 {a99 - d99:.2f} ms "
        f"[direct /handle p50 {d50:.2f} / p99 {d99:.2f} ms; via mlcp p50 {a50:.2f} / p99 "
        f"{a99:.2f} ms; p50 ratio {a50 / d50:.2f}x]"
    )
    print(
        f"POST /model/run with input on the same API: added p50 {r50 - d50:.2f} ms; "
        f"POST /{{api}} minus /model/run: {a50 - r50:+.2f} ms (goal <= +0.1)"
    )


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="mlcp-bench-apis-") as tmp:
        project = _project(Path(tmp))
        with control_plane(MLCP_INCLUDE_PACKAGED_MODELS="false") as cp:
            asyncio.run(_run(cp, project))


if __name__ == "__main__":
    main()
