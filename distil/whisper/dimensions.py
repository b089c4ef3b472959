"""The published dimensions of the standard Whisper checkpoints, so a job can be sized offline.

`dry_run=true` estimates memory, disk and tokens from these numbers alone (no weights, no network). They are the
`config.json` values of the openai/whisper-* checkpoints on the Hub; a local model directory is read from its
own `config.json` instead, and the tiny random teacher from its `random` settings.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_SOURCE_POSITIONS = 1500  # encoder frames of a 30-s window (Whisper's only input length)
MAX_TARGET_POSITIONS = 448  # decoder positions: prompt + label


@dataclass(frozen=True)
class WhisperDimensions:
    d_model: int
    encoder_layers: int
    decoder_layers: int
    attention_heads: int
    ffn_dim: int
    vocab_size: int
    num_mel_bins: int = 80

    def encoder_parameters(self) -> int:
        """Two convolutions, the (stored) position table, the layers and the final LayerNorm."""
        d, f = self.d_model, self.ffn_dim
        convs = self.num_mel_bins * d * 3 + d + d * d * 3 + d
        return convs + MAX_SOURCE_POSITIONS * d + self.encoder_layers * _layer(d, f, cross=False) + 2 * d

    def decoder_parameters(self, layers: int | None = None) -> int:
        """Token and position embeddings (the output layer is tied to the tokens), the layers, the final norm."""
        d, f = self.d_model, self.ffn_dim
        n = self.decoder_layers if layers is None else layers
        return self.vocab_size * d + MAX_TARGET_POSITIONS * d + n * _layer(d, f, cross=True) + 2 * d


def _layer(d: int, f: int, cross: bool) -> int:
    """One transformer layer: attention (q, v, out with biases; k without), the MLP, a LayerNorm per block."""
    attention = 4 * d * d + 3 * d
    blocks = 3 if cross else 2
    return attention * (blocks - 1) + 2 * d * f + f + d + blocks * 2 * d


def _dims(d, enc, dec, heads, ffn, vocab, mels=80) -> WhisperDimensions:
    return WhisperDimensions(d, enc, dec, heads, ffn, vocab, mels)


_EN, _MULTI, _V3 = (
    51864,
    51865,
    51866,
)  # vocabularies: English-only, multilingual, large-v3 (one more language)
WHISPER_DIMENSIONS: dict[str, WhisperDimensions] = {
    "openai/whisper-tiny.en": _dims(384, 4, 4, 6, 1536, _EN),
    "openai/whisper-tiny": _dims(384, 4, 4, 6, 1536, _MULTI),
    "openai/whisper-base.en": _dims(512, 6, 6, 8, 2048, _EN),
    "openai/whisper-base": _dims(512, 6, 6, 8, 2048, _MULTI),
    "openai/whisper-small.en": _dims(768, 12, 12, 12, 3072, _EN),
    "openai/whisper-small": _dims(768, 12, 12, 12, 3072, _MULTI),
    "openai/whisper-medium.en": _dims(1024, 24, 24, 16, 4096, _EN),
    "openai/whisper-medium": _dims(1024, 24, 24, 16, 4096, _MULTI),
    "openai/whisper-large": _dims(1280, 32, 32, 20, 5120, _MULTI),
    "openai/whisper-large-v2": _dims(1280, 32, 32, 20, 5120, _MULTI),
    "openai/whisper-large-v3": _dims(1280, 32, 32, 20, 5120, _V3, 128),
    "openai/whisper-large-v3-turbo": _dims(1280, 32, 4, 20, 5120, _V3, 128),
}
# The offline teachers' packaged checkpoints (conf/teacher/tiny_en.yaml, base.yaml) are these models.
PACKAGED = {"tiny.en": "openai/whisper-tiny.en", "base": "openai/whisper-base"}


def from_config(config: Mapping[str, Any]) -> WhisperDimensions:
    """Dimensions from a transformers WhisperConfig as a dict (a model directory's config.json)."""
    return WhisperDimensions(
        d_model=int(config["d_model"]),
        encoder_layers=int(config["encoder_layers"]),
        decoder_layers=int(config["decoder_layers"]),
        attention_heads=int(config["encoder_attention_heads"]),
        ffn_dim=int(config["encoder_ffn_dim"]),
        vocab_size=int(config["vocab_size"]),
        num_mel_bins=int(config.get("num_mel_bins", 80)),
    )


def model_dimensions(model_cfg: Mapping[str, Any]) -> WhisperDimensions | None:
    """A teacher/model config's dimensions without loading it: a local directory's config.json, a known Hub id,
    a packaged checkpoint, or the tiny random teacher's settings; None when none of these says."""
    path = model_cfg.get("path")
    if path:
        config = Path(str(path)).expanduser() / "config.json"
        if config.is_file():
            return from_config(json.loads(config.read_text()))
        return WHISPER_DIMENSIONS.get(str(path))
    if model_cfg.get("checkpoint") in PACKAGED:
        return WHISPER_DIMENSIONS[PACKAGED[str(model_cfg["checkpoint"])]]
    random = model_cfg.get("random")
    if random:
        base = WHISPER_DIMENSIONS["openai/whisper-tiny.en"]
        return WhisperDimensions(
            int(random["d_model"]),
            int(random["encoder_layers"]),
            int(random["decoder_layers"]),
            int(random["attention_heads"]),
            int(random["ffn_dim"]),
            base.vocab_size,
        )
    return None
