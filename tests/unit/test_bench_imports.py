"""The benchmarker runs inside the control plane, so it must stay as light: the model is loaded
by the measuring child, never by the worker."""

from __future__ import annotations

from tests.unit.test_imports import heavy_in, modules_after


def test_every_benchmarker_module_stays_light() -> None:
    loaded = modules_after(
        """
        import importlib, pkgutil
        import benchmarker
        for info in pkgutil.walk_packages(benchmarker.__path__, "benchmarker."):
            importlib.import_module(info.name)
        import control_plane.jobs
        """
    )
    assert "benchmarker.worker" in loaded
    assert heavy_in(loaded) == []
