"""Ways to run an instance agent, one module each, behind the `Runtime` protocol."""

from __future__ import annotations

from pathlib import Path

from benchmarker.catalog import packaged_models
from control_plane.runtimes.base import Runtime
from control_plane.runtimes.process import ProcessRuntime
from control_plane.settings import Settings


def catalog_roots(settings: Settings) -> list[Path]:
    """The folders catalog models are found in (a docker spare mounts them all)."""
    roots = [*settings.model_dir_paths, settings.model_store, settings.resolved_hf_cache]
    if settings.include_packaged_models:
        roots += [Path(found.source_path) for found in packaged_models()]
    return roots


def build_runtime(settings: Settings, cluster: str) -> Runtime:
    """The runtime MLCP_RUNTIME names, labelling instances with this deployment's `cluster` id."""
    if settings.runtime == "process":
        return ProcessRuntime(
            settings.data_dir / "logs",
            cluster=cluster,
            command=settings.agent_command,
            lease_grace_s=settings.instance_lease_grace_s,
            zygote=settings.zygote,
        )
    if settings.runtime == "docker":
        # Imported here: only deployments that run containers need the docker SDK loaded.
        from control_plane.runtimes.docker import DockerRuntime

        return DockerRuntime(
            cluster=cluster,
            image=settings.docker_image,
            network=settings.docker_network,
            command=settings.agent_command,
            lease_grace_s=settings.instance_lease_grace_s,
            spares=settings.docker_spares,
            spare_roots=catalog_roots(settings),
        )
    if settings.runtime == "ray":
        # Imported here: only deployments on a Ray cluster load Ray.
        from control_plane.runtimes.ray import RayRuntime

        return RayRuntime(
            cluster=cluster,
            address=settings.ray_address,
            command=settings.agent_command,
            lease_grace_s=settings.instance_lease_grace_s,
            stale_after_s=max(10.0, 5 * settings.ray_nodes_refresh_s),
        )
    raise ValueError(f"runtime {settings.runtime!r} is not available")
