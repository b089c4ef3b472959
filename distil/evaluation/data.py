"""Evaluation sets: the entry schema of `eval.sets.<name>` and decoding a set into samples."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
from omegaconf import DictConfig, OmegaConf

from distil.data.audio import SAMPLING_RATE, AudioDecodeError, decode_audio
from distil.data.entries import DatasetEntry
from distil.utils.errors import InputError

log = logging.getLogger(__name__)


FRAME_S = 0.01  # Whisper's log-mel hop (160 samples): shorter audio has no frame at all


# The keys an eval set shares with `data.datasets[i]` take DatasetEntry's defaults (one schema); the rest are
# evaluation's own. Two differ on purpose: durations come from the decoded audio here (no duration column),
# and a set without a language is scored as English (the normaliser and the prompt need one).
SET_DEFAULTS = {
    **{
        f.name: f.default
        for f in fields(DatasetEntry)
        if f.name in ("config", "audio_column", "text_column", "id_column", "speaker_column", "reader")
    },
    "duration_column": None,
    "language": "en",
    "split": "test",
    "max_samples": None,  # cap on the number of samples (null = the whole split)
    "task": "transcribe",
    "metric": "wer",  # "cer" for languages written without spaces
    "section": "sets",  # where the set lives in the eval config (for error messages)
}


class EvalInputError(InputError):
    """Input the evaluation cannot use (model, checkpoint, data set); the message names it and the fix."""


@dataclass
class Sample:
    id: str
    audio: np.ndarray
    reference: str | None

    @property
    def duration(self) -> float:
        return len(self.audio) / SAMPLING_RATE


KNOWN_KEYS = {"path", "name", *SET_DEFAULTS} - {"section"}


def set_entry(name: str, entry: DictConfig | dict, section: str = "sets") -> dict:
    """An eval set's settings with the defaults filled in; a key the schema does not know is refused by name."""
    raw = OmegaConf.to_container(entry, resolve=True) if isinstance(entry, DictConfig) else dict(entry)
    unknown = sorted(set(raw) - KNOWN_KEYS)
    if unknown:
        raise EvalInputError(
            f"eval.{section}.{name} has unknown key(s) {unknown}; known keys: {sorted(KNOWN_KEYS - {'name'})}"
        )
    out = {**SET_DEFAULTS, "name": name, "section": section, **raw, "id_column_set": "id_column" in raw}
    if not out.get("path"):
        raise EvalInputError(
            f"eval.{section}.{name} has no path (a local corpus directory or a Hub dataset id)"
        )
    return out


@dataclass
class EvalSetEntry(DatasetEntry):
    """The `distil.data.entries` view of an eval set, so loading and column checks are the shared ones; error
    messages name the eval config key to fix."""

    config_key: str = ""

    @property
    def key(self) -> str:
        return self.config_key


def _dataset_entry(entry: dict) -> EvalSetEntry:
    return EvalSetEntry(
        name=entry["name"],
        path=str(entry["path"]),
        config=entry.get("config"),
        splits=[entry["split"]],
        audio_column=entry["audio_column"],
        text_column=entry.get("text_column"),
        id_column=entry.get("id_column"),
        speaker_column=entry.get("speaker_column"),
        duration_column=entry.get("duration_column"),
        language=entry.get("language"),
        reader=entry.get("reader"),
        config_key=f"eval.{entry['section']}.{entry['name']}",
    )


def load_samples(
    entry: dict, max_samples: int | None = None, skip_bad_audio: bool = False
) -> tuple[list[Sample], list[dict]]:
    """Decode one eval set. Returns (samples, problems); bad audio raises unless `skip_bad_audio`."""
    from distil.data.entries import load_split, spread_subset, stable_id, validate_columns

    data_entry = _dataset_entry(entry)
    try:
        ds = load_split(data_entry, entry["split"], streaming=False)
        if not entry.get("id_column_set") and data_entry.id_column not in ds.column_names:
            entry = {**entry, "id_column": None}  # the default `id` is optional: generated ids instead
            data_entry.id_column = None
        validate_columns(data_entry, entry["split"], ds.column_names)
    except FileNotFoundError as err:
        raise EvalInputError(
            f"eval set {entry['name']!r} ({entry['path']}, split {entry['split']}): {err}"
        ) from err
    audio_col, text_col, id_col = entry["audio_column"], entry.get("text_column"), entry.get("id_column")
    caps = [n for n in (max_samples, entry.get("max_samples")) if n]
    indices = spread_subset(len(ds), min(caps) if caps else None)
    samples, problems = [], []
    for i, row in zip(indices, ds.select(indices), strict=True):
        sid = str(row[id_col]) if id_col else stable_id(entry["name"], entry["split"], i)
        try:
            wave = decode_audio(row[audio_col], SAMPLING_RATE)
            if len(wave) < FRAME_S * SAMPLING_RATE:
                raise AudioDecodeError(
                    f"audio of sample {sid} lasts {1000 * len(wave) / SAMPLING_RATE:.1f} ms, shorter than one "
                    f"{1000 * FRAME_S:.0f} ms frame: nothing to transcribe"
                )
        except AudioDecodeError as err:
            if not skip_bad_audio:
                raise EvalInputError(
                    f"eval set {entry['name']!r}, sample {sid}: {err}. Remove the sample or set eval.skip_bad_audio=true"
                ) from err
            problems.append({"id": sid, "error": str(err)})
            continue
        ref = row[text_col] if text_col else None
        samples.append(Sample(sid, wave, ref if ref is None else str(ref)))
    if not samples:
        raise EvalInputError(f"eval set {entry['name']!r} has no usable samples")
    return samples, problems


def has_references(samples: Sequence[Sample]) -> bool:
    return any(s.reference and s.reference.strip() for s in samples)
