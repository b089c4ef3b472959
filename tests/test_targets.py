"""Decoder target building: timestamps, prompts, masking, truncation, per-epoch draws, collation."""

from __future__ import annotations

import random

import pytest
import torch

from distil.data.targets import (
    IGNORE_INDEX,
    SpecialTokens,
    Targets,
    build_targets,
    collate_labels,
    sample_rng,
    strip_timestamps,
)

pytestmark = pytest.mark.unit  # no model, no audio synthesis: `make test-unit`

# Fake vocabulary laid out like Whisper's: text ids < eot, specials from eot up, timestamps last.
EOT, SOT, EN, TRANSCRIBE, TRANSLATE, SOP, NOTS = 100, 101, 102, 103, 104, 105, 106
TS0 = 107  # <|0.00|>
SP = SpecialTokens(
    sot=SOT, eot=EOT, startofprev=SOP, notimestamps=NOTS, timestamp_begin=TS0,
    prefix_ids=frozenset({EN, TRANSCRIBE, TRANSLATE}),
)  # fmt: skip

TIMESTAMPED = [SOT, EN, TRANSCRIBE, TS0, 1, 2, TS0 + 50, TS0 + 60, 3, TS0 + 90, EOT]
PLAIN = [SOT, EN, TRANSCRIBE, NOTS, 1, 2, 3, EOT]


def always(p_ts=0.0, p_prev=0.0, **kw):
    """build_targets with a fresh generator (probabilities 0/1 make the draws irrelevant)."""

    def run(label, prompt=None):
        return build_targets(
            label, SP, random.Random(0), prompt_ids=prompt,
            timestamp_probability=p_ts, condition_on_prev_probability=p_prev, **kw,
        )  # fmt: skip

    return run


def test_timestamps_kept():
    t = always(p_ts=1.0)(TIMESTAMPED)
    assert t.decoder_input_ids == TIMESTAMPED[:-1]
    assert t.labels == TIMESTAMPED[1:]
    assert t.with_timestamps and not t.with_prompt and not t.truncated


def test_timestamps_stripped_and_notimestamps_inserted():
    t = always(p_ts=0.0)(TIMESTAMPED)
    assert t.decoder_input_ids == [SOT, EN, TRANSCRIBE, NOTS, 1, 2, 3]
    assert t.labels == [EN, TRANSCRIBE, NOTS, 1, 2, 3, EOT]
    assert not t.with_timestamps


def test_label_without_timestamps_stays_notimestamps():
    for p in (0.0, 1.0):
        t = always(p_ts=p)(PLAIN)
        assert t.decoder_input_ids + [t.labels[-1]] == PLAIN
        assert not t.with_timestamps
    # English-only labels have no language/task tokens.
    en_only = [SOT, TS0, 7, 8, TS0 + 20, EOT]
    assert strip_timestamps(en_only, SP) == [SOT, NOTS, 7, 8, EOT]


def test_prompt_prepended_and_masked():
    t = always(p_prev=1.0)(PLAIN, prompt=[5, 6, 7])
    assert t.decoder_input_ids == [SOP, 5, 6, 7, SOT, EN, TRANSCRIBE, NOTS, 1, 2, 3]
    # Masked: the prompt's own tokens and <|startoftranscript|>; trained: everything after SOT.
    assert t.labels == [IGNORE_INDEX] * 4 + [EN, TRANSCRIBE, NOTS, 1, 2, 3, EOT]
    assert t.with_prompt


def test_prompt_is_never_doubled_and_loses_specials():
    stored = [SOP, 5, 6, TS0 + 3, 7, EOT]
    t = always(p_prev=1.0)(PLAIN, prompt=stored)
    assert t.decoder_input_ids[:5] == [SOP, 5, 6, 7, SOT]
    # A label that embeds its prompt is split, not prompted twice.
    t2 = always(p_prev=1.0)([SOP, 5, 6, 7] + PLAIN)
    assert t2.decoder_input_ids == t.decoder_input_ids and t2.labels == t.labels
    t3 = always(p_prev=0.0)([SOP, 5, 6, 7] + PLAIN)
    assert t3.decoder_input_ids == PLAIN[:-1] and t3.labels == PLAIN[1:]


def test_no_prompt_when_probability_zero_or_prompt_empty():
    assert always(p_prev=0.0)(PLAIN, prompt=[5, 6]).decoder_input_ids == PLAIN[:-1]
    for empty in (None, [], [SOP], [EOT]):
        t = always(p_prev=1.0)(PLAIN, prompt=empty)
        assert t.decoder_input_ids == PLAIN[:-1] and not t.with_prompt


def test_prompt_capped_at_half_the_budget_keeping_its_end():
    prompt = list(range(1, 31))
    t = always(p_prev=1.0, max_label_length=20)(PLAIN, prompt=prompt)
    # 20 // 2 = 10 tokens of prompt in all: <|startofprev|> + the last 9 prompt tokens.
    assert t.decoder_input_ids[:11] == [SOP, *range(22, 31), SOT]
    assert t.decoder_input_ids[11:] == PLAIN[1:-1]
    assert t.labels == [IGNORE_INDEX] * 10 + PLAIN[1:]


def test_prompt_yields_room_to_the_transcript():
    label = [SOT, EN, TRANSCRIBE, NOTS] + list(range(1, 9)) + [EOT]  # 13 tokens
    t = always(p_prev=1.0, max_label_length=14)(label, prompt=list(range(20, 40)))
    # Budget 15 ids: 13 for the label, 2 for <|startofprev|> + one prompt token.
    assert t.decoder_input_ids[:3] == [SOP, 39, SOT]
    assert t.labels[-1] == EOT and not t.truncated and len(t.labels) == 14
    t = always(p_prev=1.0, max_label_length=12)(label, prompt=list(range(20, 40)))
    assert SOP not in t.decoder_input_ids  # no room left: no prompt rather than a cut transcript


def test_long_transcript_truncated_at_the_tail():
    label = [SOT, EN, TRANSCRIBE, NOTS] + list(range(1, 50)) + [EOT]
    t = always(max_label_length=20)(label)
    assert t.truncated
    assert len(t.decoder_input_ids) == len(t.labels) == 20
    assert t.decoder_input_ids[:4] == [SOT, EN, TRANSCRIBE, NOTS]
    assert EOT not in t.labels
    assert not always(max_label_length=len(label) - 1)(label).truncated


def test_label_must_start_with_startoftranscript():
    with pytest.raises(ValueError, match="startoftranscript"):
        always()([1, 2, EOT])
    with pytest.raises(ValueError, match="startoftranscript"):
        always(p_ts=1.0)([TS0, 1, 2, EOT])


def test_draws_reproducible_per_seed_epoch_and_sample():
    def decisions(seed, epoch, n=400):
        out = []
        for i in range(n):
            t = build_targets(
                TIMESTAMPED, SP, sample_rng(seed, epoch, f"utt{i}"), prompt_ids=[5, 6],
                timestamp_probability=0.5, condition_on_prev_probability=0.3,
            )  # fmt: skip
            out.append((t.with_timestamps, t.with_prompt))
        return out

    a = decisions(seed=1, epoch=0)
    assert decisions(seed=1, epoch=0) == a
    assert decisions(seed=1, epoch=1) != a
    assert decisions(seed=2, epoch=0) != a
    assert 0.4 < sum(ts for ts, _ in a) / len(a) < 0.6
    assert 0.2 < sum(p for _, p in a) / len(a) < 0.4
    assert sample_rng(0, 0, 7).random() == sample_rng(0, 0, "7").random()  # ids as str or int


def test_one_probability_does_not_shift_the_other_draw():
    def ts_decisions(p_prev):
        return [
            build_targets(
                TIMESTAMPED, SP, sample_rng(3, 0, i), prompt_ids=[5],
                timestamp_probability=0.5, condition_on_prev_probability=p_prev,
            ).with_timestamps
            for i in range(100)
        ]  # fmt: skip

    assert ts_decisions(0.0) == ts_decisions(1.0)


def test_collate_pads_to_the_longest_in_the_batch():
    a = always()(PLAIN)  # 7 tokens
    b = always(p_prev=1.0)(PLAIN, prompt=[5, 6])  # 10 tokens
    out = collate_labels([a, (b.decoder_input_ids, b.labels)], pad_id=EOT)
    assert out["decoder_input_ids"].shape == out["labels"].shape == (2, 10)
    assert out["decoder_input_ids"][0].tolist() == a.decoder_input_ids + [EOT] * 3
    assert out["labels"][0].tolist() == a.labels + [IGNORE_INDEX] * 3
    assert out["labels"][1].tolist() == b.labels
    assert out["decoder_attention_mask"].tolist() == [[1] * 7 + [0] * 3, [1] * 10]
    assert out["labels"].dtype == torch.long
    with pytest.raises(ValueError, match="empty"):
        collate_labels([], pad_id=EOT)
    with pytest.raises(ValueError, match="differ"):
        collate_labels([Targets([1, 2], [2])], pad_id=EOT)


def test_special_tokens_from_a_real_tokenizer(tokenizer):
    sp = SpecialTokens.from_tokenizer(tokenizer)
    ids = tokenizer.convert_tokens_to_ids
    assert sp.sot == ids("<|startoftranscript|>") and sp.eot == ids("<|endoftext|>")
    assert sp.startofprev == ids("<|startofprev|>") and sp.notimestamps == ids("<|notimestamps|>")
    assert sp.timestamp_begin == sp.notimestamps + 1
    assert {ids("<|en|>"), ids("<|transcribe|>"), ids("<|translate|>")} <= sp.prefix_ids
    assert not {sp.sot, sp.eot, sp.startofprev, sp.notimestamps} & sp.prefix_ids
    # Every special token sits at or above <|endoftext|>: the rule is_text relies on.
    assert all(not sp.is_text(i) for i in tokenizer.get_added_vocab().values())

    text = tokenizer(" hello world", add_special_tokens=False).input_ids
    label = [sp.sot, ids("<|en|>"), ids("<|transcribe|>"), sp.notimestamps, *text, sp.eot]
    t = build_targets(label, sp, random.Random(0), prompt_ids=text, condition_on_prev_probability=1.0)
    assert t.decoder_input_ids[: len(text) + 2] == [sp.startofprev, *text, sp.sot]
    assert tokenizer.decode([i for i in t.labels if i != IGNORE_INDEX], skip_special_tokens=True).strip() == (
        "hello world"
    )


def test_from_tokenizer_rejects_non_whisper_tokenizers():
    class Fake:
        unk_token, unk_token_id = "<unk>", 0

        def convert_tokens_to_ids(self, token):
            return 0

        def get_added_vocab(self):
            return {}

    with pytest.raises(ValueError, match="Whisper"):
        SpecialTokens.from_tokenizer(Fake())
