"""Loop guards: the settings are checked before any model loads; a looping decode is decoded again at each
temperature (transformers' own fallback), cut at the token limit per second of audio, and counted."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from distil.data.text import identity
from distil.evaluation.scoring import decoding_counts
from distil.utils.errors import ConfigError
from distil.whisper.generation import Guards, Transcript, generation_kwargs, transcribe
from distil.whisper.loading import load_model

SR = 16_000


@pytest.mark.unit
def test_guards_settings_are_checked_by_key():
    assert Guards.from_config(None, "eval.guards") is None  # plain decoding
    guards = Guards.from_config({"temperature": [0, 0.5], "max_tokens_per_second": 4}, "eval.guards")
    assert guards.temperature == (0.0, 0.5) and guards.compression_ratio_threshold == 1.35
    assert guards.token_limit(10.0, 128) == 40 and guards.token_limit(0.2, 128) == 4  # at least one second
    assert guards.token_limit(60.0, 128) == 128
    assert Guards.from_config({"max_tokens_per_second": None}, "k").token_limit(1.0, 128) == 128
    assert Guards().generate_kwargs() == {
        "temperature": (0.0, 0.2, 0.4, 0.6, 0.8, 1.0),
        "compression_ratio_threshold": 1.35,
        "logprob_threshold": -1.0,
        "no_speech_threshold": 0.6,
    }
    for bad, named in [
        ({"temperature": []}, "eval.guards.temperature"),
        ({"temperature": [0.0, -0.2]}, "eval.guards.temperature"),
        ({"compression_ratio_threshold": -1}, "eval.guards.compression_ratio_threshold"),
        ({"logprob_threshold": 0.5}, "eval.guards.logprob_threshold"),
        ({"no_speech_threshold": 1.5}, "eval.guards.no_speech_threshold"),
        ({"max_tokens_per_second": 0}, "eval.guards.max_tokens_per_second"),
        ({"max_token_per_second": 5}, "eval.guards has unknown key"),
    ]:
        with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
            Guards.from_config(bad, "eval.guards")


@pytest.mark.unit
def test_decoding_counts_name_cut_empty_and_repeating_outputs():
    transcripts = [
        Transcript("one two three four five one two three four five", 10, 10),  # cut, and repeating
        Transcript("", 0, 10),
        Transcript("a short answer", 3, 10),
    ]
    assert decoding_counts(transcripts, identity) == {
        "hit_token_limit": 1,
        "empty_outputs": 1,
        "repeated_5grams": 1,
    }


class ForceToken(LogitsProcessor):
    """Only `token` can come next: a decode that loops at every temperature. Counts the decodes it sees start."""

    def __init__(self, token: int, prompt_length: int):
        self.token, self.prompt_length, self.decodes = token, prompt_length, 0

    def __call__(self, input_ids, scores):
        if input_ids.shape[-1] == self.prompt_length:
            self.decodes += 1
        forced = torch.full_like(scores, -1e9)
        forced[:, self.token] = 0
        return forced


def test_a_looping_decode_falls_back_through_every_temperature_and_is_cut_per_second(tiny_random_dir):
    whisper = load_model({"path": str(tiny_random_dir)}, "cpu", "auto")
    wave = np.random.default_rng(0).normal(0, 0.1, 3 * SR).astype(np.float32)
    gen = generation_kwargs(whisper.model, "en", None, 128)
    prompt_length = (
        len(whisper.processor.tokenizer("", add_special_tokens=True).input_ids) - 1
    )  # less the eot

    loop = ForceToken(1000, prompt_length)
    gen_loop = {**gen, "logits_processor": LogitsProcessorList([loop])}
    (guarded,) = transcribe(whisper.model, whisper.processor, [wave], 1, gen_loop, Guards())
    assert loop.decodes == len(Guards().temperature)  # the loop failed the compression-ratio check each time
    assert guarded.limit == 30 and guarded.tokens == 30 and guarded.hit_limit  # 10 tokens/s x 3 s

    # in one batch, each clip is cut at its own limit (the batch generates up to the longest clip's)
    short = wave[: SR // 2]
    gen_loop = {**gen, "logits_processor": LogitsProcessorList([ForceToken(1000, prompt_length)])}
    cut = transcribe(whisper.model, whisper.processor, [short, wave], 2, gen_loop, Guards())
    assert [(t.tokens, t.limit, t.hit_limit) for t in cut] == [(10, 10, True), (30, 30, True)]
    assert len(cut[0].text) < len(cut[1].text)

    loop = ForceToken(1000, prompt_length)
    gen_loop = {**gen, "logits_processor": LogitsProcessorList([loop])}
    (plain,) = transcribe(whisper.model, whisper.processor, [wave], 1, gen_loop, None)
    assert loop.decodes == 1 and plain.limit == 128 and plain.tokens == 128 and plain.hit_limit
    assert decoding_counts([guarded, plain], identity)["hit_token_limit"] == 2
