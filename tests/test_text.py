"""Normalisers and WER on hand-checked cases."""

import pytest

from distil.data.text import (
    basic_normalizer,
    corpus_cer,
    corpus_wer,
    english_normalizer,
    get_normalizer,
    sample_wer,
)

pytestmark = pytest.mark.unit  # no model, no audio synthesis: `make test-unit`


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Mr. Smith paid $20 million.", "mister smith paid $20000000"),
        ("It's the colour of 1960s cars!", "it is the color of 1960s cars"),
        ("Dr. Jones arrived at 3:30 p.m. on the 21st.", "doctor jones arrived at 3 30 p m on the 21st"),
        ("Twenty five percent", "25%"),
        ("um, hello [music] there", "hello there"),
        ("One hundred and one dalmatians", "101 dalmatians"),
    ],
)
def test_english_normalizer(text, expected):
    assert english_normalizer()(text) == expected


def test_basic_normalizer_keeps_letters_drops_punctuation_and_brackets():
    assert basic_normalizer()("Héllo, Wörld! (aside) ok") == "héllo wörld ok"


def test_normalizer_choice_by_language():
    assert get_normalizer("en") is english_normalizer()
    assert get_normalizer(None) is english_normalizer()
    assert get_normalizer("de") is basic_normalizer()


def test_corpus_wer_counts_edits_over_reference_words():
    # ref words: 4 + 3 + 2 = 9; edits: 1 substitution (world->word), 1 deletion (the), 1 insertion (sir)
    result = corpus_wer(
        ["hello world how are", "see the cat", "good day"],
        ["hello word how are", "see cat", "good day sir"],
    )
    assert (result.substitutions, result.deletions, result.insertions) == (1, 1, 1)
    assert result.reference_words == 9
    assert result.wer == pytest.approx(100 * 3 / 9)
    assert result.insertion_rate == pytest.approx(100 / 9)


def test_empty_normalised_references_are_skipped_and_counted():
    # "[music]" and "um" normalise to nothing: those samples are skipped, not scored as 0 or 100.
    result = corpus_wer(
        ["[music]", "um", "good morning"], ["anything", "", "good morning"], english_normalizer()
    )
    assert result.scored == 1
    assert result.skipped_empty_reference == 2
    assert result.wer == 0.0


def test_nothing_scorable_gives_none():
    result = corpus_wer(["", "uh"], ["a", "b"], english_normalizer())
    assert result.wer is None and result.skipped_empty_reference == 2


def test_normalised_wer_ignores_case_punctuation_and_spelling():
    assert sample_wer("Mr. Smith's colour is 20%.", "mister smith's color is twenty percent") == 0.0
    assert sample_wer(None, "anything") is None


def test_empty_prediction_is_all_deletions():
    assert corpus_wer(["one two three"], [""]).wer == 100.0


def test_cer():
    assert corpus_cer(["abcd"], ["abxd"]) == pytest.approx(25.0)
