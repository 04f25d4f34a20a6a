"""What a measurement means for placement: pure functions over measured numbers, no IO."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

# The catalog figure is the measured peak plus this margin. Run-to-run noise of the peak of one
# model was well under 1% here (benchmarks/bench_memory.py), and the goal is "never more than 2%
# under the peak a running instance reaches": 1% keeps clear of that while staying within 5%.
SAFETY_MARGIN = 0.01


@dataclass(frozen=True)
class Phase:
    """One measured concurrency: peaks so far (cumulative) and throughput in this phase."""

    concurrency: int
    peak_rss_bytes: int
    peak_gpu_bytes: int | None
    tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class Profile:
    """A model measured on one kind of device."""

    device_kind: str
    load_s: float
    loaded_rss_bytes: int
    phases: tuple[Phase, ...]


def cumulative(phases: list[Phase]) -> tuple[Phase, ...]:
    """Phases in concurrency order with peaks that never decrease.

    Phases run one after another in the same process, so a later phase's peak includes the
    earlier ones; making it explicit keeps a sampling gap from reading as "less memory".
    """
    out: list[Phase] = []
    rss = 0
    gpu: int | None = None
    for phase in sorted(phases, key=lambda p: p.concurrency):
        rss = max(rss, phase.peak_rss_bytes)
        if phase.peak_gpu_bytes is not None:
            gpu = max(gpu or 0, phase.peak_gpu_bytes)
        out.append(Phase(phase.concurrency, rss, gpu, phase.tokens, phase.seconds))
    return tuple(out)


def with_margin(mem_bytes: int) -> int:
    return math.ceil(mem_bytes * (1 + SAFETY_MARGIN))


def required_ram_bytes(profile: Profile) -> int:
    """The catalog's requiredRAM: the peak at concurrency 1 plus the safety margin."""
    if not profile.phases:
        raise ValueError("a profile needs at least one phase")
    return with_margin(profile.phases[0].peak_rss_bytes)


def ram_for_concurrency(profile: Profile, concurrency: int) -> int:
    """Host memory an instance serving `concurrency` requests at once is expected to need.

    Linear between measured concurrencies; beyond the last one, extrapolated along the last
    measured slope (memory grows with the batch: 1.26x to 1.40x of the weights from 1 to 8).
    """
    points = [(p.concurrency, p.peak_rss_bytes) for p in profile.phases]
    if not points:
        raise ValueError("a profile needs at least one phase")
    return with_margin(_interpolate(points, concurrency))


def gpu_for_concurrency(profile: Profile, concurrency: int) -> int | None:
    """VRAM an instance on a GPU serving `concurrency` at once is expected to need, or None.

    The same rule as host memory, over the per-process GPU peaks of a `cuda` profile; None
    when the profile has no GPU reading (a `cpu` profile, or NVML hid the process).
    """
    points = [(p.concurrency, p.peak_gpu_bytes) for p in profile.phases]
    known = [(c, m) for c, m in points if m is not None]
    if not known:
        return None
    return with_margin(_interpolate(known, concurrency))


def _interpolate(points: list[tuple[int, int]], concurrency: int) -> int:
    if concurrency <= points[0][0]:
        return points[0][1]
    for (c0, m0), (c1, m1) in itertools.pairwise(points):
        if concurrency <= c1:
            return round(m0 + (m1 - m0) * (concurrency - c0) / (c1 - c0))
    if len(points) == 1:
        return points[0][1]
    (c0, m0), (c1, m1) = points[-2], points[-1]
    slope = max(0.0, (m1 - m0) / (c1 - c0))
    return round(m1 + slope * (concurrency - c1))


def minimum_bytes(weights_bytes: int | None) -> int:
    """A floor for what loading the weights needs: every weight is touched by a generation."""
    return weights_bytes or 0


def phases_json(profile: Profile) -> list[dict[str, Any]]:
    """The profile's phases as stored in model_profiles.phases."""
    return [
        {
            "concurrency": p.concurrency,
            "peakRssBytes": p.peak_rss_bytes,
            "peakGpuBytes": p.peak_gpu_bytes,
            "tokens": p.tokens,
            "seconds": round(p.seconds, 4),
            "tokensPerSecond": round(p.tokens_per_second, 3),
        }
        for p in profile.phases
    ]
