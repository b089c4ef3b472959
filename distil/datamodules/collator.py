"""Rows -> model batches: log-mel features, per-sample/per-epoch targets (`distil.data.targets`), padding;
reference text -> label ids for fine-tuning; training labels re-tokenized with BPE dropout (`augment.bpe_dropout`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from distil.data.audio import SAMPLING_RATE, AudioDecodeError, audio_duration, decode_audio
from distil.data.encoder_cache import EncoderCache, cache_key
from distil.data.label_plan import MAX_WHISPER_SECONDS
from distil.data.targets import (
    WHISPER_MAX_LABEL_LENGTH,
    SpecialTokens,
    build_targets,
    collate_labels,
    sample_rng,
)
from distil.datamodules.filters import DURATION_FILTERS, DataError, Drop, drop_reason
from distil.training.augment import BPEDropout
from distil.utils.errors import ConfigError
from distil.whisper.generation import is_multilingual_vocabulary

log = logging.getLogger(__name__)


LABEL_SOURCES = ("pseudo", "text")


def label_body(token_ids: Sequence[int], special: SpecialTokens) -> list[int]:
    """The label ids from `<|startoftranscript|>` on (a packed label may start with its prompt)."""
    ids = [int(i) for i in token_ids]
    if ids and ids[0] == special.startofprev and special.sot in ids:
        return ids[ids.index(special.sot) :]
    return ids


def decoded_problem(audio: Any) -> tuple[float | None, Drop | None]:
    """(decoded seconds, drop) of a raw clip, checked as labelling checks clips: `unreadable_audio` when it
    cannot be decoded (or is empty, or not finite), `too_long` when it is longer than Whisper's 30-s window,
    which the feature extractor would cut silently while the label keeps the whole transcript.

    Measured on the decoded audio, so a wrong `duration` column or header cannot hide a long clip. The cost is
    one decode per raw clip when the training data is filtered (before the first step): exact counts in the
    filter report from the start and batches of the configured size, instead of batches that shrink when a
    bad clip is met and counts that grow during training."""
    try:
        seconds = len(decode_audio(audio, SAMPLING_RATE)) / SAMPLING_RATE
    except AudioDecodeError as err:
        return None, ("unreadable_audio", str(err))
    if seconds > MAX_WHISPER_SECONDS + 1e-3:  # labelling's tolerance (distil.datamodules.labelling)
        return seconds, ("too_long", f"{seconds:.2f} s > {MAX_WHISPER_SECONDS:g} s")
    return seconds, None


class TextLabeler:
    """Label ids for the reference text (fine-tuning): the tokenizer's Whisper prefix + text + `<|endoftext|>`.

    English-only vocabularies use `<|startoftranscript|><|notimestamps|>`; multilingual ones
    need the language (`data.datasets[i].language` or `data.language`) and task tokens.
    """

    def __init__(self, tokenizer, language: str | None = None, task: str | None = None):
        self.tokenizer = tokenizer
        self.multilingual = is_multilingual_vocabulary(len(tokenizer))
        self.language, self.task = language, task or "transcribe"
        self._prefix_for = object()  # the language the tokenizer's prefix is currently set to

    def __call__(self, text: str, language: str | None = None) -> list[int]:
        lang = (language or self.language) if self.multilingual else None
        if self.multilingual and not lang:
            raise DataError(
                "fine-tuning a multilingual model on reference text needs the language: set "
                "data.datasets[i].language or data.language"
            )
        if lang != self._prefix_for:
            task = self.task if self.multilingual else None
            self.tokenizer.set_prefix_tokens(language=lang, task=task, predict_timestamps=False)
            self._prefix_for = lang
        # Whisper transcripts start with a space token, as the teacher generates them.
        return list(self.tokenizer(" " + (text or "").strip()).input_ids)


class SpeechCollator:
    """Rows -> model batch: log-mel features (or cached encoder states), padded decoder inputs and labels."""

    def __init__(
        self,
        feature_extractor,
        tokenizer,
        *,
        label_source: str = "pseudo",
        timestamp_probability: float = 0.0,
        condition_on_prev_probability: float = 0.0,
        max_label_length: int = WHISPER_MAX_LABEL_LENGTH,
        seed: int = 0,
        language: str | None = None,
        task: str | None = None,
        encoder_cache: EncoderCache | None = None,
        bpe_dropout: float = 0.0,
    ):
        """`bpe_dropout`: p > 0 re-tokenizes each training label's text spans with BPE dropout p (`__call__` only:
        validation and the filters see the stored labels)."""
        if label_source not in LABEL_SOURCES:
            raise ConfigError(f"label_source must be one of {LABEL_SOURCES}, got {label_source!r}")
        self.feature_extractor = feature_extractor
        self.tokenizer = tokenizer
        self.special = SpecialTokens.from_tokenizer(tokenizer)
        self.text_labeler = TextLabeler(tokenizer, language, task)
        self.label_source = label_source
        self.timestamp_probability = float(timestamp_probability)
        self.condition_on_prev_probability = float(condition_on_prev_probability)
        self.max_label_length = int(max_label_length)
        self.seed = int(seed)
        self.encoder_cache = encoder_cache
        self.bpe_dropout = BPEDropout(tokenizer, bpe_dropout, self.special.is_text) if bpe_dropout else None
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.special.eot)

    def label_ids(self, row: Mapping[str, Any]) -> list[int]:
        if self.label_source == "text":
            return self.text_labeler(row["text"], row.get("language"))
        return [int(i) for i in row["token_ids"]]

    def training_label_ids(self, row: Mapping[str, Any]) -> list[int]:
        """The label ids a training batch uses: the stored ones, or with `bpe_dropout` their text spans
        re-tokenized with BPE dropout (the same text; a stored `<|startofprev|>` prompt, the special prefix,
        timestamps and `<|endoftext|>` untouched). A label that would then no longer fit `max_label_length`
        keeps its stored ids (it would lose its end to truncation)."""
        ids = self.label_ids(row)
        if self.bpe_dropout is None:
            return ids
        special = self.special
        start = ids.index(special.sot) if ids and ids[0] == special.startofprev and special.sot in ids else 0
        dropped = self.bpe_dropout(ids, start=start)
        if len(dropped) - start > self.max_label_length + 1 >= len(ids) - start:
            return ids
        return dropped

    def label_length(self, row: Mapping[str, Any]) -> int | None:
        """The label's length as the filters count it (without the special prefix and end-of-text)."""
        if self.label_source == "text":
            return len(self.text_labeler(row.get("text") or "", row.get("language")))
        ids = row.get("token_ids")
        return None if ids is None else len(label_body(ids, self.special))

    def drop_reason(self, row: Mapping[str, Any], filters: Mapping[str, Any]) -> Drop | None:
        """Why the training filters (`drop_reason` with `filters` as its keyword arguments) drop a canonical
        row, as (reason, detail), or None to keep it.

        Raw data (reference text) is first checked as labelling checks its clips, on the decoded audio
        (`decoded_problem`), and its duration is the decoded length, not the duration column (which may be
        wrong). Pseudo-labelled rows passed that check when they were labelled; a missing duration is read
        from the audio's header."""
        duration = row.get("duration")
        if self.label_source == "text":
            duration, problem = decoded_problem(row["audio"])
            if problem is not None:
                return problem
        elif duration is None and any(filters.get(k) is not None for k in DURATION_FILTERS):
            duration = audio_duration(row["audio"])
        ids = row.get("token_ids")
        truncated = bool(ids) and int(ids[-1]) != self.special.eot  # generation hit max_new_tokens
        reason = drop_reason(
            row.get("pl_wer"),
            duration,
            self.label_length(row),
            transcript=row.get("pseudo_label"),
            truncated=truncated,
            **filters,
        )
        return None if reason is None else (reason, None)

    def prompt_ids(self, row: Mapping[str, Any]) -> list[int] | None:
        prompt = row.get("prompt")
        if not prompt:
            return None
        return list(self.tokenizer(prompt, add_special_tokens=False).input_ids)

    def features(self, rows: Sequence[Mapping[str, Any]]) -> torch.Tensor:
        waves = []
        for r in rows:
            try:
                waves.append(decode_audio(r["audio"], SAMPLING_RATE))
            except AudioDecodeError as err:  # checked data should not get here: name the sample if it does
                raise AudioDecodeError(f"{r['source']} id {r['sample_id']}: {err}") from err
        # Log-mel features are always fp32: under an enclosing CPU autocast (bf16 training that collates in
        # the training process) the extractor's STFT would come out bf16, which it cannot turn into numpy.
        with torch.autocast("cpu", enabled=False):
            out = self.feature_extractor(waves, sampling_rate=SAMPLING_RATE, return_tensors="pt")
        return out.input_features

    def sample_ids(self, rows: Sequence[Mapping[str, Any]]) -> list[str]:
        return [f"{r['source']}/{r['sample_id']}" for r in rows]

    def __call__(self, rows: Sequence[Mapping[str, Any]], epoch: int = 0) -> dict[str, Any]:
        keys = self.sample_ids(rows)
        batch: dict[str, Any] = {"sample_ids": keys, "epoch": int(epoch)}
        cached = None
        if self.encoder_cache is not None:
            batch["cache_keys"] = [cache_key(r["source"], r["sample_id"], r["audio"]) for r in rows]
            cached = self.encoder_cache.load(batch["cache_keys"])
        if cached is not None:
            batch["encoder_hidden_states"] = torch.from_numpy(cached)  # fp16; the module casts
        else:
            batch["input_features"] = self.features(rows)
        targets = [
            build_targets(
                self.training_label_ids(r),
                self.special,
                sample_rng(self.seed, epoch, key),
                prompt_ids=self.prompt_ids(r),
                timestamp_probability=self.timestamp_probability,
                condition_on_prev_probability=self.condition_on_prev_probability,
                max_label_length=self.max_label_length,
            )
            for r, key in zip(rows, keys, strict=True)
        ]
        batch.update(collate_labels(targets, self.pad_id))
        return batch

    def validation(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        return {
            "input_features": self.features(rows),
            "references": [r.get("text") or "" for r in rows],
            "sample_ids": self.sample_ids(rows),
        }
