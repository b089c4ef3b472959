"""Helpers shared by the test modules (fixtures live in conftest.py): small synthetic datasets on disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distil.data.audio import SAMPLING_RATE as SR
from distil.data.audio import encode_flac

PROJECT_ROOT = Path(__file__).resolve().parents[1]  # the checkout: notebooks/, benchmarks/, conf/


WORDS = "the quick brown fox jumps over a lazy dog while seven small birds sing in green trees".split()


def wave(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    return (0.1 * np.sin(2 * np.pi * (200 + 50 * seed % 7) * t) + 0.01 * rng.standard_normal(len(t))).astype(
        np.float32
    )


def write_split(
    root: Path,
    name: str,
    split: str,
    n: int,
    tokenizer=None,
    *,
    pl_wer=None,
    durations=None,
    labelled: bool = True,
    id_offset: int = 0,
    teacher_meta: dict | None = None,
    extra_columns: dict | None = None,
) -> Path:
    """A split in the corpus / pseudo-label layout: `<root>/<name>/<split>/part-00000.parquet` (+ `_SUCCESS`)."""
    rows = {"audio": [], "text": [], "id": [], "speaker": [], "duration": []}
    if labelled:
        rows.update({"token_ids": [], "pl_wer": [], "pseudo_label": []})
    for i in range(n):
        dur = float(durations[i]) if durations is not None else 0.5 + 0.1 * (i % 4)
        text = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(3 + i % 4))
        rows["audio"].append({"bytes": encode_flac(wave(dur, i + id_offset), SR), "path": None})
        rows["text"].append(text)
        rows["id"].append(f"{name}-{i + id_offset}")
        rows["speaker"].append(f"spk{i % 2}")
        rows["duration"].append(dur)
        if labelled:
            rows["token_ids"].append(list(tokenizer(" " + text).input_ids))
            rows["pl_wer"].append(None if pl_wer is None else pl_wer[i])
            rows["pseudo_label"].append(text)
    for k, v in (extra_columns or {}).items():
        rows[k] = v
    out = root / name / split
    out.mkdir(parents=True, exist_ok=True)
    table = pa.table(rows)
    meta = {
        b"huggingface": json.dumps(
            {"info": {"features": {"audio": {"_type": "Audio", "decode": False}}}}
        ).encode()
    }
    pq.write_table(table.replace_schema_metadata(meta), out / "part-00000.parquet")
    if labelled:
        (out / "distil_labels.json").write_text(json.dumps({"teacher": teacher_meta or {}}))
        (out / "_SUCCESS").write_text("")
    return out


def entry(name: str, root: Path, weight: float = 1.0, splits=("train",)) -> dict:
    return {
        "name": name,
        "path": str(root / name),
        "splits": list(splits),
        "audio_column": "audio",
        "text_column": "text",
        "id_column": "id",
        "speaker_column": "speaker",
        "duration_column": "duration",
        "language": "en",
        "weight": weight,
    }


def dead_pid() -> int:
    """The pid of a process that has exited (what a killed run leaves in its lock and claim files)."""
    import subprocess

    gone = subprocess.Popen(["true"])
    gone.wait()
    return gone.pid


# distil-corpus overrides for the smallest pipeline run: a few clips per corpus, one short long-form recording.
TINY_CORPUS = [
    "corpora.espeak.sizes={train: 6, validation: 2, test: 3}",
    "corpora.flite.sizes={train: 6, validation: 2, test: 3}",
    "corpora.flite.voices.train=[kal]",
    "corpora.festival.sizes={train: 2, validation: 1, test: 2}",
    "corpora.longform.sizes={test: 1}",
    "corpora.longform.min_duration_s=12",
    "corpora.longform.max_duration_s=20",
]


class SimulatedKill(BaseException):
    """Not an Exception: nothing in a stage may catch it, as nothing catches a SIGKILL."""


def write_kind(path) -> str:
    """A written file's name with its numbers as N: shard 3 or step 8 is written like shard 0 or step 4."""
    import re

    return re.sub(r"\d+", "N", Path(path).name)


@contextmanager
def atomic_writes(kill_before=None) -> Iterator[list[Path]]:
    """Record the destination of every atomic write (each ends in utils.io's os.replace); with `kill_before`
    (a predicate on the destination) stop with SimulatedKill just before the first write it selects, its
    temp file left behind as a kill leaves it."""
    import distil.utils.io as io

    real_replace, calls = io.os.replace, []

    def replace(src, dst):
        if kill_before is not None and kill_before(Path(dst)):
            raise SimulatedKill(f"killed before writing {dst}")
        calls.append(Path(dst))
        return real_replace(src, dst)

    io.os.replace = replace
    try:
        yield calls
    finally:
        io.os.replace = real_replace


def command(name: str) -> list[str]:
    """`distil-<name>` as installed next to this Python (else `python -m distil.<module>`)."""
    script = Path(sys.executable).parent / f"distil-{name}"
    return [str(script)] if script.exists() else [sys.executable, "-m", f"distil.{name.replace('-', '_')}"]


def cli(name: str, *args: str, home: Path, timeout: float = 180, check: bool = True):
    env = {**os.environ, "DISTIL_HOME": str(home), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [*command(name), *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=home
    )
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def real_speech_clips(n: int, max_seconds: float = 8.0) -> list[dict]:
    """The first `n` packaged real-speech test clips shorter than `max_seconds`, spread over the speakers:
    {audio: float32 16 kHz, text}."""
    import csv

    from distil.data.audio import decode_audio
    from distil.utils.paths import RESOURCES_DIR

    root = RESOURCES_DIR / "real_speech" / "test"
    rows = [r for r in csv.DictReader((root / "metadata.csv").open()) if float(r["duration"]) < max_seconds]
    rows = rows[::4][:n]
    return [
        {
            "audio": decode_audio({"path": str(root / r["file_name"]), "bytes": None}, 16_000).astype(
                np.float32
            ),
            "text": r["text"],
        }
        for r in rows
    ]


def pytorch_greedy_texts(model_dir, clips: list[dict]) -> list[str]:
    """transformers' greedy transcripts of `clips` (features clip by clip, one batched generate)."""
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    processor = WhisperProcessor.from_pretrained(model_dir)
    model = WhisperForConditionalGeneration.from_pretrained(model_dir).eval()
    feats = torch.cat(
        [processor(c["audio"], sampling_rate=16_000, return_tensors="pt").input_features for c in clips]
    )
    with torch.inference_mode():
        ids = model.generate(feats, num_beams=1)
    return [t.strip() for t in processor.batch_decode(ids, skip_special_tokens=True)]
