"""Feeding the teacher: shards of planned units (`distil.data.label_plan`) as duration-sorted batches of
decoded audio, for one Lightning predict run.

Batching
--------
Inside each shard, units are sorted by duration (longest first, ties by index) and cut into batches, so a
batch holds clips of similar length. Whisper pads every input to 30 s of features, so this mainly saves
decoder steps: similar durations give similar transcript lengths and few finished rows waiting on one long
one. In streaming mode the same sort runs over each shard-sized window of the stream.

Long audio (> 30 s, packing or not) is skipped and listed in `skipped.jsonl` with reason `too_long`: the
student is trained on 30 s windows, so a label for audio it cannot see would be useless, and Whisper would
otherwise truncate it silently. Split such recordings first (or label them with the long-form evaluator).
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import TQDMProgressBar
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from distil.data.audio import SAMPLING_RATE, AudioDecodeError, audio_duration, decode_audio, encode_flac
from distil.data.encoder_cache import cache_key
from distil.data.entries import DatasetEntry, duration_column, stable_id
from distil.data.label_jobs import claim_shard
from distil.data.label_plan import (
    MAX_WHISPER_SECONDS,
    Clip,
    LabellingSpec,
    Skip,
    Unit,
    chunk_shards,
    duration_batches,
)
from distil.data.label_store import ShardWriter

# ----------------------------------------------------------------------------------------------------------
# Pure planning functions
# ----------------------------------------------------------------------------------------------------------

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------
# Sources: map-style (random access, known length) and streaming (one pass)
# ----------------------------------------------------------------------------------------------------------


class LabellingSource:
    """Yields (shard, units) for the shards this job still has to label, each unit carrying its rows."""

    def __init__(self, ds, spec: LabellingSpec, streaming: bool):
        self.ds, self.spec, self.streaming = ds, spec, streaming
        names = ds.column_names or []
        self.duration_column = duration_column(spec.entry, names)
        self.skipped_in_planning: list[
            Skip
        ] = []  # map-style: found while planning (streaming: while reading)
        self.units: list[list[int]] | None = None  # map-style plan: clip indices of each unit
        self.unit_continues: list[bool] = []
        self.durations: list[float | None] = []
        # Streaming: called with (units, skipped while planning) when the stream ends - in whichever process
        # (DataLoader worker, rank) read it, so it must be picklable and write its result to disk.
        self.on_stream_end: Callable[[int, list[Skip]], None] | None = None
        if not streaming:
            self._plan_map_style()

    # Map-style: durations (and packing) are planned once, from metadata only.
    def _plan_map_style(self) -> None:
        entry, ds = self.spec.entry, self.ds
        if self.duration_column:
            self.durations = [None if d is None else float(d) for d in ds[self.duration_column]]
        else:
            self.durations = [
                audio_duration(a) for a in ds.select_columns([entry.audio_column])[entry.audio_column]
            ]
        if self.spec.packing:
            speakers = ds[entry.speaker_column]
            ids = ds[entry.id_column] if entry.id_column else None
            clips = (
                Clip(i, {"__id": ids[i] if ids else stable_id(entry.name, self.spec.split, i)}, d)
                for i, d in enumerate(self.durations)
            )
            units = list(self.spec.pack(clips, lambda c: speakers[c.index], self.skipped_in_planning.append))
            self.units = [[c.index for c in u.clips] for u in units]
            self.unit_continues = [u.continues for u in units]
        else:
            self.units = [[i] for i in range(len(self.durations))]
            self.unit_continues = [False] * len(self.units)

    @property
    def num_units(self) -> int | None:
        return None if self.units is None else len(self.units)

    @property
    def num_shards(self) -> int | None:
        n = self.num_units
        return None if n is None else math.ceil(n / self.spec.shard_size)

    def shard_sizes(self) -> dict[int, int]:
        """Map-style only: units per shard."""
        n, s = self.num_units, self.spec.shard_size
        return {k: min(s, n - k * s) for k in range(self.num_shards)}

    def _row(self, row: dict, index: int) -> dict:
        entry = self.spec.entry
        row = dict(row)
        row["__id"] = (
            str(row[entry.id_column]) if entry.id_column else stable_id(entry.name, self.spec.split, index)
        )
        return row

    def iter_shards(self, select: Callable[[int], bool]) -> Iterator[tuple[int, list[Unit]]]:
        if not self.streaming:
            yield from self._iter_map_style(select)
        else:
            yield from self._iter_stream(select)

    def _iter_map_style(self, select) -> Iterator[tuple[int, list[Unit]]]:
        s = self.spec.shard_size
        for k in range(self.num_shards):
            if not select(k):
                continue
            unit_ids = range(k * s, min((k + 1) * s, self.num_units))
            flat = [i for u in unit_ids for i in self.units[u]]
            rows = self.ds.select(flat)
            by_index = {i: self._row(rows[j], i) for j, i in enumerate(flat)}
            units = [
                Unit(
                    u,
                    [Clip(i, by_index[i], self.durations[i]) for i in self.units[u]],
                    self.unit_continues[u],
                )
                for u in unit_ids
            ]
            yield k, units

    def _iter_stream(self, select) -> Iterator[tuple[int, list[Unit]]]:
        entry, spec = self.spec.entry, self.spec
        self.skipped_in_planning = []  # re-filled by this pass

        def clips():
            for i, row in enumerate(self.ds):
                d = row.get(self.duration_column) if self.duration_column else None
                if d is None:
                    d = audio_duration(row[entry.audio_column])
                yield Clip(i, self._row(row, i), None if d is None else float(d))

        if spec.packing:
            units = spec.pack(
                clips(), lambda c: c.row.get(entry.speaker_column), self.skipped_in_planning.append
            )
        else:
            units = (Unit(c.index, [c]) for c in clips())
        n_units = 0
        for k, shard in chunk_shards(units, spec.shard_size):
            n_units = shard[-1].index + 1
            if select(k):
                yield k, shard
        if self.on_stream_end is not None:  # the stream's length is only known now
            self.on_stream_end(n_units, list(self.skipped_in_planning))


# ----------------------------------------------------------------------------------------------------------
# Batches: decode, concatenate packed clips, extract features
# ----------------------------------------------------------------------------------------------------------
def packed_row(unit: Unit, entry: DatasetEntry, wave: np.ndarray) -> dict:
    """The output row of a unit: the clip's own row, or for packed units the merged clips."""
    if len(unit.clips) == 1:
        row = dict(unit.clips[0].row)
    else:
        row = dict(unit.clips[0].row)  # other columns: the first clip's values
        row[entry.audio_column] = {"bytes": encode_flac(wave, SAMPLING_RATE), "path": None}
        if entry.text_column:
            texts = [c.row.get(entry.text_column) for c in unit.clips]
            row[entry.text_column] = (
                None if any(t is None for t in texts) else " ".join(t.strip() for t in texts)
            )
        if entry.duration_column and entry.duration_column in row:
            row[entry.duration_column] = len(wave) / SAMPLING_RATE
    row["packed_ids"] = [c.row["__id"] for c in unit.clips]
    return row


def make_batch(
    shard: int,
    shard_units: int,
    units: list[Unit],
    entry: DatasetEntry,
    feature_extractor,
    max_seconds: float = MAX_WHISPER_SECONDS,
    packing: bool = False,
    cache_split: str | None = None,
) -> dict:
    """Decode a batch of units; undecodable or too long ones become `skipped` entries.

    With `cache_split` (the split's name, when labelling fills the encoder cache) and an id column, each kept
    unit also gets the key under which training's encoder cache will look up its encoder output
    (`distil.data.encoder_cache.cache_key` of the row training reads); otherwise no audio is hashed."""
    waves, rows, kept, skipped = [], [], [], []
    for unit in units:
        # A clip that cannot be decoded is listed and left out; the rest of a packed unit is still labelled.
        parts, good = [], []
        for clip in unit.clips:
            try:
                parts.append(decode_audio(clip.row[entry.audio_column], SAMPLING_RATE))
                good.append(clip)
            except AudioDecodeError as err:
                # soundfile's message holds an object address; drop it so that reruns list the same text.
                detail = re.sub(r" at 0x[0-9a-fA-F]+", "", str(err))
                skipped.append(Skip([clip.row["__id"]], [clip.index], "unreadable_audio", detail))
        if not good:
            continue
        unit = Unit(unit.index, good, unit.continues)
        ids, indices = [c.row["__id"] for c in unit.clips], [c.index for c in unit.clips]
        wave = parts[0] if len(parts) == 1 else np.concatenate(parts)
        seconds = len(wave) / SAMPLING_RATE
        if seconds > max_seconds + 1e-3:
            skipped.append(Skip(ids, indices, "too_long", f"{seconds:.2f} s > {max_seconds:g} s"))
            continue
        row = packed_row(unit, entry, wave)
        if not packing:
            row.pop("packed_ids")
        row["__audio_seconds"] = seconds
        row["__unit"] = unit.index
        row["__continues"] = unit.continues
        waves.append(wave)
        rows.append(row)
        kept.append(unit.index)
    features = None
    if waves:
        features = feature_extractor(
            waves, sampling_rate=SAMPLING_RATE, return_tensors="pt", return_attention_mask=False
        ).input_features
    keys = None
    if cache_split is not None and entry.id_column:
        keys = [
            cache_key(entry.source(cache_split), str(r[entry.id_column]), r[entry.audio_column]) for r in rows
        ]
    return {
        "input_features": features,
        "cache_keys": keys,
        "rows": rows,
        "skipped": skipped,
        "shard": shard,
        "shard_units": shard_units,
        "n_units": len(units),
    }


class ShardBatches(IterableDataset):
    """The batches of one rank (and DataLoader worker): whole shards, so each shard is written by one process."""

    def __init__(
        self, source: LabellingSource, feature_extractor, batch_size: int, rank: int = 0, world: int = 1
    ):
        self.source, self.fe, self.batch_size = source, feature_extractor, batch_size
        self.rank, self.world = rank, world
        self.length: int | None = None
        if not source.streaming:
            sizes = source.shard_sizes()
            mine = self._mine(range(source.num_shards), workers=1, worker=0)
            self.length = sum(math.ceil(sizes[k] / batch_size) for k in mine)

    def _mine(self, shards: Iterable[int], workers: int, worker: int) -> list[int]:
        pending = [k for k in shards if self.source.spec.wanted(k)]
        slot, slots = self.rank * workers + worker, self.world * workers
        return pending[slot::slots]

    def __len__(self) -> int:  # lets the progress bar show an ETA (map-style)
        if self.length is None:
            raise TypeError("streaming labelling has no length")
        return self.length

    def __iter__(self):
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        spec = self.source.spec
        cache_split = spec.split if spec.cache_keys else None
        slot, slots = self.rank * workers + worker, self.world * workers
        position = -1

        def select(k: int) -> bool:  # every rank/worker walks the same pending list and keeps its slots
            nonlocal position
            if not spec.wanted(k):
                return False
            position += 1
            return position % slots == slot

        for k, units in self.source.iter_shards(select):
            if spec.claims_dir is not None and not claim_shard(Path(spec.claims_dir), k):
                log.info("shard %d is complete or being labelled by another run: skipped", k)
                continue
            for batch in duration_batches(units, self.batch_size):
                yield make_batch(
                    k, len(units), batch, spec.entry, self.fe, spec.max_seconds, spec.packing, cache_split
                )


class LabellingDataModule(L.LightningDataModule):
    """One dataset split to label; the rank and world size come from the Trainer at setup time."""

    def __init__(
        self, source: LabellingSource, feature_extractor, batch_size: int = 16, num_workers: int = 0
    ):
        super().__init__()
        self.source, self.fe = source, feature_extractor
        self.batch_size, self.num_workers = batch_size, num_workers
        self.batches: ShardBatches | None = None

    def setup(self, stage: str | None = None) -> None:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        self.batches = ShardBatches(self.source, self.fe, self.batch_size, rank, world)

    def predict_dataloader(self) -> DataLoader:
        if self.batches is None:
            self.setup("predict")
        return DataLoader(
            self.batches,
            batch_size=None,  # ShardBatches already yields batches
            num_workers=self.num_workers,
            collate_fn=_identity,
            persistent_workers=False,
        )


def _identity(batch):
    return batch


class LabellingProgressBar(TQDMProgressBar):
    """Lightning's bar (batches, ETA when the length is known) plus samples/s and audio-seconds/s."""

    def __init__(self, writer: ShardWriter, refresh_rate: int = 1):
        super().__init__(refresh_rate=refresh_rate)
        self.writer = writer

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        bar = self.predict_progress_bar
        if bar is not None:
            elapsed = max(time.perf_counter() - self.writer.started, 1e-9)
            bar.set_postfix(
                {
                    "samples/s": f"{self.writer.units_done / elapsed:.1f}",
                    "audio_s/s": f"{self.writer.audio_seconds / elapsed:.1f}",
                },
                refresh=False,
            )
