"""The Tiyaro seed's sample program, run as a subprocess against a live control plane.

The control plane runs as `make run` starts it (its own embedded PostgreSQL), with a tiny random
Whisper built here as `openai/whisper-tiny` in MLCP_MODEL_DIRS. The model is benchmarked the
way a user does it (`POST /model/job`), then `tests/e2e/seed/asyncWhisper.py` — the seed's code,
changed only in PROD_BASE and the model path — uploads an MP3 made here, submits, and polls
until success. It sleeps 15 s between polls, as published, hence slow.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile

from tests.e2e.server import http, start, stop
from tests.harness import ADMIN_KEY
from tests.tiny_model import build_tiny_whisper

SEED_PROGRAM = Path(__file__).resolve().parent / "seed" / "asyncWhisper.py"
MODEL = "openai/whisper-tiny"


@pytest.mark.slow
def test_the_seed_program_transcribes_an_mp3(tmp_path: Path) -> None:
    models = tmp_path / "models"
    build_tiny_whisper(models / MODEL)
    mp3 = tmp_path / "speech.mp3"
    t = np.arange(3 * 16000) / 16000
    soundfile.write(mp3, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000)
    logs = tmp_path / "logs"
    logs.mkdir()
    server = start(
        tmp_path / "data",
        logs,
        "seed",
        MLCP_ADMIN_KEY=ADMIN_KEY,
        MLCP_MODEL_DIRS=str(models),
        MLCP_INCLUDE_PACKAGED_MODELS="false",
        # Its instances stop with it, not at their expiry, minutes into the rest of the suite.
        MLCP_STOP_INSTANCES_ON_EXIT="true",
    )
    try:
        status, body = http("POST", server.base + "/model/job", ADMIN_KEY, {"model": MODEL})
        assert status == 200, body
        deadline = time.monotonic() + 180
        while body.get("message") != "Model available":
            assert time.monotonic() < deadline, body
            assert "failed" not in str(body.get("message")).lower(), body
            time.sleep(1)
            status, body = http("POST", server.base + "/model/job", ADMIN_KEY, {"model": MODEL})
        status, key = http("POST", server.base + "/admin/keys", ADMIN_KEY, {"name": "tiyaro"})
        assert status in (200, 201), key
        env = {**os.environ, "MLCP_URL": server.base, "TIYARO_API_KEY": key["key"]}
        run = subprocess.run(
            [sys.executable, str(SEED_PROGRAM), str(mp3)],
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
        assert run.returncode == 0, (run.stdout, run.stderr, server.err()[-3000:])
        out = run.stdout
        for line in (
            "-- Input payload_url --",
            "uploaded --",
            "-- async request submitted --",
            "status:  success",
            "-- Transcribed Text --",
            "-- Done --",
        ):
            assert line in out, out
        assert '"chunks"' in out and '"status": "success"' in out
    finally:
        stop(server)
