"""The process runtime finds its agents by the label in their environment (/proc, else psutil)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

from control_plane.runtimes.process import LABEL_ENV, _labelled_by_psutil, labelled_processes


def test_labelled_processes_are_found_with_their_command_line() -> None:
    label = f"scan-{uuid.uuid4().hex[:8]}:7:3"
    argv = [sys.executable, "-c", "import time; time.sleep(30)", "--port", "40123"]
    proc = subprocess.Popen(argv, env={**os.environ, LABEL_ENV: label})
    try:
        mine = [p for p in labelled_processes() if p[1] == label]
        assert mine == [(proc.pid, label, argv)]
        # The same answer as psutil's, which serves where there is no /proc.
        assert [p for p in _labelled_by_psutil() if p[1] == label] == mine
        assert all(p[1] != label for p in labelled_processes() if p[0] == os.getpid())
    finally:
        proc.kill()
        proc.wait()
    assert [p for p in labelled_processes() if p[1] == label] == []
