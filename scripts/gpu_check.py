"""The GPU check: mlcp end to end on `cuda:0`, in one go, offline, printing the GPU figures.

    make gpu-check            # or: PYTHONPATH=. .venv/bin/python scripts/gpu_check.py

Starts a control plane of its own (embedded PostgreSQL in a temporary folder, loopback, its
benchmark worker on cuda:0), benchmarks SmolLM2 on the GPU, loads it, runs and streams, reads
the instance's own VRAM peak, raises its concurrency to 8, loads a second (tiny, built
in-process) model, evicts SmolLM2 and times until its memory is back; then a bare
transformers load and generation of the same weights on the GPU and on the host for the
ratios. Every step has a deadline; the whole run stays under 8 minutes. Needs no network: the
demo model is the packaged GGUF file, torch and transformers are those installed.

Exit codes: 0 done (figures printed), 3 no GPU here (NVML or torch says why), 1 a step failed.

`--rehearse-on-cpu` runs the same steps on the host (device "cpu", host memory in place of
VRAM), to check the script itself where there is no GPU; its numbers are not GPU figures.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
SECOND = "local/tiny-gpt2"
TOTAL_DEADLINE_S = 470.0
TOKENS = 64
PROMPT = "Write a short story about a lighthouse keeper."
SAFETY_MARGIN = 0.01  # the benchmarker's margin on measured peaks (benchmarker/estimate.py)
STARTED = time.monotonic()
# "cuda", or "cpu" for a rehearsal (--rehearse-on-cpu).
KIND = "cuda"


class CheckFailed(Exception):
    pass


def no_gpu_reason() -> str | None:
    """Why this host cannot run the check (NVML, then torch), or None when it can."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            count = pynvml.nvmlDeviceGetCount()
        finally:
            pynvml.nvmlShutdown()
    except Exception as exc:  # the library raises its own error types, or is missing
        return f"no GPU (NVML: {type(exc).__name__}: {exc})"
    if count == 0:
        return "no GPU (NVML: 0 devices)"
    probe = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.__version__, torch.cuda.is_available())"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = probe.stdout.split()
    if probe.returncode != 0 or len(out) != 2:
        return f"no usable torch: {probe.stderr.strip()[-300:]}"
    if out[1] != "True":
        return (
            f"NVML sees {count} GPU(s) but torch {out[0]} has no CUDA: "
            "reinstall with MLCP_TORCH=cuda (or system) make install"
        )
    return None


def left_s() -> float:
    return TOTAL_DEADLINE_S - (time.monotonic() - STARTED)


def step(text: str) -> None:
    print(f"[{time.monotonic() - STARTED:6.1f} s] {text}", flush=True)


class Api:
    def __init__(self, base: str, key: str) -> None:
        self.base, self.key = base, key

    def call(self, method: str, path: str, body: Any = None, timeout: float = 120) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method)
        request.add_header("Authorization", f"Key {self.key}")
        request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=min(timeout, max(1.0, left_s()))) as r:
                return json.loads(r.read() or b"null")
        except urllib.error.HTTPError as exc:
            raise CheckFailed(f"{method} {path}: {exc.code} {exc.read()[:300]!r}") from exc

    def stream(self, body: dict[str, Any]) -> int:
        """Stream a run as raw text chunks; the number of chunks received."""
        request = urllib.request.Request(
            self.base + "/model/run", data=json.dumps(body).encode(), method="POST"
        )
        request.add_header("Authorization", f"Key {self.key}")
        request.add_header("Content-Type", "application/json")
        chunks = 0
        with urllib.request.urlopen(request, timeout=120) as response:
            while response.read1(65536):
                chunks += 1
        return chunks

    def until(self, what: str, check: Any, limit_s: float) -> Any:
        deadline = time.monotonic() + min(limit_s, left_s())
        while time.monotonic() < deadline:
            value = check()
            if value:
                return value
            time.sleep(0.25)
        raise CheckFailed(f"{what}: not within {limit_s:.0f} s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_control_plane(data: Path, models: Path, key: str) -> tuple[subprocess.Popen[bytes], Api]:
    port = free_port()
    env = {
        **os.environ,
        "MLCP_DATA_DIR": str(data),
        "MLCP_PORT": str(port),
        "MLCP_ADMIN_KEY": key,
        "MLCP_MODEL_DIRS": str(models),
        "MLCP_BENCHMARK_DEVICE": "cuda:0" if KIND == "cuda" else "cpu",
        "MLCP_STOP_INSTANCES_ON_EXIT": "true",
        "HF_HUB_OFFLINE": "1",
    }
    log = (data / "control-plane.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "control_plane", "serve"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    api = Api(f"http://127.0.0.1:{port}", key)

    def up() -> bool:
        if proc.poll() is not None:
            raise CheckFailed(f"the control plane exited ({proc.returncode}); see {log.name}")
        with contextlib.suppress(OSError, CheckFailed):
            return api.call("GET", "/health", timeout=2) is not None
        return False

    api.until("control plane up", up, 90)
    return proc, api


def benchmark(api: Api, model: str) -> None:
    def available() -> bool:
        answer = api.call("POST", "/model/job", {"model": model})
        if not answer["success"]:
            raise CheckFailed(f"benchmark of {model} failed: {answer['message']}")
        return bool(answer["message"] == "Model available")

    api.until(f"benchmark of {model}", available, 240)


def load(api: Api, model: str, concurrency: int) -> float:
    """Load on the GPU and wait until RUNNING; seconds from the request."""
    started = time.monotonic()
    api.call("POST", "/model/load", {"model": model, "concurrency": concurrency, "device": KIND})

    def running() -> bool:
        status = api.call("POST", "/model/status", {"model": model})["status"]
        if status == "FAILED":
            raise CheckFailed(f"{model} failed to start")
        return bool(status == "RUNNING")

    api.until(f"{model} RUNNING", running, 120)
    return time.monotonic() - started


def tokens_per_second(api: Api, model: str, concurrency: int) -> float:
    body = {"model": model, "prompt": PROMPT, "params": {"max_new_tokens": TOKENS}}
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        answers = list(
            pool.map(lambda _i: api.call("POST", "/model/run", body), range(concurrency))
        )
    seconds = time.monotonic() - started
    return sum(int(a["tokens_generated"]) for a in answers) / seconds


def instance_peak_vram(api: Api, model: str) -> int:
    endpoint = api.call("POST", "/model/status", {"model": model}).get("endpoint")
    if not endpoint:
        raise CheckFailed("the admin status has no endpoint to read the instance's memory from")
    with urllib.request.urlopen(endpoint + "/health", timeout=10) as response:
        memory = json.loads(response.read()).get("memory") or {}
    peak = memory.get("peakGpuBytes" if KIND == "cuda" else "peakRssBytes")
    if not isinstance(peak, int) or peak <= 0:
        raise CheckFailed(f"the instance reports no {KIND} memory (NVML per-process): {memory}")
    return peak


BARE = """
import sys, time
t0 = time.monotonic()
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path, device = sys.argv[1], sys.argv[2]
tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype).to(device)
ids = tok(sys.argv[3], return_tensors="pt").to(device)
model.generate(**ids, max_new_tokens=1, do_sample=False)
if device == "cuda": torch.cuda.synchronize()
load_s = time.monotonic() - t0
t1 = time.monotonic()
out = model.generate(**ids, max_new_tokens=int(sys.argv[4]), min_new_tokens=int(sys.argv[4]),
                     do_sample=False)
if device == "cuda": torch.cuda.synchronize()
print(load_s, (out.shape[1] - ids["input_ids"].shape[1]) / (time.monotonic() - t1))
"""


def bare(model_dir: Path, device: str) -> tuple[float, float]:
    """(import + load + first token seconds, tokens/s) of plain transformers, no mlcp."""
    done = subprocess.run(
        [sys.executable, "-c", BARE, str(model_dir), device, PROMPT, str(TOKENS)],
        capture_output=True,
        text=True,
        timeout=max(10.0, left_s()),
    )
    if done.returncode != 0:
        raise CheckFailed(f"bare load on {device} failed: {done.stderr.strip()[-300:]}")
    load_s, tps = done.stdout.split()[-2:]
    return float(load_s), float(tps)


def converted_dir(data: Path) -> Path:
    for config in sorted(data.rglob("config.json")):
        if "smollm2" in str(config.parent).lower():
            return config.parent
    raise CheckFailed(f"no converted SmolLM2 folder under {data}")


def run_check(data: Path) -> dict[str, float]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.tiny_model import build_tiny_model

    models = data / "models"
    build_tiny_model(models / SECOND)
    key = "mlcp_" + secrets.token_hex(16)
    step(f"starting a control plane (embedded PostgreSQL, benchmark worker on {KIND})")
    proc, api = start_control_plane(data, models, key)
    figures: dict[str, float] = {}
    try:
        step(f"benchmarking {MODEL} on {'cuda:0' if KIND == 'cuda' else 'the host'}")
        benchmark(api, MODEL)
        plan = api.call("POST", "/model/load", {"model": MODEL, "dryRun": True, "device": KIND})
        if plan.get("deviceKind") != KIND or not plan.get("requiredBytes"):
            raise CheckFailed(f"the plan is not a GPU placement: {plan}")
        benchmarked = plan["requiredBytes"] / (1 + SAFETY_MARGIN)
        step(f"loading it on {plan['device']} (VRAM {benchmarked / 1e9:.3f} GB measured)")
        figures["cold_start_s"] = load(api, MODEL, 1)
        figures["tps_c1"] = tokens_per_second(api, MODEL, 1)
        chunks = api.stream({"model": MODEL, "prompt": PROMPT, "stream": True})
        if chunks < 2:
            raise CheckFailed(f"the stream came in {chunks} chunk(s)")
        observed = instance_peak_vram(api, MODEL)
        figures["vram_benchmarked_over_observed"] = benchmarked / observed
        step("raising its concurrency to 8")
        api.call("POST", "/model/load", {"model": MODEL, "concurrency": 8, "device": KIND})
        figures["tps_c8"] = tokens_per_second(api, MODEL, 8)
        step(f"benchmarking and loading a second model ({SECOND})")
        benchmark(api, SECOND)
        load(api, SECOND, 1)
        tokens_per_second(api, SECOND, 1)
        step(f"evicting {MODEL}")
        started = time.monotonic()
        api.call("POST", "/model/delete", {"model": MODEL})
        api.until(
            "eviction",
            lambda: api.call("POST", "/model/status", {"model": MODEL})["status"] == "STOPPED",
            60,
        )
        figures["evict_to_released_s"] = time.monotonic() - started
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    step("bare transformers on the GPU and on the host, for the ratios")
    weights = converted_dir(data)
    bare_load_s, bare_gpu_tps = bare(weights, KIND)
    _, bare_cpu_tps = bare(weights, "cpu") if KIND == "cuda" else (0.0, bare_gpu_tps)
    figures["cold_over_bare"] = figures["cold_start_s"] / bare_load_s
    figures["c8_over_c1"] = figures["tps_c8"] / figures["tps_c1"]
    figures["gpu_over_cpu_bare"] = bare_gpu_tps / bare_cpu_tps
    figures.update(bare_load_s=bare_load_s, bare_gpu_tps=bare_gpu_tps, bare_cpu_tps=bare_cpu_tps)
    return figures


def main() -> int:
    global KIND
    if sys.argv[1:] == ["--rehearse-on-cpu"]:
        KIND = "cpu"
    elif sys.argv[1:]:
        print("usage: gpu_check.py [--rehearse-on-cpu]", file=sys.stderr)
        return 2
    reason = no_gpu_reason() if KIND == "cuda" else None
    if reason is not None:
        print(f"gpu-check: {reason}; nothing to check on this host", file=sys.stderr)
        return 3
    with tempfile.TemporaryDirectory(prefix="mlcp-gpu-check-") as tmp:
        try:
            figures = run_check(Path(tmp))
        except (CheckFailed, OSError, subprocess.SubprocessError) as exc:
            print(f"gpu-check FAILED after {time.monotonic() - STARTED:.0f} s: {exc}")
            with contextlib.suppress(OSError):
                print((Path(tmp) / "control-plane.log").read_text()[-3000:])
            return 1
    ratio = figures["vram_benchmarked_over_observed"]
    where = "cuda:0" if KIND == "cuda" else "REHEARSAL on the host: not GPU figures"
    print(f"\ngpu-check figures ({where})")
    print(
        f"  benchmarked VRAM / observed peak of a separate instance: {ratio:.3f} (goal 0.98-1.05)"
    )
    print(f"  tokens/s at concurrency 8 / at 1 (GPU): {figures['c8_over_c1']:.2f}")
    print(f"  tokens/s GPU / CPU (bare transformers): {figures['gpu_over_cpu_bare']:.2f}")
    print(f"  cold start on GPU / bare import+load: {figures['cold_over_bare']:.2f}")
    print(json.dumps({k: round(v, 4) for k, v in figures.items()}))
    print(f"done in {time.monotonic() - STARTED:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
