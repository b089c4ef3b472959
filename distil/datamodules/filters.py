"""Training-data filters (pseudo-label WER, hallucination signals, duration, label length), their per-source counts,
mixing weights."""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from distil.data.entries import DataConfigError
from distil.data.targets import WHISPER_MAX_LABEL_LENGTH
from distil.data.text import compression_ratio

log = logging.getLogger(__name__)


class DataError(DataConfigError):
    """Training data that cannot be used as configured (missing pseudo-labels, references, columns)."""


def sampling_probabilities(weights: Sequence[float]) -> list[float]:
    """Mixing probabilities proportional to each dataset's `weight` (hours or sample counts)."""
    w = [float(x) for x in weights]
    if not w:
        raise DataError("no training datasets: data.datasets is empty")
    if any(not math.isfinite(x) or x <= 0 for x in w):
        raise DataError(f"data.datasets[*].weight must be positive numbers, got {w}")
    total = sum(w)
    return [x / total for x in w]


# Why a sample is dropped, in the order the rules are tried (the keys of data_filter.json's `dropped`).
DROP_REASONS = (
    "uppercase",
    "no_reference",
    "wer",
    "too_short",
    "too_long",
    "truncated",
    "compression_ratio",
    "tokens_per_second",
    "label_too_long",
    "unreadable_audio",  # raw data only (labelling skipped these from pseudo-labels): see decoded_problem
)

# The filters that need a clip's duration (from its duration column, else the audio).
DURATION_FILTERS = ("min_duration_s", "max_duration_s", "max_tokens_per_second")

# A drop: (reason, detail). A detail (not None) means the sample is listed with its id, not only counted:
# the audio problems of raw data, which labelling lists in skipped.jsonl too.
Drop = tuple[str, str | None]


def is_uppercase_hallucination(transcript: str | None) -> bool:
    """A transcript whose letters are all upper-case: a known failure of Whisper large-v3 (the reference drops it).

    Unlike the reference (`t.upper() == t`), a transcript with no letters at all ("123", "") is not caught here."""
    return bool(transcript) and transcript.isupper()


def drop_reason(
    pl_wer: float | None,
    duration: float | None,
    n_label_tokens: int | None,
    *,
    transcript: str | None = None,
    truncated: bool = False,
    wer_threshold: float | None = None,
    wer_inclusive: bool = False,
    drop_uppercase: bool = False,
    drop_truncated: bool = False,
    min_duration_s: float | None = None,
    max_duration_s: float | None = None,
    max_label_length: int | None = WHISPER_MAX_LABEL_LENGTH,
    max_compression_ratio: float | None = None,
    max_tokens_per_second: float | None = None,
) -> str | None:
    """Why a training sample is dropped (one of `DROP_REASONS`), or None to keep it.

    WER filter (the reference's rule): keep iff `pl_wer < wer_threshold` (percent), or `<=` with
    `wer_inclusive`. A sample without a `pl_wer` (its reference normalises to empty: "Mm-hmm.", "(laughs)")
    cannot be judged and is dropped as `no_reference`; a dataset with no reference column at all is refused
    before this (SpeechDataModule). `transcript` is the pseudo-label's plain text (`drop_uppercase`);
    `truncated` means the label ends without `<|endoftext|>` (`drop_truncated`).
    Hallucination signals that need no reference (audio-only data): the transcript's compression ratio above
    `max_compression_ratio` (a loop: OpenAI's threshold is 2.4) and more than `max_tokens_per_second` label
    tokens per second of audio (nobody speaks that fast; loops and made-up text do).
    Label length counts the label ids (prefix included, prompt excluded); Whisper's decoder has
    `max_label_length` positions and `decoder_input_ids = ids[:-1]`, so up to `max_label_length + 1` ids fit.
    """
    if drop_uppercase and is_uppercase_hallucination(transcript):
        return "uppercase"
    if wer_threshold is not None:
        if pl_wer is None or (isinstance(pl_wer, float) and math.isnan(pl_wer)):
            return "no_reference"
        if pl_wer > wer_threshold or (pl_wer == wer_threshold and not wer_inclusive):
            return "wer"
    if duration is not None:
        if min_duration_s is not None and duration < min_duration_s:
            return "too_short"
        if max_duration_s is not None and duration > max_duration_s:
            return "too_long"
    if drop_truncated and truncated:
        return "truncated"
    if max_compression_ratio is not None and compression_ratio(transcript or "") > max_compression_ratio:
        return "compression_ratio"
    if max_tokens_per_second is not None and n_label_tokens is not None and duration:
        if n_label_tokens / duration > max_tokens_per_second:
            return "tokens_per_second"
    if max_label_length is not None and n_label_tokens is not None and n_label_tokens > max_label_length + 1:
        return "label_too_long"
    return None


@dataclass
class FilterStats:
    """Kept and dropped counts of one training source, by reason."""

    source: str
    total: int = 0
    dropped: Counter = field(default_factory=Counter)
    skipped: list[dict] = field(default_factory=list)  # the listed drops: {id, reason, detail}

    @property
    def kept(self) -> int:
        return self.total - sum(self.dropped.values())

    def add(self, drop: Drop | None, sample_id: str | None = None) -> None:
        self.total += 1
        if drop is not None:
            reason, detail = drop
            self.dropped[reason] += 1
            if detail is not None:
                self.skipped.append(
                    {"source": self.source, "id": sample_id, "reason": reason, "detail": detail}
                )

    def merge(self, other: FilterStats) -> None:
        """Add another process's counts of the same source (streamed counting is split across ranks)."""
        self.total += other.total
        self.dropped.update(other.dropped)
        self.skipped += other.skipped

    def summary(self) -> str:
        parts = ", ".join(f"{k}: {v}" for k, v in sorted(self.dropped.items())) or "none"
        listed = f"; {len(self.skipped)} listed by id in data_filter.json" if self.skipped else ""
        return f"{self.source}: kept {self.kept}/{self.total} (dropped {parts}{listed})"

    def as_dict(self) -> dict:
        return {
            "source": self.source,
            "total": self.total,
            "kept": self.kept,
            "dropped": dict(self.dropped),
            "skipped": self.skipped,
        }
