"""What memory this host has: host RAM (psutil) and each GPU (nvidia-ml-py) when present."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import psutil

from control_plane.placement import Device
from instance_agent.nvml import device_memory

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Observed:
    device: str
    total_bytes: int
    free_bytes: int


def gpu_readings() -> list[Observed]:
    """Each NVIDIA GPU's memory, or [] without a driver (every machine here has none)."""
    return [Observed(f"cuda:{d.index}", d.total_bytes, d.free_bytes) for d in device_memory()]


def gpu_free(device: str) -> int | None:
    """One GPU's free memory now ("cuda:0"), or None when NVML cannot read it."""
    return next((r.free_bytes for r in gpu_readings() if r.device == device), None)


def observe(host_memory_bytes: int | None, gpus: bool) -> list[Observed]:
    """Host RAM (a declared capacity replaces the machine's total) and GPUs."""
    vm = psutil.virtual_memory()
    total = host_memory_bytes or int(vm.total)
    free = min(int(vm.available), total)
    readings = [Observed("cpu", total, free)]
    if gpus:
        readings.extend(gpu_readings())
    return readings


def devices(readings: list[Observed]) -> list[Device]:
    return [Device(r.device, r.total_bytes) for r in readings]


def benchmark_device(setting: str, use_gpus: bool) -> str:
    """Where this control plane's benchmark worker measures: `auto` is the first GPU if any."""
    if setting != "auto":
        return setting
    return "cuda:0" if use_gpus and gpu_readings() else "cpu"
