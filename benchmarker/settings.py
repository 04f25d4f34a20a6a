"""The settings the benchmarker needs (MLCP_ prefix): where the database and the models are.

The control plane's `Settings` extends these, so one environment configures both and a
standalone benchmark worker (`python -m benchmarker worker`) reads exactly what the control
plane beside it reads.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class BenchmarkerSettings(BaseSettings):
    """Database, data folder and model sources; tests build one directly instead of patching env."""

    model_config = SettingsConfigDict(env_prefix="MLCP_", extra="ignore", frozen=True)

    database_url: SecretStr | None = None
    data_dir: Path = Path(".mlcp")
    # Where converted and fetched models are kept (MLCP_MODEL_STORE); unset, MLCP_DATA_DIR/models.
    # With the ray runtime every node reads it at the same path: put it on shared storage.
    model_store_dir: Path | None = Field(
        default=None, validation_alias=AliasChoices("MLCP_MODEL_STORE", "model_store_dir")
    )
    # Colon- or comma-separated folders (a plain string so a shell user can write it naturally).
    model_dirs: str = ""
    hf_cache_dir: Path | None = None
    include_packaged_models: bool = True
    # The command that runs an instance agent (JSON list); tests point it at a fake agent. With
    # the docker runtime it runs inside the container.
    agent_command: list[str] | None = None
    # Where instances run (the control plane starts them; a model is measured in a process of
    # the same kind).
    runtime: Literal["process", "docker", "ray"] = "process"
    # The process runtime forks the real agent from a zygote that has torch and transformers
    # imported (cold start ÷ a fresh process's import and load, benchmarks/bench_cold_start.py),
    # and the benchmarker forks its measuring agent from one too; false: every instance (and
    # measuring agent) is a fresh interpreter.
    zygote: bool = True

    @property
    def measures_forked(self) -> bool:
        """Whether instances, so measuring agents, are forked from a zygote."""
        return self.runtime == "process" and self.zygote and self.agent_command is None

    @property
    def model_dir_paths(self) -> list[Path]:
        parts = self.model_dirs.replace(",", ":").split(":")
        return [Path(p.strip()).expanduser() for p in parts if p.strip()]

    @property
    def resolved_hf_cache(self) -> Path:
        if self.hf_cache_dir is not None:
            return self.hf_cache_dir
        if os.environ.get("HF_HUB_CACHE"):
            return Path(os.environ["HF_HUB_CACHE"])
        hf_home = os.environ.get("HF_HOME")
        base = Path(hf_home) if hf_home else Path.home() / ".cache" / "huggingface"
        return base / "hub"

    @property
    def model_store(self) -> Path:
        return self.model_store_dir or self.data_dir / "models"
