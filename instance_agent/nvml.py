"""NVIDIA GPU memory through NVML (`nvidia-ml-py`): the one place mlcp talks to the driver.

Every caller gets the same answer on a machine without a driver or without the package: no
session (`None`), so CPU-only hosts take the same code path with nothing to read. NVML counts
`nvmlInit` calls, so a short reading (`session()`) and a long-lived reader (an agent sampling
its own memory, the benchmarker sampling a child) can coexist in one process.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceMemory:
    """One GPU's memory now."""

    index: int
    total_bytes: int
    free_bytes: int


class Nvml:
    """An initialised NVML library; every reading answers None when the driver refuses it."""

    def __init__(self, lib: Any) -> None:
        self._lib = lib

    @classmethod
    def open(cls) -> Nvml | None:
        """A session, or None where there is no NVIDIA driver (or no nvidia-ml-py)."""
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception as exc:
            logger.debug("NVML unavailable: %s", exc)
            return None
        return cls(pynvml)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._lib.nvmlShutdown()

    def device_count(self) -> int:
        try:
            return int(self._lib.nvmlDeviceGetCount())
        except Exception:
            return 0

    def devices(self) -> list[DeviceMemory] | None:
        """Every GPU's total and free memory, or None when the driver cannot say."""
        try:
            out = []
            for index in range(self._lib.nvmlDeviceGetCount()):
                handle = self._lib.nvmlDeviceGetHandleByIndex(index)
                info = self._lib.nvmlDeviceGetMemoryInfo(handle)
                out.append(DeviceMemory(index, int(info.total), int(info.free)))
            return out
        except Exception as exc:
            logger.warning("could not read GPU memory through NVML: %s", exc)
            return None

    def used_by(self, pids: set[int]) -> int | None:
        """GPU memory held by these processes on all GPUs, or None when it cannot be read
        (containers often hide other pids from NVML; a missing reading must fail nothing)."""
        total = 0
        try:
            for index in range(self._lib.nvmlDeviceGetCount()):
                handle = self._lib.nvmlDeviceGetHandleByIndex(index)
                for info in self._lib.nvmlDeviceGetComputeRunningProcesses(handle):
                    if info.pid in pids and info.usedGpuMemory is not None:
                        total += int(info.usedGpuMemory)
        except Exception as exc:
            logger.debug("GPU memory of processes unreadable: %s", exc)
            return None
        return total


@contextlib.contextmanager
def session() -> Iterator[Nvml | None]:
    """A session for one reading, shut down after it."""
    nvml = Nvml.open()
    try:
        yield nvml
    finally:
        if nvml is not None:
            nvml.close()


def device_memory() -> list[DeviceMemory]:
    """Each GPU's memory now; [] without a driver (or when it cannot be read)."""
    with session() as nvml:
        return (nvml.devices() or []) if nvml is not None else []
