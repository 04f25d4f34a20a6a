"""The GPU check script on a host without a GPU: says why at once and exits non-zero."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from control_plane.capacity import gpu_readings

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.py"


@pytest.mark.skipif(bool(gpu_readings()), reason="this host has a GPU: run make gpu-check")
def test_no_gpu_is_said_clearly_and_quickly() -> None:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(SCRIPT)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(SCRIPT.parents[1])},
    )
    assert done.returncode == 3, done.stdout + done.stderr
    assert "gpu-check: no GPU (NVML: " in done.stderr
    assert done.stdout == ""  # no control plane, no database, nothing started
    assert time.monotonic() - started < 30
