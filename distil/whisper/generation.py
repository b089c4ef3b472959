"""Batched greedy/beam generation with Whisper's prompt settings, shared by evaluation and validation."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from distil.data.audio import SAMPLING_RATE
from distil.utils.errors import InputError

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


@torch.inference_mode()
def transcribe(
    model, processor, waves: Sequence[np.ndarray], batch_size: int, generate_kwargs: dict
) -> list[str]:
    """Short-form transcription, batched by duration (similar lengths decode to similar token counts)."""
    return transcribe_by_duration(
        processor.feature_extractor,
        waves,
        batch_size,
        lambda feats: generate_texts(model, processor, feats, generate_kwargs),
    )


def transcribe_by_duration(
    feature_extractor, waves: Sequence[np.ndarray], batch_size: int, texts_of
) -> list[str]:
    """`texts_of(features)` over batches of similar durations (longest first); the texts in input order.

    Every backend batches the same way, so they see the same features (batched STFTs round differently)."""
    order = sorted(range(len(waves)), key=lambda i: len(waves[i]), reverse=True)
    texts: list[str] = [""] * len(waves)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        feats = feature_extractor(
            [waves[i] for i in idx], sampling_rate=SAMPLING_RATE, return_tensors="pt"
        ).input_features
        for i, text in zip(idx, texts_of(feats), strict=True):
            texts[i] = text
    return texts


def generate_texts(model, tokenizer, input_features: torch.Tensor, generate_kwargs: dict) -> list[str]:
    """One batch of log-mel features -> stripped transcripts (special tokens removed)."""
    param = next(model.parameters())
    ids = model.generate(input_features=input_features.to(param.device, param.dtype), **generate_kwargs)
    ids = ids if torch.is_tensor(ids) else ids["sequences"]
    return [text.strip() for text in tokenizer.batch_decode(ids, skip_special_tokens=True)]
