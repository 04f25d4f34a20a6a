"""The one NVML module: readings from a driver, and the same None/[] answers without one."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from instance_agent.nvml import DeviceMemory, Nvml, device_memory


@dataclass
class FakeDriver:
    """Two GPUs, processes on each, and a switch that makes every call fail as a lost GPU does."""

    broken: bool = False
    shutdowns: int = 0

    def _check(self) -> None:
        if self.broken:
            raise RuntimeError("NVML_ERROR_GPU_IS_LOST")

    def nvmlDeviceGetCount(self) -> int:
        self._check()
        return 2

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        self._check()
        return index

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        self._check()
        return SimpleNamespace(total=(handle + 1) * 1000, free=(handle + 1) * 400)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[SimpleNamespace]:
        self._check()
        return [
            SimpleNamespace(pid=10, usedGpuMemory=100 * (handle + 1)),
            SimpleNamespace(pid=11, usedGpuMemory=None),  # hidden from this container
            SimpleNamespace(pid=12, usedGpuMemory=5),
        ]

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1


def test_devices_and_memory_used_by_a_set_of_processes() -> None:
    nvml = Nvml(FakeDriver())
    assert nvml.device_count() == 2
    assert nvml.devices() == [DeviceMemory(0, 1000, 400), DeviceMemory(1, 2000, 800)]
    assert nvml.used_by({10}) == 300
    assert nvml.used_by({10, 11, 12}) == 310
    assert nvml.used_by({99}) == 0


def test_a_failing_driver_answers_none_never_raises() -> None:
    driver = FakeDriver(broken=True)
    nvml = Nvml(driver)
    assert nvml.device_count() == 0
    assert nvml.devices() is None
    assert nvml.used_by({10}) is None
    nvml.close()
    assert driver.shutdowns == 1


def test_without_a_driver_there_is_no_session() -> None:
    if Nvml.open() is not None:
        pytest.skip("this host has an NVIDIA driver")
    assert device_memory() == []
