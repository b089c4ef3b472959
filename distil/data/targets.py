"""Decoder targets for training: timestamp and previous-context augmentation, shift, mask, collate.

A stored label is the tokenizer's id list with its special prefix:
`<|startoftranscript|> [<|lang|>] [<|task|>] (<|notimestamps|> | <|t0|>) text ... <|endoftext|>`.
Per sample and per epoch (`sample_rng`), training draws whether to keep the timestamps
(`timestamp_probability`) and whether to prepend the previous-context prompt
(`condition_on_prev_probability`): `<|startofprev|> prompt ... <|startoftranscript|> ...`.
Then `decoder_input_ids = ids[:-1]`, `labels = ids[1:]`, with the loss masked (-100) on the prompt
and on the position that predicts `<|startoftranscript|>` (the model is never asked to produce them).

Everything here is pure integer-list maths on ids from a `SpecialTokens`, built from the real
tokenizer (`.en` and multilingual vocabularies put the special tokens at different ids).
Whisper keeps every special token at ids >= `<|endoftext|>`, with the timestamps
`<|0.00|>`, `<|0.02|>`, ... last, starting right after `<|notimestamps|>`.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from distil.utils.errors import ConfigError

IGNORE_INDEX = -100
WHISPER_MAX_LABEL_LENGTH = 448

_NAMED = {
    "eot": "<|endoftext|>",
    "sot": "<|startoftranscript|>",
    "startofprev": "<|startofprev|>",
    "notimestamps": "<|notimestamps|>",
}
# Special tokens that are never part of the sot/lang/task prefix.
_NOT_PREFIX = {"<|startoflm|>", "<|nocaptions|>", "<|nospeech|>", "<|startofprev|>", "<|notimestamps|>"}
_TIMESTAMP = re.compile(r"^<\|\d+\.\d+\|>$")


@dataclass(frozen=True)
class SpecialTokens:
    """The special token ids target building needs.

    `prefix_ids`: tokens that may follow `<|startoftranscript|>` before the timestamp mode
    (language and task tokens). `timestamp_begin`: id of `<|0.00|>`; every id from it up is a timestamp.
    """

    sot: int
    eot: int
    startofprev: int
    notimestamps: int
    timestamp_begin: int
    prefix_ids: frozenset[int] = field(default_factory=frozenset)

    @classmethod
    def from_tokenizer(cls, tokenizer) -> SpecialTokens:
        """Read the ids from a (Whisper) tokenizer; raises naming the token if one is missing."""
        ids = {}
        for name, token in _NAMED.items():
            idx = tokenizer.convert_tokens_to_ids(token)
            if idx is None or idx == tokenizer.unk_token_id and token != tokenizer.unk_token:
                raise ConfigError(f"tokenizer has no {token} token; is it a Whisper tokenizer?")
            ids[name] = int(idx)
        prefix = {
            int(idx)
            for token, idx in tokenizer.get_added_vocab().items()
            if token.startswith("<|")
            and token.endswith("|>")
            and token not in _NOT_PREFIX
            and token not in _NAMED.values()
            and not _TIMESTAMP.match(token)
        }
        # As in transformers' Whisper generation: timestamps start right after <|notimestamps|>
        # (some tokenizer files do not list the timestamp tokens at all).
        return cls(**ids, timestamp_begin=ids["notimestamps"] + 1, prefix_ids=frozenset(prefix))

    def is_timestamp(self, idx: int) -> bool:
        return idx >= self.timestamp_begin

    def is_text(self, idx: int) -> bool:
        return idx < self.eot


@dataclass(frozen=True)
class Targets:
    """One training sample's decoder side. `truncated`: the transcript had to be cut to fit."""

    decoder_input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    with_timestamps: bool = False
    with_prompt: bool = False


def sample_rng(seed: int, epoch: int, sample_id: str | int) -> random.Random:
    """A generator for one sample in one epoch: reproducible, different across epochs and samples.

    Seeded from a hash (not Python's salted `hash()`), so draws are identical across processes and
    workers, whatever order the samples arrive in.
    """
    digest = hashlib.blake2b(f"{seed}\x1f{epoch}\x1f{sample_id}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


def split_prefix(ids: Sequence[int], special: SpecialTokens) -> tuple[list[int], list[int]]:
    """`(prefix, rest)`: prefix = `<|startoftranscript|>` plus the language/task tokens after it."""
    ids = list(ids)
    if not ids or ids[0] != special.sot:
        raise ValueError(
            f"label ids must start with <|startoftranscript|> (id {special.sot}), got {ids[:4]}...; "
            "store labels as the tokenizer's ids with their special prefix"
        )
    end = 1
    while end < len(ids) and ids[end] in special.prefix_ids:
        end += 1
    return ids[:end], ids[end:]


def has_timestamps(ids: Sequence[int], special: SpecialTokens) -> bool:
    return any(special.is_timestamp(i) for i in ids)


def strip_timestamps(ids: Sequence[int], special: SpecialTokens) -> list[int]:
    """The label without timestamps: timestamp tokens removed, `<|notimestamps|>` after the prefix."""
    prefix, rest = split_prefix(ids, special)
    body = [i for i in rest if not special.is_timestamp(i) and i != special.notimestamps]
    return prefix + [special.notimestamps] + body


def clean_prompt(prompt_ids: Sequence[int] | None, special: SpecialTokens) -> list[int]:
    """Text tokens of a stored previous-context prompt (without `<|startofprev|>` or other specials).

    A stored prompt may already start with `<|startofprev|>`, or carry timestamps from a timestamped
    pseudo-label; only its text is kept so `build_targets` adds exactly one `<|startofprev|>`.
    """
    if not prompt_ids:
        return []
    return [int(i) for i in prompt_ids if special.is_text(int(i))]


def build_targets(
    label_ids: Sequence[int],
    special: SpecialTokens,
    rng: random.Random,
    *,
    prompt_ids: Sequence[int] | None = None,
    timestamp_probability: float = 0.0,
    condition_on_prev_probability: float = 0.0,
    max_label_length: int = WHISPER_MAX_LABEL_LENGTH,
) -> Targets:
    """Decoder inputs and labels for one sample, with this epoch's random augmentation.

    - Timestamps are kept with probability `timestamp_probability` (if the label has any); otherwise
      they are stripped and `<|notimestamps|>` follows the prefix.
    - With probability `condition_on_prev_probability` (and a non-empty prompt), the sequence starts
      with `<|startofprev|>` + the END of the prompt, at most `max_label_length // 2` tokens in all.
      A label that already embeds a prompt (`<|startofprev|> ... <|startoftranscript|> ...`) is split
      first, so the prompt is never doubled.
    - Truncation: `decoder_input_ids`/`labels` are at most `max_label_length` long (Whisper's decoder
      has 448 positions). The transcript has priority: the prompt shrinks to make room for it (down
      to nothing); a transcript alone longer than the budget keeps its start and loses its tail
      (`truncated=True`, so callers can count or drop such samples).
    Both random draws are always made, so changing one probability does not shift the other's draws.
    """
    if max_label_length < 2:
        raise ConfigError(f"max_label_length must be at least 2, got {max_label_length}")
    ids = [int(i) for i in label_ids]
    if ids and ids[0] == special.startofprev:
        if special.sot not in ids:
            raise ValueError("label starts with <|startofprev|> but has no <|startoftranscript|>")
        cut = ids.index(special.sot)
        if prompt_ids is None:
            prompt_ids = ids[:cut]
        ids = ids[cut:]
    keep_timestamps = rng.random() < timestamp_probability
    use_prompt = rng.random() < condition_on_prev_probability

    with_timestamps = keep_timestamps and has_timestamps(ids, special)
    if not with_timestamps:
        ids = strip_timestamps(ids, special)
    else:
        split_prefix(ids, special)  # validates the start

    # ids (prompt + label) may hold max_label_length + 1 tokens: the shift drops one from each side.
    budget = max_label_length + 1
    truncated = len(ids) > budget
    if truncated:
        ids = ids[:budget]

    prompt: list[int] = []
    if use_prompt:
        text = clean_prompt(prompt_ids, special)
        room = min(max_label_length // 2, budget - len(ids))  # including <|startofprev|>
        if text and room >= 2:
            prompt = [special.startofprev] + text[-(room - 1) :]

    full = prompt + ids
    decoder_input_ids = full[:-1]
    labels = full[1:]
    # labels[j] is full[j + 1]: the first len(prompt) labels are the rest of the prompt and the
    # <|startoftranscript|> that ends it; none of those is the model's to predict.
    if prompt:
        labels[: len(prompt)] = [IGNORE_INDEX] * len(prompt)
    return Targets(decoder_input_ids, labels, truncated, with_timestamps, bool(prompt))


def collate_labels(
    batch: Sequence[Targets | tuple[Sequence[int], Sequence[int]]], pad_id: int
) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sample in the batch (not to 448): labels with -100, inputs with `pad_id`.

    Returns `decoder_input_ids`, `labels` (int64) and `decoder_attention_mask` (1 on real tokens).
    """
    if not batch:
        raise ValueError("collate_labels got an empty batch")
    pairs = [(t.decoder_input_ids, t.labels) if isinstance(t, Targets) else t for t in batch]
    for inputs, labels in pairs:
        if len(inputs) != len(labels):
            raise ValueError(f"decoder_input_ids ({len(inputs)}) and labels ({len(labels)}) differ in length")
    longest = max(len(inputs) for inputs, _ in pairs)
    n = len(pairs)
    decoder_input_ids = torch.full((n, longest), pad_id, dtype=torch.long)
    labels = torch.full((n, longest), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((n, longest), dtype=torch.long)
    for row, (inputs, labs) in enumerate(pairs):
        k = len(inputs)
        decoder_input_ids[row, :k] = torch.as_tensor(list(inputs), dtype=torch.long)
        labels[row, :k] = torch.as_tensor(list(labs), dtype=torch.long)
        mask[row, :k] = 1
    return {"decoder_input_ids": decoder_input_ids, "labels": labels, "decoder_attention_mask": mask}
