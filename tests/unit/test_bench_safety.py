"""Pre-checks on model folders: decided from file names and JSON, nothing from them is run."""

from __future__ import annotations

import asyncio
import json
import pickle
from pathlib import Path

import pytest

from benchmarker import ModelNotFound, NeedsRemoteCode, UnsafeWeights
from benchmarker.hub import fetch, hub_offline, hub_unavailable
from benchmarker.safety import check_model_folder


class _Payload:
    """Unpickling this writes a marker file: proof that something unpickled the weights."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, ...]:
        return (Path.write_text, (self.marker, "pickle ran"))


def folder(tmp_path: Path, config: dict[str, object], files: dict[str, bytes]) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(config))
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return tmp_path


def test_safetensors_folder_passes(tmp_path: Path) -> None:
    check_model_folder(
        folder(tmp_path, {"model_type": "gpt2"}, {"model.safetensors": b"x", "x.bin": b"y"}), "o/m"
    )


def test_pickle_only_folder_is_refused_without_unpickling(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    weights = pickle.dumps(_Payload(marker))
    model = folder(tmp_path / "m", {"model_type": "gpt2"}, {"pytorch_model.bin": weights})
    with pytest.raises(UnsafeWeights) as caught:
        check_model_folder(model, "o/m")
    assert caught.value.message == "Unsafe weights format (pickle); only safetensors are loaded."
    assert not marker.exists()


@pytest.mark.parametrize("config_file", ["config.json", "tokenizer_config.json"])
def test_auto_map_is_refused_as_remote_code(tmp_path: Path, config_file: str) -> None:
    model = folder(tmp_path, {"model_type": "gpt2"}, {"model.safetensors": b"x"})
    (model / config_file).write_text(json.dumps({"auto_map": {"AutoConfig": "evil.Config"}}))
    with pytest.raises(NeedsRemoteCode, match="needs remote code"):
        check_model_folder(model, "o/m")


def test_folder_without_weights_or_config(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="no weights"):
        check_model_folder(folder(tmp_path / "a", {"model_type": "gpt2"}, {}), "o/m")
    (tmp_path / "b").mkdir()
    with pytest.raises(ModelNotFound, match=r"config\.json"):
        check_model_folder(tmp_path / "b", "o/m")


async def test_hub_offline_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_offline()
    with pytest.raises(ModelNotFound, match="offline"):
        await fetch(tmp_path / "store", "nobody/nothing")
    assert not await asyncio.to_thread((tmp_path / "store").exists)


async def test_an_unresolvable_hub_counts_as_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    # .invalid never resolves (RFC 2606), with or without a network.
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.mlcp-test.invalid")
    assert await hub_unavailable() == "unreachable"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert await hub_unavailable() == "offline (HF_HUB_OFFLINE)"
