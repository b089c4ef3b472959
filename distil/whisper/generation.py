"""Batched greedy/beam generation with Whisper's prompt settings, shared by evaluation and validation."""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch

from distil.data.audio import SAMPLING_RATE
from distil.utils.errors import ConfigError, InputError

log = logging.getLogger(__name__)

ENGLISH = (None, "en", "english")
# Whisper's English-only checkpoints (*.en) have 51864 tokens; multilingual ones 51865 (v1/v2) or 51866 (v3).
ENGLISH_ONLY_VOCAB_SIZE = 51864


def is_multilingual(model) -> bool:
    """Whether a Whisper model takes language/task prompt tokens: its generation config says, else its vocabulary."""
    flag = getattr(model.generation_config, "is_multilingual", None)
    return bool(flag) if flag is not None else is_multilingual_vocabulary(model.config.vocab_size)


def is_multilingual_vocabulary(vocab_size: int) -> bool:
    return int(vocab_size) > ENGLISH_ONLY_VOCAB_SIZE


def decoder_macs_per_token(config) -> int:
    """Multiply-accumulates a Whisper decoder spends per generated token (greedy, key/value cache), from its
    shape alone: per layer the self-attention projections (4 d^2), the cross-attention query and output
    projections (2 d^2: its keys and values are computed once per utterance), the feed-forward block (2 d f)
    and attention over the encoder's frames (2 S d); then the projection onto the vocabulary (d V). Attention
    over the tokens generated so far (2 t d per layer) is left out: it is small at transcript lengths.
    The ratio of two models' counts is the speed-up a decoder can reach at most when the arithmetic is the
    whole cost (on a CPU at batch 1, per-step overheads take part of it)."""
    d, ffn, frames = config.d_model, config.decoder_ffn_dim, config.max_source_positions
    per_layer = 6 * d * d + 2 * d * ffn + 2 * frames * d
    return int(config.decoder_layers * per_layer + d * config.vocab_size)


def generation_kwargs(
    model, language: str | None, task: str | None, max_new_tokens: int, num_beams: int = 1
) -> dict:
    kwargs: dict[str, Any] = {"max_new_tokens": int(max_new_tokens), "num_beams": int(num_beams)}
    if check_prompt(is_multilingual(model), language, task):
        if language:
            kwargs["language"] = language
        if task:
            kwargs["task"] = task
    return kwargs


def check_prompt(multilingual: bool, language: str | None, task: str | None) -> bool:
    """Whether the prompt takes language/task tokens; an English-only model asked for another language or
    task is an error."""
    if not multilingual and (language not in ENGLISH or task not in (None, "transcribe")):
        raise InputError(
            f"the model is English-only but the set asks for language={language!r}, task={task!r}: "
            "evaluate it on English sets (language: en) or use a multilingual model"
        )
    return multilingual


THRESHOLDS = ("compression_ratio_threshold", "logprob_threshold", "no_speech_threshold")


# Each threshold's valid range, and how an error message asks for it.
GUARD_BOUNDS = {
    "compression_ratio_threshold": (lambda v: v > 0, "a positive number (1.35 on token bytes)"),
    "logprob_threshold": (lambda v: v <= 0, "a number <= 0 (-1.0)"),
    "no_speech_threshold": (lambda v: 0 <= v <= 1, "a probability in [0, 1] (0.6)"),
    "max_tokens_per_second": (lambda v: v > 0, "a positive number of tokens per second of audio (10)"),
}


@dataclass(frozen=True)
class Guards:
    """Whisper's loop guards, as openai-whisper and faster-whisper users know them, run by transformers' own
    Whisper `generate`: a transcript whose compression ratio is above `compression_ratio_threshold` (transformers
    measures it on token bytes: 1.35 there is OpenAI's 2.4 on text) or whose average log-probability is below
    `logprob_threshold` is decoded again at the next `temperature`; one whose no-speech probability is above
    `no_speech_threshold` while its log-probability is low is left empty. distil adds a token limit of
    `max_tokens_per_second` per second of audio (at least one second's worth), so a clip that still loops stops
    early instead of filling the whole `max_new_tokens`."""

    temperature: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    compression_ratio_threshold: float | None = 1.35
    logprob_threshold: float | None = -1.0
    no_speech_threshold: float | None = 0.6
    max_tokens_per_second: float | None = 10.0

    @classmethod
    def from_config(cls, cfg: Mapping | None, key: str) -> Guards | None:
        """`key`'s settings checked before any model loads (None: plain decoding, no guards)."""
        if cfg is None:
            return None
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ConfigError(f"{key} has unknown key(s) {unknown}; known: {sorted(known)}")
        values = {**{f.name: f.default for f in fields(cls)}, **dict(cfg)}
        temperature = values["temperature"]
        temperature = [temperature] if isinstance(temperature, int | float) else list(temperature or [])
        if not temperature or any(not isinstance(t, int | float) or t < 0 for t in temperature):
            raise ConfigError(
                f"{key}.temperature={temperature}: give a list of temperatures >= 0, e.g. [0.0,0.2,0.4]"
            )
        for name, (valid, wanted) in GUARD_BOUNDS.items():
            value = values[name]
            if value is not None and (not isinstance(value, int | float) or not valid(value)):
                raise ConfigError(f"{key}.{name}={value!r}: give {wanted}, or null to turn it off")
        return cls(**{**values, "temperature": tuple(float(t) for t in temperature)})

    def generate_kwargs(self) -> dict:
        """The options of transformers' Whisper `generate` that run these guards."""
        kwargs: dict[str, Any] = {"temperature": self.temperature}
        for name in THRESHOLDS:
            if getattr(self, name) is not None:
                kwargs[name] = getattr(self, name)
        return kwargs

    def write_into(self, generation_config) -> None:
        """The guards into a model's generation config (generation_config.json). transformers' Whisper `generate`
        reads `compression_ratio_threshold` from it (acted on when a temperature schedule is passed); the whole
        set goes under `distil_loop_guards` for the user to pass to `generate`. The log-probability and no-speech
        thresholds are left out of transformers' own keys on purpose: with `logprob_threshold` in the generation
        config, transformers 5's ASR pipeline fails (IndexError), and the no-speech check needs it."""
        generation_config.compression_ratio_threshold = self.compression_ratio_threshold
        generation_config.distil_loop_guards = {**asdict(self), "temperature": list(self.temperature)}

    def token_limit(self, seconds: float, max_new_tokens: int) -> int:
        """The most tokens a clip of `seconds` may generate."""
        if self.max_tokens_per_second is None:
            return int(max_new_tokens)
        return min(int(max_new_tokens), math.ceil(self.max_tokens_per_second * max(seconds, 1.0)))


@dataclass(frozen=True)
class Transcript:
    text: str
    tokens: int  # tokens generated, the prompt and the end-of-text left out
    limit: int  # the token limit it was generated under

    @property
    def hit_limit(self) -> bool:
        """It ran out of tokens instead of ending: cut, and most likely looping."""
        return self.tokens >= self.limit


@torch.inference_mode()
def transcribe(
    model,
    processor,
    waves: Sequence[np.ndarray],
    batch_size: int,
    generate_kwargs: dict,
    guards: Guards | None = None,
) -> list[Transcript]:
    """Short-form transcription, batched by duration (similar lengths decode to similar token counts), under
    `guards` (None: plain greedy or beam search)."""
    max_new_tokens = int(generate_kwargs["max_new_tokens"])
    guarded = guards.generate_kwargs() if guards else {}

    def transcripts_of(feats: torch.Tensor, seconds: list[float]) -> list[Transcript]:
        # one limit per clip: the batch generates up to the largest, and each row is cut at its own
        limits = [guards.token_limit(s, max_new_tokens) if guards else max_new_tokens for s in seconds]
        kwargs = {**generate_kwargs, **guarded, "max_new_tokens": max(limits)}
        decoded = generate_with_counts(model, processor, feats, kwargs, limits)
        return [Transcript(text, n, limit) for (text, n), limit in zip(decoded, limits, strict=True)]

    return transcribe_by_duration(processor.feature_extractor, waves, batch_size, transcripts_of)


def transcribe_by_duration(
    feature_extractor, waves: Sequence[np.ndarray], batch_size: int, transcripts_of
) -> list:
    """`transcripts_of(features, seconds)` (seconds: each clip's duration) over batches of similar durations
    (longest first); the results in input order.

    Every backend batches the same way, so they see the same features (batched STFTs round differently)."""
    order = sorted(range(len(waves)), key=lambda i: len(waves[i]), reverse=True)
    results: list = [None] * len(waves)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        feats = feature_extractor(
            [waves[i] for i in idx], sampling_rate=SAMPLING_RATE, return_tensors="pt"
        ).input_features
        seconds = [len(waves[i]) / SAMPLING_RATE for i in idx]
        for i, result in zip(idx, transcripts_of(feats, seconds), strict=True):
            results[i] = result
    return results


def generate_with_counts(
    model, tokenizer, input_features: torch.Tensor, generate_kwargs: dict, limits: Sequence[int] | None = None
) -> list[tuple[str, int]]:
    """One batch of log-mel features -> (stripped transcript, tokens generated) per row: the text tokens and
    timestamps, not the prompt, the end-of-text or the padding after it; row i cut at `limits[i]` tokens."""
    param = next(model.parameters())
    # Only the guards `generate_kwargs` name run: an exported student's generation_config.json carries them too.
    config = copy.deepcopy(model.generation_config)
    for name in THRESHOLDS:
        setattr(config, name, None)
    features = input_features.to(param.device, param.dtype)
    ids = model.generate(input_features=features, generation_config=config, **generate_kwargs)
    ids = ids if torch.is_tensor(ids) else ids["sequences"]
    eos, prompt = end_of_text_id(model), decoder_prompt_ids(model)
    out = []
    for i, row in enumerate(ids.tolist()):
        body, _ = generated_body(row, eos, prompt)
        body = body[: limits[i]] if limits is not None else body
        out.append((tokenizer.decode(body, skip_special_tokens=True).strip(), len(body)))
    return out


def end_of_text_id(model) -> int:
    eos = model.generation_config.eos_token_id
    return int(eos[0] if isinstance(eos, list | tuple) else eos)


def decoder_prompt_ids(model) -> set[int]:
    """Token ids Whisper forces at the start of every transcript (never counted as generated)."""
    gc = model.generation_config
    ids = {gc.decoder_start_token_id, getattr(gc, "no_timestamps_token_id", None)}
    ids |= set((getattr(gc, "lang_to_id", None) or {}).values())
    ids |= set((getattr(gc, "task_to_id", None) or {}).values())
    return {int(i) for i in ids if i is not None}


def generated_body(row: Sequence[int], eos: int, prompt: set[int]) -> tuple[list[int], bool]:
    """(the tokens generated, whether it ended) of one output row: the tokens after the forced prompt and
    before the first end-of-text (Whisper pads finished rows with end-of-text)."""
    start = 0
    while start < len(row) and row[start] in prompt and row[start] != eos:
        start += 1
    generated = list(row[start:])
    return (generated[: generated.index(eos)], True) if eos in generated else (generated, False)


def generate_texts(model, tokenizer, input_features: torch.Tensor, generate_kwargs: dict) -> list[str]:
    """One batch of log-mel features -> stripped transcripts (special tokens removed)."""
    return [text for text, _ in generate_with_counts(model, tokenizer, input_features, generate_kwargs)]
