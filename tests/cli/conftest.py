"""A control plane with fake agents on loopback, and the `mlcp` CLI run against it (subprocess)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.fake_agent import write_fake_model
from tests.harness import ADMIN_KEY, Api, make_settings, mark_measured, serve

FAKE_AGENT = [sys.executable, str(Path(__file__).resolve().parents[1] / "fake_agent.py")]
REPO = Path(__file__).resolve().parents[2]
CLI_TIMEOUT_S = 60.0

MEASURED = {
    "fake/ok": {"mode": "ok", "delay_s": 0.01},
    "fake/slow": {"mode": "slow", "delay_s": 0.2, "tokens": 40},
}
UNMEASURED = {"fake/fresh": {"mode": "ok", "delay_s": 0.01}}


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def cli_env(home: Path, url: str | None, key: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLCP_")}
    env.update(PYTHONPATH=str(REPO), XDG_CONFIG_HOME=str(home), COLUMNS="200", NO_COLOR="1")
    if url is not None:
        env["MLCP_URL"] = url
    if key is not None:
        env["MLCP_KEY"] = key
    return env


@dataclass
class Cli:
    """Runs `python -m control_plane ARGS` with MLCP_URL/MLCP_KEY pointing at the served app."""

    url: str
    key: str | None
    home: Path

    def env(self, **override: str | None) -> dict[str, str]:
        url = override.get("url", self.url)
        key = override.get("key", self.key)
        return cli_env(self.home, url, key)

    async def __call__(
        self,
        *args: str,
        cwd: Path | None = None,
        extra_env: dict[str, str] | None = None,
        **override: str | None,
    ) -> Result:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "control_plane",
            *args,
            cwd=cwd,
            env={**self.env(**override), **(extra_env or {})},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), CLI_TIMEOUT_S)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        assert proc.returncode is not None
        return Result(proc.returncode, out.decode(), err.decode())


@pytest.fixture
async def capi(db_dsn: str, tmp_path: Path) -> AsyncIterator[Api]:
    models = tmp_path / "models"
    for name, behaviour in {**MEASURED, **UNMEASURED}.items():
        write_fake_model(models, name, **behaviour)
    settings = make_settings(
        db_dsn,
        tmp_path / "data",
        model_dirs=str(models),
        agent_command=FAKE_AGENT,
        start_timeout_s=4.0,
        include_packaged_models=False,
    )
    async with serve(settings) as base, aiohttp.ClientSession() as session:
        api = Api(base, session, settings)
        for name in MEASURED:
            await mark_measured(api, name, 50_000_000)
        yield api


@pytest.fixture
def cli(capi: Api, tmp_path: Path) -> Cli:
    home = tmp_path / "home"
    home.mkdir()
    return Cli(capi.base, ADMIN_KEY, home)
