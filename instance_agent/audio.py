"""Decoding an uploaded audio file into 16 kHz mono samples, without ffmpeg.

soundfile (libsndfile, shipped inside its wheel) reads WAV, FLAC, MP3 and OGG from memory.
Channels are averaged, and the signal is resampled to Whisper's 16 kHz by linear interpolation:
the feature extractor's log-mel filterbank stops at 8 kHz, so the aliasing a polyphase filter
would avoid lies mostly outside what the model sees.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import soundfile

from instance_agent.protocol import ProtocolError

SAMPLE_RATE = 16_000
# Four hours of audio: longer files are refused before any work is done.
MAX_SECONDS = 4 * 3600


class InvalidAudio(ProtocolError):
    """The upload is not audio this instance can decode."""

    code = "invalid_audio"


def decode(data: bytes) -> np.ndarray[Any, np.dtype[np.float32]]:
    """The file's samples as float32 mono at 16 kHz; `InvalidAudio` when it is not audio."""
    try:
        info = soundfile.info(io.BytesIO(data))
        if info.frames <= 0 or info.samplerate <= 0:
            raise InvalidAudio("the upload holds no audio samples")
        if info.frames / info.samplerate > MAX_SECONDS:
            raise InvalidAudio(f"the audio is longer than {MAX_SECONDS // 3600} hours")
        samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise InvalidAudio(f"the upload is not decodable audio ({type(exc).__name__})") from exc
    mono = samples.mean(axis=1, dtype=np.float32)
    if mono.size == 0:
        raise InvalidAudio("the upload holds no audio samples")
    return resample(mono, int(rate))


def resample(
    samples: np.ndarray[Any, np.dtype[np.float32]], rate: int
) -> np.ndarray[Any, np.dtype[np.float32]]:
    """`samples` at `rate` Hz, linearly interpolated to 16 kHz."""
    if rate == SAMPLE_RATE:
        return samples
    count = max(1, round(samples.size * SAMPLE_RATE / rate))
    positions = np.arange(count, dtype=np.float64) * (rate / SAMPLE_RATE)
    out: np.ndarray[Any, np.dtype[np.float32]] = np.interp(
        positions, np.arange(samples.size), samples
    ).astype(np.float32)
    return out
