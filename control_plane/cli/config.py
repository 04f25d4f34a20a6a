"""Where the CLI sends requests and with which key: flags, then MLCP_URL/MLCP_KEY, then
`~/.config/mlcp/config.toml` (`url = "..."`, `key = "..."`), then the default URL."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from control_plane.cli.client import Client, CliError

DEFAULT_URL = "http://127.0.0.1:8080"


def config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "mlcp" / "config.toml"


def _file_values(path: Path) -> dict[str, str]:
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}") from None
    try:
        values = tomllib.loads(raw)
    except tomllib.TOMLDecodeError as exc:
        raise CliError(f"{path} is not valid TOML: {exc}") from None
    out: dict[str, str] = {}
    for name in ("url", "key"):
        value = values.get(name)
        if value is not None and not isinstance(value, str):
            raise CliError(f"{path}: '{name}' must be a string")
        if value:
            out[name] = value
    return out


@dataclass
class Target:
    """The resolved URL and key; `client()` builds the HTTP client on first use."""

    url: str | None
    key: str | None

    def client(self) -> Client:
        values = _file_values(config_path()) if self.url is None or self.key is None else {}
        url = self.url or values.get("url") or DEFAULT_URL
        return Client(url, self.key or values.get("key"))
