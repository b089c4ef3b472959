"""Batched greedy/beam generation with Whisper's prompt settings, shared by evaluation and validation."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from distil.data.audio import SAMPLING_RATE
from distil.evaluation.data import ENGLISH, EvalInputError
from distil.whisper.loading import is_multilingual

log = logging.getLogger(__name__)


def generation_kwargs(
    model, language: str | None, task: str | None, max_new_tokens: int, num_beams: int = 1
) -> dict:
    kwargs: dict[str, Any] = {"max_new_tokens": int(max_new_tokens), "num_beams": int(num_beams)}
    if is_multilingual(model):
        if language:
            kwargs["language"] = language
        if task:
            kwargs["task"] = task
    elif language not in ENGLISH or task not in (None, "transcribe"):
        raise EvalInputError(
            f"the model is English-only but the set asks for language={language!r}, task={task!r}: "
            "evaluate it on English sets (language: en) or use a multilingual model"
        )
    return kwargs


@torch.inference_mode()
def transcribe(
    model, processor, waves: Sequence[np.ndarray], batch_size: int, generate_kwargs: dict
) -> list[str]:
    """Short-form transcription, batched by duration (similar lengths decode to similar token counts)."""
    order = sorted(range(len(waves)), key=lambda i: len(waves[i]), reverse=True)
    texts: list[str] = [""] * len(waves)
    fe = processor.feature_extractor
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        feats = fe([waves[i] for i in idx], sampling_rate=SAMPLING_RATE, return_tensors="pt").input_features
        ids = model.generate(input_features=feats.to(model.device, model.dtype), **generate_kwargs)
        ids = ids if torch.is_tensor(ids) else ids["sequences"]
        for i, text in zip(idx, processor.batch_decode(ids, skip_special_tokens=True), strict=True):
            texts[i] = text.strip()
    return texts
