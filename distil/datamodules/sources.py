"""Training sources: a pseudo-labelled or reference split loaded, its columns checked, its rows filtered."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import datasets
import numpy as np
from datasets import Audio
from datasets.distributed import split_dataset_by_node

from distil.data.entries import DataConfigError, DatasetEntry, column_names, validate_columns
from distil.data.label_store import PSEUDO_LABEL_COLUMNS
from distil.datamodules.filters import DataError, FilterStats
from distil.datamodules.mixture import (
    CANONICAL_FEATURES,
    TrainSource,
    canonical_row,
)

log = logging.getLogger(__name__)


def filter_source(
    entry: DatasetEntry,
    split: str,
    ds,
    reason: Callable[[dict], str | None],
    needs_duration: bool = False,
    count_streamed: bool = True,
    part: tuple[int, int] = (0, 1),
) -> TrainSource:
    """Apply the filters to one training split: kept row indices (map-style) or a lazily filtered stream.

    Counts are exact for map-style data and come from one pass over the metadata columns for streams
    (`count_streamed`); audio is read only for durations from headers (`needs_duration` without a duration column).
    `part` (rank, world size): a streamed split's counting pass reads only that rank's part of it (the caller
    adds the ranks' counts up)."""
    name = f"{entry.name}/{split}"
    names = column_names(ds)
    # Metadata columns only: the audio column is read only when a duration must come from headers.
    meta_cols = [
        c
        for c in (entry.text_column, "token_ids", "pl_wer", "pseudo_label", "language", entry.duration_column)
        if c and c in names
    ]
    if needs_duration and entry.duration_column not in meta_cols:
        meta_cols.append(entry.audio_column)
    blank = dict.fromkeys(names)

    def count(stats: FilterStats, keep: list[int] | None = None) -> None:
        meta = ds.select_columns(meta_cols)
        if part[1] > 1:
            meta = split_dataset_by_node(meta, rank=part[0], world_size=part[1])
        for i, raw in enumerate(meta):
            row = canonical_row({**blank, **raw}, entry, split, i)  # the rows training sees, without audio
            try:
                why = reason(row)
            except DataError as err:
                raise DataError(f"dataset {entry.name!r} split {split!r} row {i}: {err}") from err
            stats.add(why)
            if why is None and keep is not None:
                keep.append(i)

    if isinstance(ds, datasets.Dataset):
        stats, keep = FilterStats(name), []
        count(stats, keep)
        return TrainSource(entry, split, ds, np.asarray(keep, dtype=np.int64), stats)

    # Streamed: canonical rows, filtered lazily; counts from one pass over the metadata (no decoding).
    canon = ds.map(
        lambda row, idx: canonical_row(row, entry, split, idx),
        with_indices=True,
        remove_columns=names,
        features=CANONICAL_FEATURES,
    )
    canon = canon.filter(lambda row: reason(row) is None)
    stats = None
    if count_streamed:
        stats = FilterStats(name)
        count(stats)
    return TrainSource(entry, split, canon, None, stats)


def check_columns(
    entry: DatasetEntry, split: str, names: Sequence[str], label_source: str, where: str
) -> None:
    """Clear start-up errors for unknown columns and for pseudo-labels missing when the method needs them."""
    names = list(names)
    try:  # the one column check; a missing duration column is fine (durations then come from the headers)
        validate_columns(entry, split, names, where=where)
    except DataConfigError as err:
        raise DataError(str(err)) from err
    if label_source == "pseudo":
        missing = [c for c in PSEUDO_LABEL_COLUMNS if c not in names]
        if missing:
            raise DataError(
                f"dataset {entry.name!r} split {split!r} ({where}) has no pseudo-label columns {missing}; this "
                "loss trains on pseudo-labels: run `python -m distil.pseudo_label` first, or use loss=finetune"
            )
    elif entry.text_column is None:
        raise DataError(
            f"dataset {entry.name!r} has no text column ({entry.key}.text_column is null) but loss=finetune "
            "trains on the reference text; use a pseudo-labelled method (loss=sft or kd)"
        )


def load_pseudo_labelled(
    entry: DatasetEntry, split: str, streaming: bool = False, cache_dir: str | None = None
):
    """A finished pseudo-label split: only its parquet shards (the directory also holds JSON metadata)."""
    directory = Path(str(entry.path)) / split
    files = sorted(str(p) for p in directory.glob("*.parquet") if not p.name.startswith((".", "_")))
    if not files:
        raise DataError(f"pseudo-label split {directory} holds no parquet shards; re-run distil.pseudo_label")
    ds = datasets.load_dataset(
        "parquet", data_files={split: files}, split=split, streaming=streaming, cache_dir=cache_dir
    )
    if entry.audio_column in column_names(ds):
        ds = ds.cast_column(entry.audio_column, Audio(decode=False))
    return ds
