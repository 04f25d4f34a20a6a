"""Proxy overhead: /model/run through the control plane vs the same fake agent called directly.

Prints added latency (p50, p99) for a fast instance beside nginx's (a reverse proxy with a
keep-alive upstream to the same agent, measured in the same rounds), throughput proxied ÷ direct
at 8 concurrent clients against a 20 ms instance, and streaming throughput proxied ÷ direct.

nginx comes from Debian's package, downloaded and unpacked by the benchmark into its own cache
(`apt-get download` + `dpkg -x`: nothing is installed on the system); where that is not possible
its line says why and is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp

from benchmarks.harness import FAKE_AGENT, ControlPlane, control_plane, percentile
from tests.fake_agent import write_fake_model

LATENCY_ROUNDS = 1500
# Throughput is measured in short direct/proxied pairs, alternating which goes first: other work
# on a shared 2-core box shifts over seconds, and two long sequential rounds per side let one
# burst of it land on one side only (direct streaming read 88 and 224 streams/s in two runs).
THROUGHPUT_PAIRS = 6
THROUGHPUT_S = 1.5
CLIENTS = 8
STREAM_TOKENS = 200
NGINX_CACHE = Path(tempfile.gettempdir()) / "mlcp-bench-peers" / "nginx"
NGINX_CONF = """
worker_processes 1;
daemon off;
master_process off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream agent {{ server 127.0.0.1:{agent_port}; keepalive 16; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://agent;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
"""


def nginx_binary() -> Path | str:
    """Debian's nginx unpacked into the benchmark's cache, or why it cannot be."""
    binary = NGINX_CACHE / "root" / "usr" / "sbin" / "nginx"
    if binary.is_file():
        return binary
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        return "no apt-get/dpkg here to fetch Debian's nginx"
    NGINX_CACHE.mkdir(parents=True, exist_ok=True)
    got = subprocess.run(
        ["apt-get", "download", "nginx"],
        cwd=NGINX_CACHE,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    debs = sorted(NGINX_CACHE.glob("nginx_*.deb"))
    if got.returncode != 0 or not debs:
        return (got.stderr.strip().splitlines() or ["apt-get download failed"])[-1]
    subprocess.run(["dpkg", "-x", str(debs[-1]), str(NGINX_CACHE / "root")], check=True)
    return binary if binary.is_file() else "the nginx package holds no usr/sbin/nginx"


@contextlib.contextmanager
def nginx_in_front_of(agent_endpoint: str) -> Iterator[str | None]:
    """nginx proxying to the agent on loopback: its base URL, or None (the reason printed)."""
    binary = nginx_binary()
    if isinstance(binary, str):
        print(f"proxy latency: nginx skipped: {binary}")
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="mlcp-bench-nginx-") as tmp:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        agent_port = int(agent_endpoint.rsplit(":", 1)[1])
        conf = Path(tmp) / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=tmp, port=port, agent_port=agent_port))
        proc = subprocess.Popen(
            [str(binary), "-p", tmp, "-c", str(conf), "-e", f"{tmp}/error.log"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            for _ in range(100):
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
                    break
                if proc.poll() is not None:
                    print(f"proxy latency: nginx exited: {(Path(tmp) / 'error.log').read_text()}")
                    yield None
                    return
                time.sleep(0.05)
            yield f"http://127.0.0.1:{port}"
        finally:
            proc.terminate()
            proc.wait(10)


async def _latency(cp: ControlPlane, endpoint: str, nginx: str | None) -> None:
    headers = {"Authorization": f"Key {cp.key}"}
    direct: list[float] = []
    proxied: list[float] = []
    peer: list[float] = []
    targets = [(endpoint + "/run", direct), (cp.base + "/model/run", proxied)]
    if nginx is not None:
        targets.append((nginx + "/run", peer))
    async with aiohttp.ClientSession() as s:
        for i in range(LATENCY_ROUNDS + 100):
            # Alternate so all see the same machine state, side by side.
            for target, out in targets:
                body: dict[str, object] = {"prompt": "hi"}
                if "/model/" in target:
                    body = {"model": "bench/fast", "prompt": "hi"}
                t0 = time.perf_counter()
                async with s.post(target, json=body, headers=headers) as r:
                    await r.read()
                    assert r.status == 200, await r.text()
                if i >= 100:
                    out.append((time.perf_counter() - t0) * 1000)
    d50, d99 = percentile(direct, 0.5), percentile(direct, 0.99)
    p50, p99 = percentile(proxied, 0.5), percentile(proxied, 0.99)
    print(
        f"proxy latency: added p50 {p50 - d50:.2f} ms (goal <= 0.25), added p99 {p99 - d99:.2f} ms"
        f" [direct p50 {d50:.2f} / p99 {d99:.2f} ms; proxied p50 {p50:.2f} / p99 {p99:.2f} ms;"
        f" ratio p50 {p50 / d50:.2f}x]"
    )
    if peer:
        added, peer_added = p50 - d50, percentile(peer, 0.5) - d50
        ratio = f"; mlcp's ÷ nginx's {added / peer_added:.1f}x" if peer_added > 0 else ""
        print(f"proxy latency: nginx added p50 {peer_added:.2f} ms in the same rounds{ratio}")


async def _load(url: str, body: dict[str, object], headers: dict[str, str], stream: bool) -> int:
    """Requests (or streamed tokens) completed by CLIENTS workers in THROUGHPUT_S."""
    done = 0
    deadline = time.perf_counter() + THROUGHPUT_S
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                async with s.post(url, json=body, headers=headers) as r:
                    assert r.status == 200, await r.text()
                    if stream:
                        async for _ in r.content.iter_any():
                            pass
                    else:
                        await r.read()
                done += 1

        await asyncio.gather(*(worker() for _ in range(CLIENTS)))
    return done


async def _throughput(
    cp: ControlPlane, endpoint: str, model: str, stream: bool
) -> tuple[float, int, int, list[float]]:
    """Proxied ÷ direct over all pairs, the totals, and each pair's own ratio (the spread)."""
    headers = {"Authorization": f"Key {cp.key}"}
    path = "/stream" if stream else "/run"
    direct_total = proxied_total = 0
    pair_ratios: list[float] = []
    for i in range(THROUGHPUT_PAIRS):
        sides: list[tuple[str, dict[str, object]]] = [
            (endpoint + path, {"prompt": "x"}),
            (cp.base + "/model/run", {"model": model, "prompt": "x", "stream": stream}),
        ]
        counts: dict[str, int] = {}
        for url, body in sides if i % 2 == 0 else sides[::-1]:
            counts[url] = await _load(url, body, headers, stream)
        direct, proxied = counts[sides[0][0]], counts[sides[1][0]]
        direct_total += direct
        proxied_total += proxied
        pair_ratios.append(proxied / direct)
    return proxied_total / direct_total, direct_total, proxied_total, pair_ratios


async def _check_stream(cp: ControlPlane, model: str) -> None:
    """The proxied stream carries every token, however it groups them into chunks."""
    headers = {"Authorization": f"Key {cp.key}"}
    body = {"model": model, "prompt": "x", "stream": True}
    async with aiohttp.ClientSession() as s:
        async with s.post(cp.base + "/model/run", json=body, headers=headers) as r:
            text = (await r.read()).decode()
    assert text == "".join(f"tok{i} " for i in range(STREAM_TOKENS)), text[-200:]


def _spread(ratios: list[float]) -> str:
    return f"pairs {min(ratios):.2f}..{max(ratios):.2f}"


def _run_all(cp: ControlPlane, names: tuple[str, ...]) -> None:
    endpoints: dict[str, str] = {}
    cp.mark_measured(list(names), 50_000_000)
    for model, conc in zip(names, (1, 8, 8), strict=True):
        cp.call("/model/load", {"model": model, "concurrency": conc})
    for model in names:
        endpoints[model] = str(cp.wait_running(model)["endpoint"])
    with nginx_in_front_of(endpoints["bench/fast"]) as nginx:
        asyncio.run(_latency(cp, endpoints["bench/fast"], nginx))
    seconds = THROUGHPUT_PAIRS * THROUGHPUT_S
    ratio, d, p, pairs = asyncio.run(
        _throughput(cp, endpoints["bench/twenty-ms"], "bench/twenty-ms", False)
    )
    print(
        f"proxy throughput ({CLIENTS} clients, 20 ms instance): proxied/direct = "
        f"{ratio:.2f} (goal >= 0.9) [direct {d / seconds:.0f} req/s, "
        f"proxied {p / seconds:.0f} req/s; {_spread(pairs)}]"
    )
    asyncio.run(_check_stream(cp, "bench/stream"))
    ratio, d, p, pairs = asyncio.run(
        _throughput(cp, endpoints["bench/stream"], "bench/stream", True)
    )
    print(
        f"proxy streaming ({CLIENTS} streams of {STREAM_TOKENS} chunks): proxied/direct = "
        f"{ratio:.2f} (goal >= 0.95) [direct {d / seconds:.1f} streams/s, proxied "
        f"{p / seconds:.1f} streams/s; {_spread(pairs)}]"
    )


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp)
        write_fake_model(models, "bench/fast", "ok", delay_s=0.0)
        write_fake_model(models, "bench/twenty-ms", "ok", delay_s=0.02)
        write_fake_model(models, "bench/stream", "ok", delay_s=0.0, tokens=STREAM_TOKENS)
        with control_plane(
            [models],
            fake_agent=FAKE_AGENT,
            MLCP_MAX_QUEUE="64",
            MLCP_INCLUDE_PACKAGED_MODELS="false",
        ) as cp:
            # A control plane's shutdown no longer stops its instances (the next one adopts
            # them), so the benchmark deletes what it loaded.
            names = ("bench/fast", "bench/twenty-ms", "bench/stream")
            try:
                _run_all(cp, names)
            finally:
                for model in names:
                    with contextlib.suppress(OSError):
                        cp.call("/model/delete", {"model": model})


if __name__ == "__main__":
    main()
