"""Which torch build `make install` takes: the CPU pin, or the CUDA build matching the driver.

Runs with the standard library only (before the virtual environment has anything in it).
`MLCP_TORCH` chooses: `cpu` (the pin of the `agent` extra, ~200 MB), `cuda` (the same torch
version built for the newest CUDA the driver supports, several GB with its CUDA libraries), or
`auto` (the default: `cuda` where NVML answers, else `cpu`), or `system` (the torch and
transformers already installed beside the interpreter, as a CUDA machine image carries them:
the venv sees them and installs neither, offline). The decision is `choose`, a pure
function of the mode and the driver's CUDA version; `main` reads the driver through NVML's C
library and, for a CUDA build, installs it into the running interpreter's environment first, so
that the `agent` extra's pin (`torch==X`, which `X+cuNNN` satisfies) keeps it.

    python scripts/torch_choice.py show      # print the choice
    python scripts/torch_choice.py install   # install a CUDA build when that is the choice
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from dataclasses import dataclass

# The agent extra's torch pin (pyproject.toml; a unit test keeps them equal).
TORCH_VERSION = "2.13.0"
# CUDA variants PyTorch publishes wheels of for that version, as (tag, CUDA major*1000+minor*10).
# MLCP_TORCH_CUDA_TAGS overrides them ("cu126 cu128 cu130") when a newer torch changes the set.
DEFAULT_CUDA_TAGS = ("cu126", "cu128", "cu130")
INDEX_URL = "https://download.pytorch.org/whl/{tag}"
MODES = ("auto", "cpu", "cuda", "system")


class ChoiceError(Exception):
    """The asked-for build cannot be had here (a clear message, exit code 2)."""


@dataclass(frozen=True)
class Choice:
    build: str  # "cpu" or a CUDA tag such as "cu128"
    requirement: str
    index_url: str | None  # None: the default index (the CPU pin, as the agent extra has it)
    reason: str


def tag_version(tag: str) -> int:
    """'cu128' -> 12080, the form NVML gives the driver's CUDA version in."""
    digits = tag.removeprefix("cu")
    if not digits.isdigit() or len(digits) < 3:
        raise ValueError(f"not a CUDA wheel tag: {tag!r}")
    return int(digits[:-1]) * 1000 + int(digits[-1]) * 10


def driver_text(version: int) -> str:
    return f"{version // 1000}.{(version % 1000) // 10}"


def choose(
    mode: str,
    driver_cuda: int | None,
    tags: tuple[str, ...] = DEFAULT_CUDA_TAGS,
    version: str = TORCH_VERSION,
    system_torch: str | None = None,
) -> Choice:
    """The torch build for `mode` on a host whose driver supports CUDA `driver_cuda` (or none).

    A CUDA build runs on a driver supporting its CUDA version or newer, so the newest published
    tag not above the driver's version is taken. `auto` falls back to the CPU pin where there is
    no driver or the driver is older than every published build; `cuda` refuses instead.
    """
    if mode not in MODES:
        raise ChoiceError(f"MLCP_TORCH must be one of {', '.join(MODES)}, not {mode!r}")
    cpu = Choice("cpu", f"torch=={version}", None, "")
    if mode == "system":
        if system_torch is None:
            raise ChoiceError("MLCP_TORCH=system, but this Python has no torch installed")
        return Choice("system", f"torch=={system_torch}", None, f"torch {system_torch} found")
    if mode == "cpu":
        return Choice(cpu.build, cpu.requirement, None, "MLCP_TORCH=cpu")
    if driver_cuda is None:
        if mode == "cuda":
            raise ChoiceError("MLCP_TORCH=cuda, but NVML does not answer: no NVIDIA driver here")
        return Choice(cpu.build, cpu.requirement, None, "no NVIDIA driver (NVML does not answer)")
    usable = sorted((t for t in tags if tag_version(t) <= driver_cuda), key=tag_version)
    if not usable:
        why = (
            f"the driver supports CUDA {driver_text(driver_cuda)}, older than every torch "
            f"{version} build ({', '.join(tags)})"
        )
        if mode == "cuda":
            raise ChoiceError(f"MLCP_TORCH=cuda, but {why}")
        return Choice(cpu.build, cpu.requirement, None, why)
    tag = usable[-1]
    return Choice(
        tag,
        f"torch=={version}",
        INDEX_URL.format(tag=tag),
        f"the driver supports CUDA {driver_text(driver_cuda)}",
    )


def read_driver_cuda() -> int | None:
    """The CUDA version the NVIDIA driver supports (e.g. 12080), through libnvidia-ml; or None."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return None
    try:
        if nvml.nvmlInit_v2() != 0:
            return None
        version = ctypes.c_int(0)
        ok = nvml.nvmlSystemGetCudaDriverVersion_v2(ctypes.byref(version)) == 0
        nvml.nvmlShutdown()
        return version.value if ok and version.value > 0 else None
    except AttributeError:
        return None


def installed_torch() -> str | None:
    """The version of a torch this interpreter can import (without importing it), or None."""
    from importlib import metadata

    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None


def configured_tags() -> tuple[str, ...]:
    text = os.environ.get("MLCP_TORCH_CUDA_TAGS", "").split()
    return tuple(text) if text else DEFAULT_CUDA_TAGS


def main(argv: list[str]) -> int:
    action = argv[1] if len(argv) > 1 else "show"
    if action not in ("show", "install"):
        print("usage: torch_choice.py show|install", file=sys.stderr)
        return 2
    try:
        choice = choose(
            os.environ.get("MLCP_TORCH", "auto"),
            read_driver_cuda(),
            configured_tags(),
            system_torch=installed_torch(),
        )
    except (ChoiceError, ValueError) as exc:
        print(f"torch: {exc}", file=sys.stderr)
        return 2
    print(f"torch: {choice.build} build ({choice.reason})")
    if action == "install" and choice.index_url is not None:
        command = [sys.executable, "-m", "pip", "install", "-q", choice.requirement]
        command += ["--index-url", choice.index_url, "--extra-index-url", "https://pypi.org/simple"]
        return subprocess.call(command)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
