"""Text normalisation and the one WER implementation used by every stage.

Normalisers come from `whisper_normalizer` (OpenAI's Whisper normalisers, packaged with the English
spelling map), never from copied code. WER is jiwer's, counted over the corpus (total edits / total
reference words), with samples whose normalised reference is empty skipped and counted, not scored.
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from functools import cache

import jiwer
from whisper_normalizer.basic import BasicTextNormalizer
from whisper_normalizer.english import EnglishTextNormalizer

Normalizer = Callable[[str], str]


@cache
def english_normalizer() -> EnglishTextNormalizer:
    return EnglishTextNormalizer()


@cache
def basic_normalizer() -> BasicTextNormalizer:
    return BasicTextNormalizer()


def get_normalizer(language: str | None = "en") -> Normalizer:
    """Whisper's English normaliser for English (or unknown language), the basic one otherwise."""
    if language in (None, "en", "english"):
        return english_normalizer()
    return basic_normalizer()


def identity(text: str) -> str:
    """The 'orthographic' normaliser: only whitespace is tidied."""
    return " ".join(text.split())


@dataclass
class WERResult:
    wer: float | None  # percent, None when no sample could be scored
    substitutions: int
    deletions: int
    insertions: int
    reference_words: int
    scored: int  # samples with a non-empty normalised reference
    skipped_empty_reference: int

    @property
    def insertion_rate(self) -> float | None:
        return 100 * self.insertions / self.reference_words if self.reference_words else None

    @property
    def deletion_rate(self) -> float | None:
        return 100 * self.deletions / self.reference_words if self.reference_words else None

    @property
    def substitution_rate(self) -> float | None:
        return 100 * self.substitutions / self.reference_words if self.reference_words else None

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(
            insertion_rate=self.insertion_rate,
            deletion_rate=self.deletion_rate,
            substitution_rate=self.substitution_rate,
        )
        return out


def _pairs(references: Iterable[str], predictions: Iterable[str], normalizer: Normalizer):
    refs, hyps, skipped = [], [], 0
    for ref, hyp in zip(references, predictions, strict=True):
        ref_n, hyp_n = normalizer(ref or ""), normalizer(hyp or "")
        if not ref_n.strip():
            skipped += 1
            continue
        refs.append(ref_n)
        hyps.append(hyp_n)
    return refs, hyps, skipped


def corpus_wer(
    references: Iterable[str], predictions: Iterable[str], normalizer: Normalizer = identity
) -> WERResult:
    refs, hyps, skipped = _pairs(references, predictions, normalizer)
    if not refs:
        return WERResult(None, 0, 0, 0, 0, 0, skipped)
    # jiwer rejects empty hypotheses in some versions; an empty prediction is all deletions.
    out = jiwer.process_words(refs, [h if h.strip() else "" for h in hyps])
    n_words = out.substitutions + out.deletions + out.hits
    return WERResult(
        wer=100 * (out.substitutions + out.deletions + out.insertions) / n_words,
        substitutions=out.substitutions,
        deletions=out.deletions,
        insertions=out.insertions,
        reference_words=n_words,
        scored=len(refs),
        skipped_empty_reference=skipped,
    )


def sample_wer(reference: str | None, prediction: str, normalizer: Normalizer | None = None) -> float | None:
    """Percent WER of one sample after normalisation; None when the reference is missing or empty."""
    if reference is None:
        return None
    return corpus_wer([reference], [prediction], normalizer or english_normalizer()).wer


def corpus_cer(
    references: Iterable[str], predictions: Iterable[str], normalizer: Normalizer = identity
) -> float | None:
    """Percent character error rate, for languages written without spaces."""
    refs, hyps, _ = _pairs(references, predictions, normalizer)
    if not refs:
        return None
    out = jiwer.process_characters(refs, hyps)
    n_chars = out.substitutions + out.deletions + out.hits
    return 100 * (out.substitutions + out.deletions + out.insertions) / n_chars


def repeated_ngrams(text: str, n: int = 5, normalizer: Normalizer = identity) -> int:
    """How many n-grams occur again after their first occurrence: 0 for text without repeats.

    A hallucination signal: decoding loops repeat the same phrase many times.
    """
    words = normalizer(text or "").split()
    counts = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    return sum(c - 1 for c in counts.values())


def compression_ratio(text: str) -> float:
    """Bytes of `text` over the bytes zlib compresses it to (OpenAI's loop signal: above 2.4, the text
    repeats itself; 0 for empty text)."""
    data = (text or "").encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0
