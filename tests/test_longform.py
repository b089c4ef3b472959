"""Long-form transcription: the chunk merge on constructed overlaps, the metrics, both algorithms on tiny.en."""

from __future__ import annotations

import numpy as np
import pytest

from distil.data.text import english_normalizer
from distil.evaluation.longform import (
    SequentialOptions,
    chunk_bounds,
    default_stride,
    longform_metrics,
    merge_chunk_texts,
    merge_chunk_tokens,
    repeated_ngrams,
    transcribe_chunked,
    transcribe_sequential,
)


def chunks_of(seq, size, overlap):
    """Overlapping windows of `seq`, like the transcripts of overlapping audio chunks."""
    step = size - overlap
    out = []
    for start in range(0, len(seq), step):
        out.append(list(seq[start : start + size]))
        if start + size >= len(seq):
            break
    return out


@pytest.mark.parametrize("size, overlap", [(12, 4), (20, 6), (30, 10), (9, 2)])
def test_merge_restores_the_sequence_exactly(size, overlap):
    words = list(range(100, 187))  # 87 distinct "tokens"
    merged = merge_chunk_tokens(chunks_of(words, size, overlap))
    assert merged == words  # nothing doubled, nothing lost, order kept


def test_merge_resolves_disagreements_inside_the_overlap():
    # The two chunks heard the overlap differently at its edges (where each has less context);
    # the merge keeps the left chunk's first half and the right chunk's second half of the overlap.
    left = [1, 2, 3, 4, 5, 6, 7, 8, 99]  # last token garbled (cut mid-word at the chunk edge)
    right = [98, 5, 6, 7, 8, 9, 10, 11]  # first token garbled
    merged = merge_chunk_tokens([left, right])
    assert merged == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]


def test_merge_without_agreement_concatenates_and_edge_cases():
    assert merge_chunk_tokens([[1, 2, 3], [7, 8, 9]]) == [1, 2, 3, 7, 8, 9]
    assert merge_chunk_tokens([]) == []
    assert merge_chunk_tokens([[4, 5]]) == [4, 5]


def test_merge_chunk_texts_words_neither_doubled_nor_lost():
    text = (
        "the lighthouse keeper painted the railings green while our train left platform nine "
        "at a quarter past seven and martha planted tomatoes behind the old barn"
    )
    words = text.split()
    chunks = [" ".join(c) for c in chunks_of(words, 10, 4)]
    merged = merge_chunk_texts(chunks)
    assert merged == text
    assert len(chunks) > 3


def test_chunk_bounds_cover_the_audio_with_the_configured_overlap():
    sr = 16_000
    n = 61 * sr
    bounds = chunk_bounds(n, 15, None, sr)
    stride = int(default_stride(15) * sr)
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    for (s0, e0), (s1, _) in zip(bounds, bounds[1:], strict=False):
        assert e0 - s1 == 2 * stride  # neighbours share stride_left + stride_right samples
        assert s1 > s0
    with pytest.raises(ValueError, match="twice stride"):
        chunk_bounds(n, 10, 5, sr)


def test_repeated_ngrams_counts_loops_only():
    assert repeated_ngrams("one two three four five six seven") == 0
    assert repeated_ngrams("a b c d e a b c d e") == 1
    loop = " ".join(["thank you for watching"] * 6)
    assert repeated_ngrams(loop) == len(loop.split()) - 4 - 4  # all but the first 4 distinct 5-grams
    assert repeated_ngrams("") == 0


def test_longform_metrics_rates_add_up():
    refs = ["the cat sat on the mat today", "a b c d e f g"]
    hyps = ["the cat sat sat on a mat", "a b c d e f g a b c d e"]
    m = longform_metrics(refs, hyps, english_normalizer())
    assert m["wer"] == pytest.approx(m["insertion_rate"] + m["deletion_rate"] + m["substitution_rate"])
    assert m["insertions"] > 0 and m["substitutions"] > 0
    assert m["repeated_5grams"] == 1
    assert m["recordings"] == 2


def test_chunked_rejects_windows_longer_than_whisper(tiny_random_dir):
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    model = WhisperForConditionalGeneration.from_pretrained(tiny_random_dir)
    processor = WhisperProcessor.from_pretrained(tiny_random_dir)
    with pytest.raises(ValueError, match="exceeds"):
        transcribe_chunked(model, processor, [np.zeros(16_000, np.float32)], chunk_length_s=40)


@pytest.fixture(scope="module")
def long_recording(tts_clips):
    """~55 s: the TTS clips back to back, pauses stretched to reach the length, and the reference text.

    No sentence repeats: the chunk merge aligns overlaps by content, and a recording that repeats
    itself at about the chunk period can be aligned at the wrong repetition.
    """
    speech = sum(len(c["audio"]) for c in tts_clips)
    pause = np.zeros(max(4_800, (55 * 16_000 - speech) // len(tts_clips)), np.float32)
    wave = np.concatenate([part for c in tts_clips for part in (c["audio"], pause)])
    return wave, " ".join(c["text"] for c in tts_clips)


@pytest.mark.slow  # minutes on 2 shared CPU cores
def test_tiny_en_long_form_both_algorithms(tiny_en_dir, long_recording):
    """A real model on a real ~1 min recording: both algorithms transcribe all of it."""
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    torch.manual_seed(0)
    model = WhisperForConditionalGeneration.from_pretrained(tiny_en_dir).eval()
    processor = WhisperProcessor.from_pretrained(tiny_en_dir)
    wave, reference = long_recording
    assert len(wave) / 16_000 > 45
    chunked = transcribe_chunked(model, processor, [wave], chunk_length_s=30, batch_size=4)
    sequential = transcribe_sequential(model, processor, [wave], SequentialOptions(temperature=(0.0, 0.4)))
    norm = english_normalizer()
    n_ref = len(norm(reference).split())
    for name, text in (("chunked", chunked[0]), ("sequential", sequential[0])):
        m = longform_metrics([reference], [text], norm)
        print(name, f"WER {m['wer']:.1f}", m["deletion_rate"], m["insertion_rate"], text[:200])
        # Each algorithm must cover the whole recording: no lost chunk/window, no doubled overlap.
        assert 0.8 * n_ref <= len(norm(text).split()) <= 1.2 * n_ref, name
        assert m["wer"] < 40, name
        assert m["deletion_rate"] < 15 and m["insertion_rate"] < 15, name
