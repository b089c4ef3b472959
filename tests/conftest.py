"""Session fixtures shared by every test file: one model cache, the teachers, synthetic speech.

The whole session uses ONE `$DISTIL_HOME` (a temporary directory) so teachers are imported once per run.
Set `DISTIL_TEST_CACHE=/some/dir` to use that directory instead and keep the imports across runs.
Tests that write other artifacts should still point `DISTIL_HOME` at their own `tmp_path` (monkeypatch);
the model fixtures below do not depend on it, they use the session cache explicitly.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from distil.utils.paths import CONF_DIR

# Sentences written for these tests (not from any corpus): names, numbers, punctuation, a question.
TTS_SENTENCES = [
    "The lighthouse keeper painted the railings a bright shade of green.",
    "Our train leaves platform nine at a quarter past seven tomorrow morning.",
    "Could you pass me the salt and the pepper, please?",
    "Martha planted tomatoes, beans and sunflowers behind the old barn.",
    "The museum closes early on Sundays during the winter.",
    "A small dog chased the red ball across the wet grass.",
    "Twelve students finished the chemistry exam before noon.",
    "He forgot his umbrella at the bakery on Elm Street.",
    "The river was too cold for swimming, so we walked along the bank instead.",
    "Please remember to water the plants while I am away.",
    "The orchestra rehearsed the final movement three times.",
    "Fresh bread smells wonderful early in the morning.",
]
TTS_VOICES = [
    ("espeak-ng", "en-us"),
    ("flite", "slt"),
    ("espeak-ng", "en-gb"),
    ("flite", "kal"),
    ("espeak-ng", "en-us+f3"),
    ("flite", "awb"),
    ("flite", "rms"),
]


def pytest_configure(config):
    """One torch thread per test process unless DISTIL_TEST_THREADS says otherwise.

    On a small shared CPU, torch's OpenMP threads spin against other processes: measured here with 2 cores
    under load, `generate()` of the tiny random teacher took 16 s with 2 threads and 0.6 s with 1 (the
    per-step `torch.isin` of the suppress-tokens processor alone went from 10 ms to 190 ms).
    """
    import torch

    torch.set_num_threads(int(os.environ.get("DISTIL_TEST_THREADS", "1")))


def teacher_cfg(name: str):
    """A teacher config exactly as `teacher=<name>` composes it (the single source of truth)."""
    return OmegaConf.load(CONF_DIR / "teacher" / f"{name}.yaml")


@pytest.fixture(scope="session", autouse=True)
def distil_home(tmp_path_factory) -> Path:
    """The session's `$DISTIL_HOME`: a temporary directory, or `$DISTIL_TEST_CACHE` when set."""
    cache = os.environ.get("DISTIL_TEST_CACHE")
    home = Path(cache).expanduser() if cache else tmp_path_factory.mktemp("distil_home")
    home.mkdir(parents=True, exist_ok=True)
    previous = os.environ.get("DISTIL_HOME")
    os.environ["DISTIL_HOME"] = str(home)
    yield home
    if previous is None:
        os.environ.pop("DISTIL_HOME", None)
    else:
        os.environ["DISTIL_HOME"] = previous


@pytest.fixture(scope="session")
def model_cache(distil_home) -> Path:
    """Where the session's teachers live (`<DISTIL_HOME>/models`), independent of later env changes."""
    return distil_home / "models"


def _resolve(name: str, root: Path) -> Path:
    from distil.whisper.models import resolve_model

    return Path(resolve_model(teacher_cfg(name), root))


@pytest.fixture(scope="session")
def tiny_en_dir(model_cache) -> Path:
    """Whisper tiny.en imported from the bundled CTranslate2 weights (a Hugging Face directory)."""
    return _resolve("tiny_en", model_cache)


@pytest.fixture(scope="session")
def base_dir(model_cache) -> Path:
    """Whisper base (multilingual) imported from the bundled CTranslate2 weights."""
    return _resolve("base", model_cache)


@pytest.fixture(scope="session")
def tiny_random_dir(model_cache) -> Path:
    """The few-MB random-weight Whisper with tiny.en's tokenizer/processor; greedy output ends after ~10 tokens."""
    return _resolve("tiny_random", model_cache)


@pytest.fixture(scope="session")
def tiny_dir(tiny_random_dir) -> str:
    """The tiny random Whisper's directory as a string (the datamodule and distiller tests' teacher)."""
    return str(tiny_random_dir)


@pytest.fixture(scope="session")
def tokenizer(tiny_dir):
    """tiny.en's tokenizer (special and timestamp tokens included), as saved with the tiny random Whisper."""
    from transformers import WhisperTokenizerFast

    return WhisperTokenizerFast.from_pretrained(tiny_dir)


@pytest.fixture(scope="session")
def tts_clips() -> list[dict]:
    """12 synthetic English clips: {audio: float32 16 kHz mono, text, voice, engine}."""
    from distil.data.tts import synthesize

    clips = []
    for i, text in enumerate(TTS_SENTENCES):
        engine, voice = TTS_VOICES[i % len(TTS_VOICES)]
        audio = synthesize(text, engine, voice, sampling_rate=16_000)
        clips.append(
            {"audio": np.asarray(audio, dtype=np.float32), "text": text, "voice": voice, "engine": engine}
        )
    return clips
