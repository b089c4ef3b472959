"""Real speech with known text from Debian's TTS engines (espeak-ng, flite)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf

from distil.data.audio import SAMPLING_RATE, resample

ENGINES = ("espeak-ng", "flite")


class TTSUnavailable(RuntimeError):
    pass


def require_engine(engine: str) -> str:
    if engine not in ENGINES:
        raise ValueError(f"unknown TTS engine {engine!r}; choose one of {ENGINES}")
    exe = shutil.which(engine)
    if exe is None:
        raise TTSUnavailable(
            f"TTS engine {engine!r} is not installed: run `make setup` (or `apt-get install {engine}`)"
        )
    return exe


def synthesize(
    text: str, engine: str, voice: str, sampling_rate: int = SAMPLING_RATE, rate: int | None = None
) -> np.ndarray:
    """Speak `text` with `engine`/`voice` and return a mono float32 waveform at `sampling_rate`.

    espeak-ng voices look like "en-us", "en-gb+m3", "en+f2"; flite voices like "slt", "kal", "awb", "rms".
    `rate` is words per minute for espeak-ng (ignored by flite).
    """
    exe = require_engine(engine)
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "out.wav"
        if engine == "espeak-ng":
            cmd = [exe, "-v", voice, "-w", str(wav)]
            if rate:
                cmd += ["-s", str(rate)]
            cmd.append(text)
        else:
            cmd = [exe, "-voice", voice, "-t", text, "-o", str(wav)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0 or not wav.exists():
            raise RuntimeError(f"{engine} failed for voice {voice!r}: {result.stderr.strip()}")
        wave, sr = sf.read(wav, dtype="float32", always_2d=False)
    if wave.ndim == 2:
        wave = wave.mean(axis=1)
    return resample(wave, sr, sampling_rate)
