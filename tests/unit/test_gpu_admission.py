"""Admission by device kind, as pure functions over readings a fake NVML would give.

Two GPUs of different sizes beside a host; a model measured on `cuda` reserves its VRAM on the
GPU that fits it best *and* its host memory on the host, so the host can be the binding limit.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from benchmarker.estimate import Phase, Profile, with_margin
from control_plane.device_kind import (
    CPU,
    CUDA,
    Need,
    Observed,
    candidates,
    choose_kind,
    kind_of,
    need_on,
)
from control_plane.placement import (
    Device,
    Evict,
    Fit,
    Full,
    NeverFits,
    Place,
    Reservation,
    Retune,
    decide,
    plan_load,
)

NOW = datetime(2026, 1, 1, tzinfo=UTC)
GB = 1_000_000_000
HOST = Device("cpu", 10 * GB)  # 9 GB usable
SMALL = Device("cuda:0", 20 * GB)  # 18 GB usable
LARGE = Device("cuda:1", 80 * GB)  # 72 GB usable
ALL = [HOST, SMALL, LARGE]


def res(
    id_: int, gb: float, device: str, *, host_gb: float = 0, idle_s: float = 60, busy: int = 0
) -> Reservation:
    return Reservation(
        id_,
        f"org/m{id_}",
        device,
        int(gb * GB),
        busy,
        NOW - timedelta(seconds=idle_s),
        3.0,
        "RUNNING",
        int(host_gb * GB),
    )


def gpu_decide(vram_gb: float, host_gb: float, held: list[Reservation]) -> object:
    gpus, host = candidates(CUDA, ALL)
    return decide(int(vram_gb * GB), gpus, held, NOW, host=host, host_bytes=int(host_gb * GB))


def test_kind_follows_the_request_the_hardware_and_a_live_instance() -> None:
    assert choose_kind("auto", ALL, None) == CUDA
    assert choose_kind("auto", [HOST], None) == CPU
    assert choose_kind("cpu", ALL, None) == CPU
    assert choose_kind("cuda", [HOST], None) == CUDA  # the caller refuses: no GPU here
    assert choose_kind("cpu", ALL, "cuda:1") == CUDA  # a loaded model keeps its device
    assert choose_kind("auto", ALL, "cpu") == CPU
    assert kind_of("cuda:3") == CUDA and kind_of("cpu") == CPU


def test_candidates_are_the_devices_of_the_kind_and_the_host_beside_gpus() -> None:
    assert candidates(CPU, ALL) == ([HOST], None)
    assert candidates(CUDA, ALL) == ([SMALL, LARGE], HOST)
    assert candidates(CUDA, [HOST]) == ([], HOST)


def test_best_fit_across_gpus_of_different_sizes() -> None:
    small_fit = gpu_decide(10, 1, [])
    assert isinstance(small_fit, Fit) and small_fit.device == "cuda:0"
    assert small_fit.headroom_bytes == 8 * GB
    large_only = gpu_decide(30, 1, [])
    assert isinstance(large_only, Fit) and large_only.device == "cuda:1"
    # The small GPU is taken: the large one is next, without evicting anything.
    beside = gpu_decide(10, 1, [res(1, 12, "cuda:0", host_gb=1)])
    assert isinstance(beside, Fit) and beside.device == "cuda:1"


def test_vram_on_no_gpu_can_ever_hold_it_never_fits() -> None:
    decision = gpu_decide(75, 1, [])
    assert isinstance(decision, NeverFits) and decision.largest_device_bytes == 72 * GB


def test_host_ram_is_the_binding_limit_of_a_gpu_placement() -> None:
    # Plenty of VRAM, but a 9.5 GB host reservation never fits the 9 GB usable host.
    never = gpu_decide(5, 9.5, [])
    assert isinstance(never, NeverFits) and never.largest_device_bytes == HOST.usable_bytes
    # Host memory held by a CPU instance and by another GPU instance leaves 2 GB: 3 GB is full
    # when both are busy, and evicting the idle one frees its host memory even from the GPU.
    held = [res(1, 4, "cpu", busy=1), res(2, 1, "cuda:1", host_gb=3, busy=1)]
    full = gpu_decide(5, 3, held)
    assert isinstance(full, Full) and full.free_bytes == 2 * GB
    idle = [res(1, 4, "cpu", busy=1), res(2, 1, "cuda:1", host_gb=3, idle_s=600)]
    evict = gpu_decide(5, 3, idle)
    assert isinstance(evict, Evict) and [v.instance_id for v in evict.victims] == [2]
    assert evict.device == "cuda:0"  # best fit on VRAM still picks the tightest GPU


def test_a_gpu_instance_reserves_host_memory_against_cpu_loads() -> None:
    held = [res(1, 30, "cuda:1", host_gb=6, busy=1)]
    full = decide(4 * GB, [HOST], held, NOW)
    assert isinstance(full, Full) and full.free_bytes == 3 * GB
    assert isinstance(decide(3 * GB, [HOST], held, NOW), Fit)


def test_vram_evictions_stay_on_one_gpu_and_take_only_what_is_needed() -> None:
    held = [
        res(1, 10, "cuda:0", host_gb=0.5, idle_s=100),
        res(2, 6, "cuda:0", host_gb=0.5, idle_s=900),
        res(3, 70, "cuda:1", host_gb=0.5, busy=1),
    ]
    # 6 GB (the longest idle) is enough for 7 GB; for 12 GB the 10 GB one alone is needed.
    seven = gpu_decide(7, 1, held)
    assert isinstance(seven, Evict) and seven.device == "cuda:0"
    assert [v.instance_id for v in seven.victims] == [2]
    twelve = gpu_decide(12, 1, held)
    assert isinstance(twelve, Evict) and [v.instance_id for v in twelve.victims] == [1]
    assert isinstance(gpu_decide(19, 1, held), Full)  # cuda:1 is busy, cuda:0 too small


def test_a_live_gpu_instance_grows_on_its_own_gpu_and_on_the_host() -> None:
    gpus, host = candidates(CUDA, ALL)
    own = res(7, 5, "cuda:0", host_gb=1)
    same = plan_load("org/m7", 5 * GB, gpus, [own], NOW, host=host, host_bytes=1 * GB)
    assert isinstance(same, Retune) and same.decision is None
    more_host = plan_load("org/m7", 5 * GB, gpus, [own], NOW, host=host, host_bytes=9 * GB)
    assert isinstance(more_host, Retune) and isinstance(more_host.decision, Fit)
    too_much = plan_load("org/m7", 5 * GB, gpus, [own], NOW, host=host, host_bytes=10 * GB)
    assert isinstance(too_much, Retune) and isinstance(too_much.decision, NeverFits)
    new = plan_load("org/new", 5 * GB, gpus, [own], NOW, host=host, host_bytes=1 * GB)
    assert isinstance(new, Place) and isinstance(new.decision, Fit)


def profile(kind: str, rss_gb: tuple[float, ...], gpu_gb: tuple[float | None, ...]) -> Profile:
    phases = tuple(
        Phase(c, int(r * GB), None if g is None else int(g * GB), 10, 1.0)
        for c, r, g in zip((1, 2, 4), rss_gb, gpu_gb, strict=True)
    )
    return Profile(kind, 2.0, 0, phases)


CUDA_PROFILE = profile(CUDA, (1.0, 1.1, 1.2), (2.0, 2.5, 3.5))
CPU_PROFILE = profile(CPU, (3.0, 3.5, 4.0), (None, None, None))


def test_a_cuda_profile_gives_vram_and_host_memory() -> None:
    need = need_on(CUDA, CUDA_PROFILE, 2, 3 * GB)
    assert need == Need(CUDA, with_margin(int(2.5 * GB)), with_margin(int(1.1 * GB)))
    # Beyond concurrency 4 the last slope extrapolates, as for host memory.
    assert need_on(CUDA, CUDA_PROFILE, 8, None).device_bytes == with_margin(int(5.5 * GB))


@pytest.mark.parametrize(
    ("kind", "prof", "catalog", "expected"),
    [
        (CUDA, None, 3 * GB, Need(CUDA, None)),  # not measured on a GPU: benchmark it there
        (CUDA, CPU_PROFILE, 3 * GB, Need(CUDA, None)),  # a cpu profile says nothing of VRAM
        (CPU, CPU_PROFILE, None, Need(CPU, with_margin(3 * GB))),
        (CPU, CPU_PROFILE, 5 * GB, Need(CPU, 5 * GB)),  # the catalog figure was raised
        (CPU, None, 2 * GB, Need(CPU, 2 * GB)),
    ],
)
def test_profile_selection(
    kind: str, prof: Profile | None, catalog: int | None, expected: Need
) -> None:
    assert need_on(kind, prof, 1, catalog) == expected


def test_live_observed_vram_and_host_memory_correct_the_profile() -> None:
    seen = Observed(rss_bytes=2 * GB, gpu_bytes=4 * GB)
    need = need_on(CUDA, CUDA_PROFILE, 1, None, seen)
    assert need == Need(CUDA, with_margin(4 * GB), with_margin(2 * GB))
    lower = need_on(CUDA, CUDA_PROFILE, 1, None, Observed(GB // 2, GB))
    assert lower == need_on(CUDA, CUDA_PROFILE, 1, None)  # never lowered by a reading


def test_the_builtin_benchmark_worker_measures_where_instances_will_run() -> None:
    from pydantic import ValidationError

    from control_plane.capacity import benchmark_device, gpu_readings
    from control_plane.settings import Settings

    assert benchmark_device("cuda:1", True) == "cuda:1"
    assert benchmark_device("auto", False) == "cpu"
    assert benchmark_device("auto", True) == ("cuda:0" if gpu_readings() else "cpu")
    assert Settings(benchmark_device="cuda:2").benchmark_device == "cuda:2"
    with pytest.raises(ValidationError):
        Settings(benchmark_device="gpu")
