"""Client stubs generated from a project's .proto in the test, as a user makes them.

`python -m grpc_tools.protoc --python_out --grpc_python_out` into a folder, then imported. The
generated modules register their messages process-wide, so each test proto has its own file
name (handler.proto, echo.proto, ...) and is generated once per process.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path
from types import ModuleType


def generate(project: Path, proto: str, out: Path) -> tuple[ModuleType, ModuleType]:
    """Generate and import `<proto>_pb2` and `<proto>_pb2_grpc` from `project/proto`."""
    stem = Path(proto).stem
    if f"{stem}_pb2_grpc" in sys.modules:
        return sys.modules[f"{stem}_pb2"], sys.modules[f"{stem}_pb2_grpc"]
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{project}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            proto,
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    sys.path.insert(0, str(out))
    return importlib.import_module(f"{stem}_pb2"), importlib.import_module(f"{stem}_pb2_grpc")
