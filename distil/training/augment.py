"""Training-time augmentation (issue 35): SpecAugment on the log-mel input and BPE dropout on the labels.

SpecAugment (`augment.specaugment`): time and mel-bin masks drawn by transformers' own
`_compute_mask_indices` (the function Whisper's encoder uses with `config.apply_spec_augment`), with the same
keys and meanings as `WhisperConfig` (`mask_time_prob`, `mask_time_length`, `mask_time_min_masks`,
`mask_feature_prob`, `mask_feature_length`, `mask_feature_min_masks`), masked positions set to 0 as Whisper
does. Whisper masks inside its encoder only in training mode, and distil's teacher (and frozen encoder) run in
eval mode, so `WhisperDistiller.training_step` masks the features itself, once per batch, and gives the SAME
tensor to the student and the teacher (`consistent=false`: the teacher gets the clean features, the ablation).
The masks are a pure function of (run seed, global step, batch index) (`specaugment_seed`), so a resumed run
draws the masks the uninterrupted run would have drawn.

BPE dropout (`augment.bpe_dropout`): `BPEDropout` re-tokenizes each text span of a label (the runs of ordinary
tokens between special tokens; the prefix, timestamps, `<|endoftext|>` and a `<|startofprev|>` prompt are kept as
they are) with a copy of the tokenizer whose BPE model has `dropout=p` (tokenizers' `BPE(dropout=p)`: each merge
is skipped with probability p, so a word comes out in smaller pieces). The new ids spell exactly the same bytes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from distil.utils.errors import ConfigError

WHISPER_FRAMES = 3000  # 30 s of log-mel frames: Whisper's input is always padded or cut to this
# The encoder-output cache holds the encoder outputs of clean features: masked inputs cannot read it. Refused by
# the config check (distil.config.schema) before models load, and by the module for a caller that skips it.
SPECAUGMENT_WITH_CACHE = (
    "augment.specaugment.enabled=true cannot train with encoder_cache.enabled=true: the cache stores the "
    "encoder outputs of the clean features; turn one of them off"
)


@dataclass(frozen=True)
class SpecAugment:
    """`augment.specaugment`, in `WhisperConfig`'s meanings (see transformers' `_compute_mask_indices`): about
    `mask_*_prob` of the axis is covered by spans of `mask_*_length` (at least `mask_*_min_masks` spans)."""

    enabled: bool = False
    consistent: bool = True
    mask_time_prob: float = 0.05
    mask_time_length: int = 10
    mask_time_min_masks: int = 2
    mask_feature_prob: float = 0.0
    mask_feature_length: int = 10
    mask_feature_min_masks: int = 0

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None) -> SpecAugment | None:
        """The settings when enabled, else None; unknown keys are refused."""
        if not config or not config.get("enabled"):
            return None
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ConfigError(f"augment.specaugment has no key(s) {unknown}; it takes {sorted(known)}")
        return cls(**dict(config))

    def check(self, num_mel_bins: int, frames: int = WHISPER_FRAMES) -> None:
        """A mask must fit its axis: one line naming the key."""
        if self.mask_time_length > frames:
            raise ConfigError(
                f"augment.specaugment.mask_time_length={self.mask_time_length} is longer than the input "
                f"({frames} frames)"
            )
        if self.mask_feature_length > num_mel_bins:
            raise ConfigError(
                f"augment.specaugment.mask_feature_length={self.mask_feature_length} is longer than the input "
                f"({num_mel_bins} mel bins)"
            )


def specaugment_seed(seed: int, step: int, batch_index: int = 0) -> int:
    """The mask generator's seed for one batch: from the run's seed, the global (optimiser) step and the
    batch's index in the global batch order (micro-batches of one step, under gradient accumulation or on
    several processes, draw different masks). A hash, so the same on every process and after a resume."""
    digest = hashlib.blake2b(f"specaugment\x1f{seed}\x1f{step}\x1f{batch_index}".encode(), digest_size=4)
    return int.from_bytes(digest.digest(), "little")  # numpy seeds are 32-bit


def specaugment_masks(
    shape: Sequence[int], spec: SpecAugment, seed: int
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(time mask [batch, frames], feature mask [batch, mel bins]) for features of `shape` [batch, mel bins,
    frames], True where masked (None: that axis is not masked), drawn by transformers' `_compute_mask_indices`.

    That function draws from numpy's global generator: it is seeded with `seed` for the call and its previous
    state restored after, so the masks depend on `seed` alone and nothing else's draws shift."""
    from transformers.models.whisper.modeling_whisper import _compute_mask_indices

    batch, bins, frames = (int(n) for n in shape)
    spec.check(bins, frames)
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        time = feature = None
        if spec.mask_time_prob > 0:  # as WhisperModel._mask_input_features: an axis with prob 0 is left alone
            time = _compute_mask_indices(
                (batch, frames),
                spec.mask_time_prob,
                spec.mask_time_length,
                min_masks=spec.mask_time_min_masks,
            )
        if spec.mask_feature_prob > 0:
            feature = _compute_mask_indices(
                (batch, bins),
                spec.mask_feature_prob,
                spec.mask_feature_length,
                min_masks=spec.mask_feature_min_masks,
            )
    finally:
        np.random.set_state(state)
    as_tensor = lambda m: None if m is None else torch.from_numpy(np.asarray(m, dtype=bool))  # noqa: E731
    return as_tensor(time), as_tensor(feature)


def apply_specaugment(features: torch.Tensor, spec: SpecAugment, seed: int) -> torch.Tensor:
    """A masked copy of `features` [batch, mel bins, frames]: masked frames and bins set to 0, as Whisper does."""
    time, feature = specaugment_masks(features.shape, spec, seed)
    out = features.clone()
    if time is not None:
        out.masked_fill_(time.to(out.device)[:, None, :], 0.0)
    if feature is not None:
        out.masked_fill_(feature.to(out.device)[:, :, None], 0.0)
    return out


class BPEDropout:
    """Label ids re-tokenized with BPE dropout `p`, text spans only (see the module's doc).

    `tokenizer`: the (fast) Whisper tokenizer; its backend's JSON with `model.dropout = p` makes the dropout
    copy. A span whose new ids would not spell the same bytes (it cannot happen for a whole span of valid
    text; it guards a span cut inside a character) keeps its ids. The dropout draws are tokenizers' own
    (unseeded): each call segments afresh."""

    def __init__(self, tokenizer, p: float, is_text):
        from tokenizers import Tokenizer

        if not 0 <= p <= 1:
            raise ConfigError(f"augment.bpe_dropout must be a probability in [0, 1], got {p!r}")
        self.p = float(p)
        self.is_text = is_text
        backend = tokenizer.backend_tokenizer
        self.backend = backend
        spec = json.loads(backend.to_str())
        if spec["model"].get("type") != "BPE":
            raise ConfigError(f"augment.bpe_dropout needs a BPE tokenizer, got {spec['model'].get('type')}")
        spec["model"]["dropout"] = self.p
        self.dropout = Tokenizer.from_str(json.dumps(spec)) if self.p > 0 else None

    def _bytes(self, ids: Sequence[int]) -> str:
        """The byte-level spelling of ids (tokens concatenated): equal iff the ids spell the same bytes."""
        return "".join(self.backend.id_to_token(int(i)) or "" for i in ids)

    def span(self, ids: list[int]) -> list[int]:
        text = self.backend.decode(ids, skip_special_tokens=False)
        new = self.dropout.encode(text, add_special_tokens=False).ids
        return new if self._bytes(new) == self._bytes(ids) else ids

    def __call__(self, ids: Sequence[int], start: int = 0) -> list[int]:
        """`ids` with each maximal run of text tokens from index `start` on re-tokenized (p=0: unchanged)."""
        ids = [int(i) for i in ids]
        if self.dropout is None:
            return ids
        out, run = ids[:start], []
        for i in ids[start:]:
            if self.is_text(i):
                run.append(i)
                continue
            if run:
                out += self.span(run)
                run = []
            out.append(i)
        if run:
            out += self.span(run)
        return out
