"""Planning the pseudo-labelling work: clips, units, packing, shards and which job owns which shard.


Vocabulary
----------
- clip: one row of the input dataset, at its original `index`.
- unit: what the teacher labels as one sample - one clip, or (with packing) several consecutive clips of
  one speaker concatenated. Units are numbered 0, 1, 2, ... in dataset order; without packing the unit
  index is the clip index.
- shard: units [k * shard_size, (k + 1) * shard_size). A shard is the unit of resume (written whole, or not
  at all), of job splitting (`shard.index`/`shard.count`: job j owns shards k with k % count == j) and of
  rank splitting under DDP (rank r of W takes every W-th shard the job still has to do). Because shards are
  defined on the dataset order, every job and rank derives the same partition and none ever collides.

Packing (`packing.enabled`), precisely
--------------------------------------
Clips are read in dataset order. A clip joins the open unit iff the unit's speaker equals the clip's
speaker (both known) and the unit's duration plus the clip's stays <= `max_seconds`; otherwise the open unit
is closed and the clip opens a new one. A unit `continues` its predecessor iff the predecessor unit exists,
has the same speaker, and no clip was dropped between them; only then does it get the predecessor's
pseudo-label as its previous-context prompt (`<|startofprev|>` + text, added when the split is merged).
So a speaker change always starts a prompt-less unit, and clips of different speakers are never merged.
With `packing.min_seconds` set, each unit gets its own limit instead of `max_seconds`, drawn uniformly from
[min_seconds, max_seconds] when the unit opens (a generator seeded by the split's name, drawn in dataset
order, so every job, rank and stream derives the same units); a unit's first clip always opens it. The units
then span single clips to full 30-s windows, as a natural corpus's utterances and leftovers do, instead of
all being ~30 s. With `packing.single_probability=p`, each unit, when it opens, holds its first clip alone
with probability p (drawn from the same generator, before the limit): the units are then a mix of single
clips and full windows, so a student learns both where one utterance ends and how a 30-s window reads.
Clips whose duration is unknown (no duration column, unreadable header) or that alone exceed `max_seconds`
are skipped (listed) and break the chain. A clip that passes planning but then fails to decode is left out
of its unit (listed); the unit keeps its other clips. The same rule runs over a stream, so packing works in
streaming mode too, and gives the same units.
"""

from __future__ import annotations

import math
import random
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from distil.data.entries import DataConfigError, DatasetEntry

MAX_WHISPER_SECONDS = 30.0


@dataclass
class Clip:
    index: int
    row: dict[str, Any]
    duration: float | None


@dataclass
class Unit:
    index: int
    clips: list[Clip]
    continues: bool = False  # packing: same speaker as the previous unit, which directly precedes it

    @property
    def duration(self) -> float:
        return sum(c.duration or 0.0 for c in self.clips)


@dataclass
class Skip:
    """A clip (or packed unit) that was not labelled, and why."""

    ids: list[str]
    indices: list[int]
    reason: str
    detail: str = ""

    def to_dict(self) -> dict:
        return {"ids": self.ids, "indices": self.indices, "reason": self.reason, "detail": self.detail}


def check_packing_limits(
    min_seconds: float | None, max_seconds: float, single_probability: float | None = None
) -> None:
    if min_seconds is not None and not 0 <= min_seconds <= max_seconds:
        raise DataConfigError(
            f"packing.min_seconds={min_seconds} must lie in [0, packing.max_seconds={max_seconds}]; "
            "set it in that range, or to null to pack every unit up to max_seconds"
        )
    if single_probability is not None and not 0 <= single_probability <= 1:
        raise DataConfigError(
            f"packing.single_probability={single_probability} must lie in [0, 1]; "
            "set it in that range, or to null to pack every unit"
        )


def pack_units(
    clips: Iterable[Clip],
    speaker_of: Callable[[Clip], Any],
    max_seconds: float,
    on_skip: Callable[[Skip], None],
    min_seconds: float | None = None,
    seed: int = 0,
    single_probability: float | None = None,
) -> Iterator[Unit]:
    """Group consecutive same-speaker clips up to `max_seconds`, or up to a limit drawn per unit from
    [min_seconds, max_seconds], or (with `single_probability`) a single clip (the rule in the module
    docstring)."""
    check_packing_limits(min_seconds, max_seconds, single_probability)
    draw = random.Random(seed)
    current: list[Clip] = []
    current_speaker, current_duration, current_continues = None, 0.0, False
    current_limit = max_seconds
    previous_speaker, chain_ok = None, False  # speaker of the last emitted unit; no clip dropped since
    n_units = 0

    def close():
        nonlocal current, n_units, previous_speaker, chain_ok
        unit = Unit(n_units, current, current_continues)
        n_units += 1
        previous_speaker, chain_ok, current = current_speaker, True, []
        return unit

    for clip in clips:
        speaker = speaker_of(clip)
        bad = clip.duration is None or clip.duration > max_seconds
        if bad:
            if current:
                yield close()
            chain_ok = False
            reason = "unreadable_audio" if clip.duration is None else "too_long"
            on_skip(Skip([str(clip.row.get("__id"))], [clip.index], reason, f"duration={clip.duration}"))
            continue
        fits = current_duration + clip.duration <= current_limit
        if current and speaker is not None and speaker == current_speaker and fits:
            current.append(clip)
            current_duration += clip.duration
            continue
        if current:
            yield close()
        current = [clip]
        current_continues = chain_ok and speaker is not None and speaker == previous_speaker
        current_speaker, current_duration = speaker, clip.duration
        if single_probability and draw.random() < single_probability:
            current_limit = 0.0  # nothing more fits: this clip is its unit
        elif min_seconds is not None:
            current_limit = draw.uniform(min_seconds, max_seconds)
        else:
            current_limit = max_seconds
    if current:
        yield close()


def split_shard_size(units: int | None, shard_size: int, min_shards: int, batch_size: int) -> int:
    """Units per shard for a split of `units` units: `shard_size`, but a smaller split is cut into about
    `min_shards` shards (of at least one batch), so that every process and job gets a share: ranks take whole
    shards, and a 1,065-unit split with `shard_size` 1000 left one of two CPU processes idle after 65 units.
    A function of the data and the config only, so every job, rank and rerun derives the same layout; a stream
    (`units` unknown until its end) keeps `shard_size`."""
    if units is None:
        return shard_size
    return max(1, min(shard_size, max(batch_size, math.ceil(units / min_shards))))


def chunk_shards(units: Iterable[Unit], shard_size: int) -> Iterator[tuple[int, list[Unit]]]:
    """Cut the unit stream into shards of `shard_size` consecutive units."""
    shard: list[Unit] = []
    for unit in units:
        shard.append(unit)
        if len(shard) == shard_size:
            yield unit.index // shard_size, shard
            shard = []
    if shard:
        yield shard[0].index // shard_size, shard


def duration_batches(units: list[Unit], batch_size: int) -> list[list[Unit]]:
    """Sort by duration (longest first, ties by index) and cut into batches."""
    ordered = sorted(units, key=lambda u: (-u.duration, u.index))
    return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]


def job_owns(shard: int, job_index: int, job_count: int) -> bool:
    return shard % job_count == job_index


@dataclass
class LabellingSpec:
    """What every rank needs to rebuild the same plan."""

    entry: DatasetEntry
    split: str
    shard_size: int = 1000
    packing: bool = False
    max_seconds: float = MAX_WHISPER_SECONDS
    min_seconds: float | None = None  # packing: each unit's limit drawn from [min_seconds, max_seconds]
    single_probability: float | None = None  # packing: the chance that a unit holds one clip only
    job_index: int = 0
    job_count: int = 1
    done: set[int] = field(default_factory=set)  # shards already complete on disk
    claims_dir: str | None = None  # where shards are claimed (label_store.claim_shard); None: no claiming
    cache_keys: bool = False  # give each unit its encoder-cache key (only when labelling fills the cache)

    @property
    def packing_seed(self) -> int:
        """The per-unit limits' generator seed: the split's name, so every job and rank draws the same."""
        return zlib.crc32(self.entry.source(self.split).encode())

    def pack(self, clips: Iterable[Clip], speaker_of: Callable[[Clip], Any], on_skip) -> Iterator[Unit]:
        return pack_units(
            clips,
            speaker_of,
            self.max_seconds,
            on_skip,
            self.min_seconds,
            self.packing_seed,
            self.single_probability,
        )

    def wanted(self, shard: int) -> bool:
        return job_owns(shard, self.job_index, self.job_count) and shard not in self.done
