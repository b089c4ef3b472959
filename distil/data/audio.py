"""Audio I/O shared by every stage: decode with soundfile, down-mix, resample with soxr.

datasets' own decoding needs torchcodec, which does not load against the CPU torch wheel, so every
dataset is read with `Audio(decode=False)` and decoded here from bytes or a path.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import soxr

from distil.utils.errors import ConfigError, InputError

SAMPLING_RATE = 16_000  # Whisper's input rate; every decoder and feature extractor here uses it


class AudioDecodeError(InputError):
    """An audio sample that cannot be turned into a waveform (unreadable, empty, missing, NaN/inf samples)."""


def resample(wave: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    if orig_sr == target_sr:
        return wave.astype(np.float32, copy=False)
    return soxr.resample(wave, orig_sr, target_sr, quality="HQ").astype(np.float32, copy=False)


def to_mono(wave: np.ndarray) -> np.ndarray:
    return wave.mean(axis=1) if wave.ndim == 2 else wave


def _describe(audio: Any) -> str:
    if isinstance(audio, dict):
        return str(audio.get("path") or "<in-memory bytes>")
    if isinstance(audio, (str, Path)):
        return str(audio)
    return "<in-memory bytes>"


def decode_audio(audio: Any, target_sr: int = SAMPLING_RATE) -> np.ndarray:
    """Decode one sample to a mono float32 waveform at `target_sr`.

    `audio` is what a datasets `Audio(decode=False)` column holds (`{"bytes": ..., "path": ...}`),
    a path, raw encoded bytes, or an already decoded `{"array", "sampling_rate"}` dict.
    Raises AudioDecodeError naming the source when the audio cannot be used (also for NaN/inf samples).
    """
    source = _describe(audio)
    try:
        if isinstance(audio, dict) and audio.get("array") is not None:
            wave, sr = np.asarray(audio["array"], dtype=np.float32), int(audio["sampling_rate"])
        else:
            if isinstance(audio, dict):
                data = audio.get("bytes") or audio.get("path")
            else:
                data = audio
            if data is None or (isinstance(data, (bytes, bytearray)) and len(data) == 0):
                raise AudioDecodeError(f"audio sample {source} has neither bytes nor a path")
            handle = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else str(data)
            wave, sr = sf.read(handle, dtype="float32", always_2d=False)
    except AudioDecodeError:
        raise
    except Exception as err:  # soundfile raises several types for bad files
        # soundfile names in-memory input by its object repr (an address that changes every run).
        reason = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "<in-memory bytes>", str(err))
        raise AudioDecodeError(f"cannot decode audio {source}: {reason}") from err
    wave = to_mono(np.asarray(wave, dtype=np.float32))
    if wave.size == 0:
        raise AudioDecodeError(f"audio {source} is empty (0 samples)")
    # Float formats (WAV FLOAT, arrays) can hold NaN/inf; the teacher would label them with garbage tokens
    # and the student's loss would turn NaN, so such audio is as unusable as an undecodable file.
    non_finite = int(np.count_nonzero(~np.isfinite(wave)))
    if non_finite:
        raise AudioDecodeError(f"audio {source} has {non_finite} non-finite (NaN/inf) samples of {wave.size}")
    return resample(wave, sr, target_sr)


def encode_flac(wave: np.ndarray, sampling_rate: int) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, wave, sampling_rate, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


def add_noise(wave: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """Mix `noise` (tiled or cut to length) into `wave` at the given signal-to-noise ratio in dB."""
    if noise.size < wave.size:
        noise = np.tile(noise, int(np.ceil(wave.size / noise.size)))
    noise = noise[: wave.size]
    signal_power = float(np.mean(wave**2)) or 1e-12
    noise_power = float(np.mean(noise**2)) or 1e-12
    scale = np.sqrt(signal_power / (noise_power * 10 ** (snr_db / 10)))
    mixed = wave + scale * noise
    peak = float(np.max(np.abs(mixed)))
    return (mixed / peak * 0.99 if peak > 0.99 else mixed).astype(np.float32)


def audio_duration(audio: Any) -> float | None:
    """Seconds of audio from the file header or the array, without decoding; None when unknown.

    Unreadable headers mean "unknown" here: decoding reports why, with the sample named, when the audio is used.
    """
    try:
        if isinstance(audio, dict):
            if audio.get("array") is not None:
                return len(audio["array"]) / float(audio["sampling_rate"])
            audio = audio.get("bytes") or audio.get("path")
        if audio is None:
            return None
        info = sf.info(io.BytesIO(audio) if isinstance(audio, (bytes, bytearray)) else str(audio))
        return info.frames / info.samplerate if info.samplerate else None
    except Exception:
        return None


NOISE_TYPES = ("white", "pink", "brown")


def make_noise(kind: str, n_samples: int, seed: int) -> np.ndarray:
    """Deterministic unit-RMS noise of `kind` ("white", "pink" 1/f, "brown" 1/f^2), float32."""
    if kind not in NOISE_TYPES:
        raise ConfigError(f"unknown noise type {kind!r}; choose one of {NOISE_TYPES}")
    if n_samples <= 0:
        return np.zeros(0, dtype=np.float32)
    white = np.random.default_rng(seed).standard_normal(n_samples)
    if kind == "white":
        noise = white
    else:
        # Shape the spectrum: power ~ 1/f (pink) or 1/f^2 (brown), i.e. amplitude ~ f^-exponent.
        exponent = 0.5 if kind == "pink" else 1.0
        spectrum = np.fft.rfft(white)
        freqs = np.arange(spectrum.size, dtype=np.float64)
        freqs[0] = 1.0  # keep DC finite; it is removed just below
        spectrum /= freqs**exponent
        noise = np.fft.irfft(spectrum, n=n_samples)
        noise -= noise.mean()
    rms = float(np.sqrt(np.mean(noise**2))) or 1.0
    return (noise / rms).astype(np.float32)
