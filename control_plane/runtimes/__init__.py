"""Ways to run an instance agent, one module each, behind the `Runtime` protocol."""

from __future__ import annotations

from control_plane.runtimes.base import Runtime
from control_plane.runtimes.process import ProcessRuntime
from control_plane.settings import Settings


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
