"""A LightningModule that only generates: the teacher for pseudo-labelling (token ids, languages, truncation).

`Trainer.predict` drives it, so the same code runs on CPU, one GPU, or many GPUs/nodes. Each batch
holds log-mel `input_features`; `predict_step` returns, per sample, the full token sequence (the
decoder prefix the model was started with, the generated tokens, `<|endoftext|>`), that sequence
decoded with its special tokens and timestamps (what training tokenises), and the plain text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from transformers import AutoTokenizer, GenerationConfig
from transformers.utils import logging as hf_logging

from distil.data.encoder_cache import EncoderCache
from distil.utils.errors import InputError
from distil.whisper.generation import is_multilingual
from distil.whisper.models import load_whisper

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class GenerationConfigError(InputError):
    """Generation settings the teacher cannot honour (e.g. a language for an English-only model)."""


@dataclass
class GenerationSettings:
    num_beams: int = 1
    return_timestamps: bool = False
    language: str | None = None  # None: English-only models need none; multilingual ones detect per sample
    task: str | None = None  # "transcribe" | "translate"; multilingual models only
    max_new_tokens: int | None = 128

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def language_code(language: str, generation_config: GenerationConfig) -> str:
    """Normalise 'en', 'english' or '<|en|>' to the token '<|en|>' the model knows, or raise."""
    lang_to_id = getattr(generation_config, "lang_to_id", None) or {}
    token = language if language.startswith("<|") else f"<|{language.lower()}|>"
    if token in lang_to_id:
        return token
    from transformers.models.whisper.tokenization_whisper import TO_LANGUAGE_CODE

    code = TO_LANGUAGE_CODE.get(language.lower())
    if code and f"<|{code}|>" in lang_to_id:
        return f"<|{code}|>"
    raise GenerationConfigError(
        f"unknown language {language!r} for this teacher; use a code such as 'en', 'fr', 'de' "
        f"({len(lang_to_id)} languages known)"
    )


def check_generation(
    settings: GenerationSettings, generation_config: GenerationConfig, model_name: str = ""
) -> None:
    """Reject settings the teacher cannot honour, before its weights are loaded."""
    multilingual = bool(getattr(generation_config, "is_multilingual", False))
    if not multilingual and (settings.language is not None or settings.task not in (None, "transcribe")):
        what = (
            f"language={settings.language!r}" if settings.language is not None else f"task={settings.task!r}"
        )
        raise GenerationConfigError(
            f"teacher {model_name or ''} is English-only (generation_config.is_multilingual is false, e.g. a '.en' "
            f"model), so it cannot take {what}; set generation.language=null and generation.task=null, "
            "or choose a multilingual teacher"
        )
    if multilingual and settings.language is not None:
        language_code(settings.language, generation_config)
    if settings.task not in (None, "transcribe", "translate"):
        raise GenerationConfigError(
            f"generation.task must be transcribe, translate or null, not {settings.task!r}"
        )
    if settings.num_beams < 1:
        raise GenerationConfigError("generation.num_beams must be >= 1")


class WhisperTranscriber(L.LightningModule):
    """Batched Whisper generation. `batch["input_features"]` is (B, n_mels, 3000) or None (nothing to do)."""

    def __init__(
        self,
        model_dir: str,
        generation: GenerationSettings | dict | None = None,
        dtype: str = "fp32",
        attn_implementation: str = "sdpa",
    ):
        super().__init__()
        self.settings = (
            generation
            if isinstance(generation, GenerationSettings)
            else GenerationSettings(**(generation or {}))
        )
        if dtype not in DTYPES:
            raise GenerationConfigError(f"dtype must be one of {sorted(DTYPES)}, not {dtype!r}")
        generation_config = GenerationConfig.from_pretrained(model_dir)
        check_generation(self.settings, generation_config, model_dir)
        hf_logging.set_verbosity_error()  # generate() warns per call about settings we pass on purpose
        self.model = load_whisper(
            model_dir, dtype=DTYPES[dtype], attn_implementation=attn_implementation
        ).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model_dir = model_dir
        self.dtype_name = dtype
        self.generation_config = self.model.generation_config
        self.multilingual = is_multilingual(self.model)
        self.encoder_cache: EncoderCache | None = None
        eos = self.generation_config.eos_token_id
        self.eos_id = eos[0] if isinstance(eos, (list, tuple)) else eos

    # -- prefix: the tokens the decoder is started with (a single generate call returns them first) ----------
    def prefix(self, language_token: str | None) -> list[int]:
        gc = self.generation_config
        ids = [gc.decoder_start_token_id]
        if self.multilingual:
            ids.append(gc.lang_to_id[language_token])
            ids.append(gc.task_to_id[self.settings.task or "transcribe"])
        if not self.settings.return_timestamps:
            ids.append(gc.no_timestamps_token_id)
        return ids

    def _languages(self, encoder_outputs, batch_size: int) -> list[str | None]:
        if not self.multilingual:
            return [None] * batch_size
        if self.settings.language is not None:
            return [language_code(self.settings.language, self.generation_config)] * batch_size
        lang_ids = self.model.detect_language(
            encoder_outputs=encoder_outputs, generation_config=self.generation_config
        )
        return self.tokenizer.convert_ids_to_tokens(lang_ids.tolist())

    def _text_tokens(self, row: list[int]) -> list[int]:
        """Generated tokens without padding and end-of-text (Whisper's generate strips the eos of the longest
        row and pads the others with pad == eos, so the eos cannot be read off the output)."""
        if self.eos_id in row:
            row = row[: row.index(self.eos_id)]
        return row

    def _token_limit(self, prefix_len: int) -> int:
        if self.settings.max_new_tokens:
            return int(self.settings.max_new_tokens)
        return int(self.model.config.max_target_positions) - prefix_len

    def set_encoder_cache(self, cache: EncoderCache | None) -> None:
        """Store each unit's encoder output (keyed by the batch's `cache_keys`) for training: a student that shares
        this teacher's frozen encoder reads it instead of encoding the unit again."""
        self.encoder_cache = cache

    @torch.inference_mode()
    def transcribe(
        self, input_features: torch.Tensor, cache_keys: list[str] | None = None
    ) -> dict[str, list]:
        input_features = input_features.to(self.device, self.model.dtype)
        # One encoder pass shared by language detection, generation and training's encoder cache.
        encoder_outputs = self.model.get_encoder()(input_features)
        if self.encoder_cache is not None and cache_keys is not None:
            self.encoder_cache.save(cache_keys, encoder_outputs.last_hidden_state)
        languages = self._languages(encoder_outputs, input_features.shape[0])
        # One generate call per 30-s window, as the reference labels: with timestamps, transformers 5 otherwise
        # runs its long-form seek loop inside the window (a row whose last segment is unfinished is decoded
        # again from its last timestamp, and the shared encoder outputs no longer match the shrunk batch).
        kwargs = dict(
            num_beams=self.settings.num_beams,
            return_timestamps=self.settings.return_timestamps,
            max_new_tokens=self.settings.max_new_tokens,
            force_unique_generate_call=True,
        )
        if self.multilingual:
            kwargs.update(language=languages, task=self.settings.task or "transcribe")
        sequences = self.model.generate(
            input_features=input_features, encoder_outputs=encoder_outputs, **kwargs
        )
        if isinstance(sequences, dict):
            sequences = sequences["sequences"]
        out = {"token_ids": [], "whisper_transcript": [], "pseudo_label": [], "language": [], "truncated": []}
        for row, lang in zip(sequences.tolist(), languages, strict=True):
            prefix = self.prefix(lang)
            if row[: len(prefix)] == prefix:  # a single generate call returns the prompt too
                row = row[len(prefix) :]
            text_tokens = self._text_tokens(row)
            # A row that used its whole budget without ending is cut: it keeps no end-of-text.
            truncated = len(text_tokens) >= self._token_limit(len(prefix))
            ids = prefix + text_tokens + ([] if truncated else [self.eos_id])
            out["token_ids"].append(ids)
            out["whisper_transcript"].append(
                self.tokenizer.decode(
                    ids, skip_special_tokens=False, decode_with_timestamps=self.settings.return_timestamps
                )
            )
            out["pseudo_label"].append(self.tokenizer.decode(text_tokens, skip_special_tokens=True).strip())
            out["language"].append(lang[2:-2] if lang else None)
            out["truncated"].append(truncated)
        return out

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Move only the features. Lightning's default walks the whole batch, and the rows' FLAC `bytes` are a
        Sequence to it: it rebuilt every byte one by one (~40% of the CPU stage's time at 3-s clips)."""
        if isinstance(batch, dict) and "input_features" in batch:
            features = batch["input_features"]
            return {**batch, "input_features": None if features is None else features.to(device)}
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def predict_step(self, batch: dict, batch_idx: int = 0, dataloader_idx: int = 0) -> dict[str, list]:
        features = batch.get("input_features")
        if features is None:  # every sample of the batch was skipped (bad or too long audio)
            return {
                "token_ids": [],
                "whisper_transcript": [],
                "pseudo_label": [],
                "language": [],
                "truncated": [],
            }
        return self.transcribe(features, batch.get("cache_keys"))
