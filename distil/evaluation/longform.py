"""Long-form transcription (recordings longer than Whisper's 30 s window) and its metrics.

Two algorithms, both thin layers over transformers so that the decoding is the library's own:

* chunked: cut the recording into `chunk_length_s` windows that overlap by `stride_length_s` on each
  side, transcribe the windows as one batch, and merge neighbouring transcripts where they overlap.
  This is transformers' ASR pipeline chunking; its merge (tokenizer `_decode_asr` -> longest common
  sequence) is exposed here as the pure function `merge_chunk_tokens` so it can be tested directly.
* sequential (OpenAI, Whisper paper section 3.8): slide a 30 s window along the recording, advancing it
  by the last predicted timestamp, with temperature fallback and compression-ratio / log-prob /
  no-speech thresholds. `WhisperForConditionalGeneration.generate` runs this when it is given the
  full-length (untruncated) features.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import numpy as np
import torch
from transformers.models.whisper.tokenization_whisper import _find_longest_common_sequence

from distil.data.audio import SAMPLING_RATE
from distil.data.text import Normalizer, corpus_wer, identity, repeated_ngrams  # noqa: F401 (re-exported)
from distil.utils.errors import ConfigError

WINDOW_S = 30.0  # Whisper's receptive field


# --------------------------------------------------------------------------- merging (pure)


def default_stride(chunk_length_s: float) -> float:
    """The stride on each side of a chunk when none is configured: one sixth of the chunk (as transformers)."""
    return chunk_length_s / 6


def merge_chunk_tokens(sequences: Sequence[Sequence[int]]) -> list[int]:
    """Merge the token sequences of consecutive overlapping chunks into one sequence.

    Neighbours are aligned at the offset where their overlapping ends agree best, and the overlap is
    split in its middle: the left chunk is trusted for the first half (it heard that audio with more
    right context), the right chunk for the second. This is exactly transformers' pipeline merge, so
    what the tests prove about this function holds for `transcribe_chunked`. Sequences must hold text
    tokens only (no special or timestamp tokens). With no agreement of at least two tokens the chunks
    are simply concatenated.
    """
    sequences = [list(s) for s in sequences]
    if not sequences:
        return []
    return list(_find_longest_common_sequence(sequences))


def merge_chunk_texts(texts: Sequence[str]) -> str:
    """Word-level version of `merge_chunk_tokens` (for transcripts without their token ids)."""
    vocab: dict[str, int] = {}
    ids = [[vocab.setdefault(w, len(vocab)) for w in t.split()] for t in texts]
    words = {i: w for w, i in vocab.items()}
    return " ".join(words[i] for i in merge_chunk_tokens(ids))


def chunk_bounds(
    n_samples: int, chunk_length_s: float, stride_length_s: float | None = None, sr: int = SAMPLING_RATE
):
    """(start, stop) sample indices of the chunks transformers' pipeline cuts (for reports and tests)."""
    stride_s = default_stride(chunk_length_s) if stride_length_s is None else stride_length_s
    chunk, stride = int(round(chunk_length_s * sr)), int(round(stride_s * sr))
    step = chunk - 2 * stride
    if step <= 0:
        raise ConfigError(
            f"chunk_length_s={chunk_length_s} must be more than twice stride_length_s={stride_s} "
            "(the chunks would not advance)"
        )
    bounds = []
    for start in range(0, n_samples, step):
        stop = min(start + chunk, n_samples)
        bounds.append((start, stop))
        if stop == n_samples:
            break
    return bounds


# --------------------------------------------------------------------------- metrics (pure)


def longform_metrics(
    references: Sequence[str], predictions: Sequence[str], normalizer: Normalizer, ngram: int = 5
) -> dict:
    """WER with insertion/deletion/substitution rates, and repeated n-grams (total and per recording)."""
    result = corpus_wer(references, predictions, normalizer)
    repeats = [repeated_ngrams(p, ngram, normalizer) for p in predictions]
    reference_repeats = [repeated_ngrams(r or "", ngram, normalizer) for r in references]
    return {
        **result.to_dict(),
        f"repeated_{ngram}grams": int(sum(repeats)),
        # Repeats the reference itself contains are not hallucinations; report the excess too.
        f"excess_repeated_{ngram}grams": int(
            sum(max(0, p - r) for p, r in zip(repeats, reference_repeats, strict=True))
        ),
        "recordings": len(predictions),
    }


# --------------------------------------------------------------------------- transcription


ALGORITHMS = ("chunked", "sequential")  # every backend's `long_form_algorithms` is these or a subset


@dataclass
class SequentialOptions:
    """OpenAI's long-form decoding heuristics (defaults: the Whisper paper / transformers docs)."""

    temperature: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    compression_ratio_threshold: float | None = 1.35  # on zlib of token bytes, as transformers computes it
    logprob_threshold: float | None = -1.0
    no_speech_threshold: float | None = 0.6
    condition_on_prev_tokens: bool = False
    extra: dict = field(default_factory=dict)


@dataclass
class LongFormSettings:
    """How the long-form section decodes a recording (eval.long_form, less its sets and algorithms)."""

    max_new_tokens: int = 444  # per chunk or window (Whisper's 448 minus the decoder prompt)
    chunk_length_s: float = 30.0  # chunked: window length ...
    stride_length_s: float | None = None  # ... overlapping by this on each side (null: chunk / 6)
    batch_size: int = 8  # chunked: windows per forward pass, across the recording
    sequential: SequentialOptions = field(default_factory=SequentialOptions)
    sequential_batch_size: int = 1  # sequential: recordings per generate call

    @classmethod
    def from_config(cls, sequential: dict | None = None, **settings) -> LongFormSettings:
        sequential = dict(sequential or {})
        batch_size = int(sequential.pop("batch_size", 1))
        known = {f.name for f in fields(SequentialOptions)} - {"extra"}
        if set(sequential) - known:
            raise ConfigError(
                f"eval.long_form.sequential has unknown key(s) {sorted(set(sequential) - known)}; "
                f"known: {sorted(known | {'batch_size'})}"
            )
        if "temperature" in sequential:
            sequential["temperature"] = tuple(float(t) for t in sequential["temperature"])
        stride = settings.get("stride_length_s")
        return cls(
            **{**settings, "stride_length_s": None if stride is None else float(stride)},
            sequential=SequentialOptions(**sequential),
            sequential_batch_size=batch_size,
        )

    @property
    def stride(self) -> float:
        return default_stride(self.chunk_length_s) if self.stride_length_s is None else self.stride_length_s


def ensure_pad_token(processor) -> None:
    """The pipeline's batch collation needs a pad token; Whisper pads with end-of-text."""
    tok = processor.tokenizer
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token


def transcribe_chunked(
    model,
    processor,
    waves: Sequence[np.ndarray],
    chunk_length_s: float = 30.0,
    stride_length_s: float | None = None,
    batch_size: int = 8,
    generate_kwargs: dict | None = None,
) -> list[str]:
    """Chunked long-form transcription with transformers' ASR pipeline (chunks batched across recordings)."""
    from transformers import pipeline

    if chunk_length_s > WINDOW_S:
        raise ConfigError(f"chunk_length_s={chunk_length_s} exceeds Whisper's {WINDOW_S:.0f} s window")
    stride = default_stride(chunk_length_s) if stride_length_s is None else stride_length_s
    chunk_bounds(SAMPLING_RATE, chunk_length_s, stride)  # validates chunk vs stride before any decoding
    ensure_pad_token(processor)
    asr = pipeline(
        "automatic-speech-recognition",
        model=model,
        tokenizer=processor.tokenizer,
        feature_extractor=processor.feature_extractor,
        device=model.device,
        dtype=model.dtype,
    )
    inputs = [{"raw": np.asarray(w, dtype=np.float32), "sampling_rate": SAMPLING_RATE} for w in waves]
    outputs = asr(
        inputs,
        chunk_length_s=chunk_length_s,
        stride_length_s=stride,
        batch_size=batch_size,
        generate_kwargs=dict(generate_kwargs or {}),
        ignore_warning=True,
    )
    return [o["text"].strip() for o in outputs]


def sequential_features(processor, waves: Sequence[np.ndarray], device, dtype):
    """Full-length log-mel features (no 30 s truncation) plus the attention mask marking real frames."""
    fe = processor.feature_extractor
    feats = fe(
        [np.asarray(w, dtype=np.float32) for w in waves],
        sampling_rate=SAMPLING_RATE,
        truncation=False,
        padding="longest",
        return_attention_mask=True,
        return_tensors="pt",
    )
    if feats.input_features.shape[-1] < fe.nb_max_frames:
        # All inputs fit one window: generate wants exactly 30 s then (short-form path).
        feats = fe(
            [np.asarray(w, dtype=np.float32) for w in waves],
            sampling_rate=SAMPLING_RATE,
            return_attention_mask=True,
            return_tensors="pt",
        )
    return feats.input_features.to(device, dtype), feats.attention_mask.to(device)


@torch.inference_mode()
def transcribe_sequential(
    model,
    processor,
    waves: Sequence[np.ndarray],
    options: SequentialOptions | None = None,
    batch_size: int = 4,
    generate_kwargs: dict | None = None,
) -> list[str]:
    """OpenAI-style sequential long-form transcription via `generate` on untruncated features."""
    options = options or SequentialOptions()
    texts: list[str] = []
    for start in range(0, len(waves), batch_size):
        features, mask = sequential_features(
            processor, waves[start : start + batch_size], model.device, model.dtype
        )
        ids = model.generate(
            input_features=features,
            attention_mask=mask,
            return_timestamps=True,
            temperature=tuple(options.temperature),
            compression_ratio_threshold=options.compression_ratio_threshold,
            logprob_threshold=options.logprob_threshold,
            no_speech_threshold=options.no_speech_threshold,
            condition_on_prev_tokens=options.condition_on_prev_tokens,
            **options.extra,
            **(generate_kwargs or {}),
        )
        if not torch.is_tensor(ids):
            ids = ids["sequences"]
        texts += [t.strip() for t in processor.batch_decode(ids, skip_special_tokens=True)]
    return texts
