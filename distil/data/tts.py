"""Real speech with known text from Debian's TTS engines (espeak-ng, flite, festival)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf

from distil.data.audio import SAMPLING_RATE, resample
from distil.utils.errors import ConfigError

ENGINES = ("espeak-ng", "flite", "festival")  # each engine's program has the engine's name
DEBIAN_PACKAGES = "espeak-ng flite festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts"
ESPEAK_DEFAULT_WPM = 175


class TTSUnavailable(RuntimeError):
    pass


def require_engine(engine: str) -> str:
    if engine not in ENGINES:
        raise ConfigError(f"unknown TTS engine {engine!r}; choose one of {ENGINES}")
    exe = shutil.which(engine)
    if exe is None:
        raise TTSUnavailable(
            f"TTS engine {engine!r} is not installed: run `make setup` (or `apt-get install {DEBIAN_PACKAGES}`)"
        )
    return exe


def synthesize(
    text: str,
    engine: str,
    voice: str,
    sampling_rate: int = SAMPLING_RATE,
    rate: int | None = None,
    tempo: float = 1.0,
    pitch: int | None = None,
) -> np.ndarray:
    """Speak `text` with `engine`/`voice` and return a mono float32 waveform at `sampling_rate`.

    Voices: espeak-ng "en-us", "en-gb+m3", "en+f2"; flite "slt", "kal", "awb", "rms"; festival "kal_diphone",
    "ked_diphone", "cmu_us_slt_arctic_hts". `tempo` scales the speaking rate (1 = the engine's normal pace;
    for espeak-ng of `rate` words per minute, default 175); `pitch` (0-99) is espeak-ng's base pitch.
    """
    exe = require_engine(engine)
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "out.wav"
        if engine == "espeak-ng":
            cmd = [exe, "-v", voice, "-w", str(wav), "-s", str(round((rate or ESPEAK_DEFAULT_WPM) * tempo))]
            if pitch is not None:
                cmd += ["-p", str(int(pitch))]
            cmd.append(text)
        elif engine == "flite":
            cmd = [
                exe,
                "-voice",
                voice,
                "--setf",
                f"duration_stretch={1 / tempo:.4f}",
                "-t",
                text,
                "-o",
                str(wav),
            ]
        else:  # festival runs a Scheme script; the text is a Scheme string literal
            quoted = text.replace("\\", "\\\\").replace('"', '\\"')
            script = Path(tmp) / "speak.scm"
            script.write_text(
                f"(voice_{voice})\n(Parameter.set 'Duration_Stretch {1 / tempo:.4f})\n"
                f'(utt.save.wave (utt.synth (Utterance Text "{quoted}")) "{wav}" \'riff)\n',
                encoding="utf-8",
            )
            cmd = [exe, "-b", str(script)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0 or not wav.exists():
            raise RuntimeError(
                f"{engine} failed for voice {voice!r}: {(result.stderr or result.stdout).strip()}"
            )
        wave, sr = sf.read(wav, dtype="float32", always_2d=False)
    if wave.ndim == 2:
        wave = wave.mean(axis=1)
    return resample(wave, sr, sampling_rate)
