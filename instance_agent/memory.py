"""Memory readings of this process: resident set size, and GPU memory when it runs on CUDA.

A model's footprint grows with its first generations (measured with SmolLM2 by
`python -m benchmarks.bench_memory`: ~0.21x of its parameter bytes
right after a memory-mapped load, ~1.4x after a batch of 8), so peaks are sampled during
generation as well as on each health check, and checked against the kernel's own peak.
"""

from __future__ import annotations

import logging
import os
import resource
import sys
import threading

import psutil

from instance_agent.nvml import Nvml
from instance_agent.protocol import MemoryReading

logger = logging.getLogger(__name__)


class MemoryMonitor:
    """Samples this process's memory and remembers the peaks."""

    def __init__(self, *, gpu: bool) -> None:
        self._process = psutil.Process()
        self._lock = threading.Lock()
        self._peak_rss_bytes = 0
        self._peak_gpu_bytes: int | None = None
        self._nvml = Nvml.open() if gpu else None

    def sample(self) -> MemoryReading:
        """Take a reading now, updating the peaks."""
        rss_bytes = int(self._process.memory_info().rss)
        gpu_bytes = self._gpu_bytes()
        with self._lock:
            self._peak_rss_bytes = max(self._peak_rss_bytes, rss_bytes, _kernel_peak_rss_bytes())
            if gpu_bytes is not None:
                self._peak_gpu_bytes = max(self._peak_gpu_bytes or 0, gpu_bytes)
            return {
                "rssBytes": rss_bytes,
                "peakRssBytes": self._peak_rss_bytes,
                "gpuBytes": gpu_bytes,
                "peakGpuBytes": self._peak_gpu_bytes,
            }

    def _gpu_bytes(self) -> int | None:
        if self._nvml is None:
            return None
        return self._nvml.used_by({os.getpid()})


def _kernel_peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kibibytes, macOS bytes.
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024
