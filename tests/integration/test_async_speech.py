"""Speech recognition through the async API: a tiny random Whisper built here, served by a real
instance agent the control plane starts on demand, fed from real uploads (WAV and MP3 made in
the test), and the submissions that must be refused.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import soundfile

from control_plane.async_requests import clean_up
from tests.harness import Api, app_state, make_settings, mark_measured, serve
from tests.tiny_model import build_tiny_whisper, copy_model

MODEL = "openai/whisper-tiny"
# The options the Tiyaro seed sends, as it sends them.
SEED_OPTIONS: dict[str, Any] = {
    "no_speech_threshold": 0.6,
    "patience": 1,
    "suppress_tokens": "-1",
    "compression_ratio_threshold": 2.4,
    "language": "en",
    "temperature_increment_on_fallback": 0.2,
    "length_penalty": None,
    "logprob_threshold": -1,
    "condition_on_previous_text": True,
    "initial_prompt": None,
    "task": "transcribe",
    "temperature": 0,
    "beam_size": 5,
    "best_of": 5,
}
FINISHED = ("success", "failed", "cancelled")


def tone(seconds: float, rate: int, fmt: str) -> bytes:
    """A 440 Hz tone encoded as `fmt` (WAV, FLAC, MP3) by libsndfile."""
    t = np.arange(int(seconds * rate)) / rate
    samples = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    out = io.BytesIO()
    soundfile.write(out, samples, rate, format=fmt)
    return out.getvalue()


@pytest.fixture(scope="session")
def whisper_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_whisper(tmp_path_factory.mktemp("whisper") / "whisper-tiny")


@pytest.fixture
async def sapi(db_dsn: str, tmp_path: Path, whisper_dir: Path) -> AsyncIterator[Api]:
    models = tmp_path / "models"
    copy_model(whisper_dir, models / MODEL)
    settings = make_settings(
        db_dsn,
        tmp_path / "data",
        model_dirs=str(models),
        include_packaged_models=False,
        async_workers=2,
    )
    async with serve(settings) as base, aiohttp.ClientSession() as session:
        api = Api(base, session, settings)
        await mark_measured(api, MODEL, 200_000_000)
        yield api


async def upload(api: Api, data: bytes, extension: str = "wav", key: str | None = None) -> str:
    kwargs: dict[str, Any] = {} if key is None else {"key": key}
    status, body = await api.call(
        "POST", f"/v1/input/upload-url?extension={extension}", {}, **kwargs
    )
    assert status == 201, body
    url = str(body["uploadUrl"]["PUT"])
    async with api.session.put(url, data=data) as resp:
        assert resp.status == 200, await resp.text()
    return url


async def submit(api: Api, url: str | None, options: Any = None, key: str | None = None) -> Any:
    kwargs: dict[str, Any] = {} if key is None else {"key": key}
    body: dict[str, Any] = {"input": SEED_OPTIONS if options is None else options}
    if url is not None:
        body["URL"] = url
    return await api.call("POST", f"/v1/async/{MODEL}", body, **kwargs)


async def poll(api: Api, rid: str, timeout_s: float = 90) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        status, body = await api.call("GET", f"/v1/async/requests/{rid}")
        assert status == 200, body
        if body["status"] in FINISHED:
            return body  # type: ignore[no-any-return]
        assert asyncio.get_running_loop().time() < deadline, body
        await asyncio.sleep(0.1)


async def test_a_wav_and_an_mp3_are_transcribed(sapi: Api) -> None:
    # 40 s at 8 kHz: resampled to 16 kHz and cut into two windows.
    wav = await upload(sapi, tone(40, 8000, "WAV"))
    status, body = await submit(sapi, wav)
    assert status == 202, body
    done = await poll(sapi, body["response"]["id"])
    assert done["status"] == "success", done
    result = done["result"]
    assert isinstance(result["text"], str)
    assert [c["timestamp"] for c in result["chunks"]] == [[0.0, 30.0], [30.0, 40.0]]
    assert result["audio_seconds"] == 40.0
    # The seed's options transformers has no use for are named, not silently dropped.
    assert "patience" in result["ignored"] and "language" not in result["ignored"]

    mp3 = await upload(sapi, tone(2, 16000, "MP3"), "mp3")
    status, body = await submit(sapi, mp3, {"language": "de", "task": "translate"})
    assert status == 202, body
    done = await poll(sapi, body["response"]["id"])
    assert done["status"] == "success", done
    assert len(done["result"]["chunks"]) == 1 and done["result"]["ignored"] == []
    flac = await upload(sapi, tone(1, 22050, "FLAC"), "flac")
    status, body = await submit(sapi, flac, {"initial_prompt": "the quick brown fox"})
    assert status == 202, body
    assert (await poll(sapi, body["response"]["id"]))["status"] == "success"

    # Each upload is deleted with its request once the retention period is over.
    files = list((sapi.settings.data_dir / "uploads").iterdir())
    assert len(files) == 3
    later = datetime.now(UTC) + timedelta(seconds=sapi.settings.async_retention_s + 1)
    assert await clean_up(app_state(sapi), later) == 3
    assert await app_state(sapi).pool.fetchval("SELECT count(*) FROM uploads") == 0
    assert not any(f.exists() for f in files)


async def test_audio_that_is_not_audio_fails_with_the_reason(sapi: Api) -> None:
    # The container's magic is right, the rest is not audio.
    fake = b"RIFF\x24\x00\x00\x00WAVEfmt " + b"\x00" * 64
    url = await upload(sapi, fake)
    status, body = await submit(sapi, url)
    assert status == 202, body
    done = await poll(sapi, body["response"]["id"])
    assert done["status"] == "failed" and "audio" in done["error"], done
    # A language the model does not know fails at the instance, saying so.
    url = await upload(sapi, tone(1, 16000, "WAV"))
    status, body = await submit(sapi, url, {"language": "ja"})
    assert status == 202, body
    done = await poll(sapi, body["response"]["id"])
    assert done["status"] == "failed" and "ja" in done["error"], done


async def test_submissions_that_are_refused(sapi: Api) -> None:
    state = app_state(sapi)
    good = await upload(sapi, tone(1, 16000, "WAV"))
    status, body = await sapi.call("POST", "/admin/keys", {"name": "other"})
    assert status in (200, 201), body
    other = body["key"]
    theirs = await upload(sapi, tone(1, 16000, "WAV"), key=other)
    status, slot = await sapi.call("POST", "/v1/input/upload-url?extension=wav", {})
    unfinished = slot["uploadUrl"]["PUT"]
    sig = good.split("signature=")[1]
    tampered = good.replace(sig, ("0" if sig[0] != "0" else "1") + sig[1:])
    cases: list[tuple[Any, Any, int, str]] = [
        (None, None, 422, "invalid_field"),  # no upload
        (12, None, 422, "invalid_field"),
        ("http://127.0.0.1/elsewhere.wav", None, 422, "invalid_field"),
        (tampered, None, 403, "invalid_signature"),
        (good.split("?")[0], None, 403, "invalid_signature"),
        (theirs, None, 404, "upload_not_found"),
        (unfinished, None, 409, "upload_incomplete"),
        (good, {"prompt": "hi"}, 422, "invalid_params"),  # text input for a speech model
        (good, {"beam_size": 0}, 422, "invalid_params"),
        (good, {"beam_size": "five"}, 422, "invalid_params"),
        (good, {"temperature": -1}, 422, "invalid_params"),
        (good, {"task": "summarise"}, 422, "invalid_params"),
        (good, {"language": 7}, 422, "invalid_params"),
        (good, {"suppress_tokens": "a,b"}, 422, "invalid_params"),
        (good, {"condition_on_previous_text": "yes"}, 422, "invalid_params"),
        (good, {"initial_prompt": "x" * 5000}, 422, "invalid_params"),
        (good, [], 422, "invalid_field"),
    ]
    for url, options, want_status, want_code in cases:
        status, body = await submit(sapi, url, options)
        assert (status, body.get("code")) == (want_status, want_code), (url, options, body)
    # The other key may use its own upload; this key's is not visible to it.
    status, body = await submit(sapi, good, key=other)
    assert status == 404 and body["code"] == "upload_not_found"
    assert await state.pool.fetchval("SELECT count(*) FROM async_requests") == 0
