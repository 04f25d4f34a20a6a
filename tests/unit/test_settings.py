"""Settings read from MLCP_* environment variables, as the README's Configuration lists them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from control_plane.settings import Settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("MLCP_") or name in ("HF_HOME", "HF_HUB_CACHE"):
            monkeypatch.delenv(name)


def test_defaults_match_the_design() -> None:
    s = Settings()
    assert (s.host, s.port) == ("127.0.0.1", 8080)
    assert s.database_url is None
    assert s.data_dir == Path(".mlcp")
    assert s.admin_key is None
    assert s.runtime == "process"
    assert s.model_dirs == ""
    assert s.model_dir_paths == []
    assert s.default_expiration_s == 1800
    assert s.model_store == Path(".mlcp") / "models"


def test_environment_is_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MLCP_HOST", "0.0.0.0")
    monkeypatch.setenv("MLCP_PORT", "9090")
    monkeypatch.setenv("MLCP_DATABASE_URL", "postgresql://u:pw@db:5432/mlcp")
    monkeypatch.setenv("MLCP_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("MLCP_ADMIN_KEY", "mlcp_admin")
    monkeypatch.setenv("MLCP_RUNTIME", "docker")
    monkeypatch.setenv("MLCP_DEFAULT_EXPIRATION_S", "60")
    s = Settings()
    assert (s.host, s.port, s.runtime, s.default_expiration_s) == ("0.0.0.0", 9090, "docker", 60)
    assert s.database_url is not None
    assert s.database_url.get_secret_value() == "postgresql://u:pw@db:5432/mlcp"
    assert s.admin_key is not None and s.admin_key.get_secret_value() == "mlcp_admin"
    assert s.data_dir == tmp_path
    assert s.model_store == tmp_path / "models"


def test_secrets_stay_out_of_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLCP_DATABASE_URL", "postgresql://u:hunter2@db/mlcp")
    monkeypatch.setenv("MLCP_ADMIN_KEY", "mlcp_topsecret")
    text = repr(Settings()) + str(Settings())
    assert "hunter2" not in text
    assert "topsecret" not in text


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("", []),
        ("/a", ["/a"]),
        ("/a:/b", ["/a", "/b"]),
        ("/a,/b", ["/a", "/b"]),
        ("/a:/b,/c", ["/a", "/b", "/c"]),
        ("/a, /b", ["/a", "/b"]),
        (" /a : /b ", ["/a", "/b"]),
        ("/a::/b,,", ["/a", "/b"]),
        (" : , ", []),
        ("relative/dir", ["relative/dir"]),
    ],
)
def test_model_dirs_split_on_colon_and_comma(
    monkeypatch: pytest.MonkeyPatch, raw: str, expected: list[str]
) -> None:
    monkeypatch.setenv("MLCP_MODEL_DIRS", raw)
    assert Settings().model_dir_paths == [Path(p) for p in expected]


def test_model_dirs_expand_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("MLCP_MODEL_DIRS", "~/models")
    assert Settings().model_dir_paths == [tmp_path / "models"]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MLCP_PORT", "not-a-port"),
        ("MLCP_PORT", "70000"),
        ("MLCP_PORT", "-1"),
        ("MLCP_RUNTIME", "kubernetes"),
        ("MLCP_DEFAULT_EXPIRATION_S", "0"),
        ("MLCP_DEFAULT_EXPIRATION_S", "abc"),
    ],
)
def test_invalid_values_are_refused(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        Settings()


def test_settings_are_frozen() -> None:
    s = Settings()
    with pytest.raises(ValidationError):
        s.port = 1  # type: ignore[misc]


def test_unknown_mlcp_variables_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLCP_SOMETHING_ELSE", "x")
    assert Settings().port == 8080


def test_hf_cache_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert Settings().resolved_hf_cache == tmp_path / ".cache" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert Settings().resolved_hf_cache == tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "direct"))
    assert Settings().resolved_hf_cache == tmp_path / "direct"
    assert Settings(hf_cache_dir=tmp_path / "given").resolved_hf_cache == tmp_path / "given"
