"""Training sources: a pseudo-labelled or reference split loaded, its columns checked, its rows filtered, and
what it is on disk (the fingerprint a resumed run compares)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import datasets
import numpy as np
from datasets import Audio
from datasets.distributed import split_dataset_by_node

from distil.data.entries import DataConfigError, DatasetEntry, column_names, load_split, validate_columns
from distil.data.label_store import PSEUDO_LABEL_COLUMNS, SUCCESS
from distil.datamodules.filters import DataError, Drop, FilterStats
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
    reason: Callable[[dict], Drop | None],
    needs_audio: bool = False,
    count_streamed: bool = True,
    part: tuple[int, int] = (0, 1),
) -> TrainSource:
    """Apply the filters to one training split: kept row indices (map-style) or a lazily filtered stream.

    Counts are exact for map-style data and come from one pass over the metadata columns for streams
    (`count_streamed`); the audio column is read only when `reason` needs it (`needs_audio`: durations from
    headers, raw data's decoding check). Drops with a detail are listed by id in the stats (data_filter.json).
    `part` (rank, world size): a streamed split's counting pass reads only that rank's part of it (the caller
    adds the ranks' counts up)."""
    name = entry.source(split)
    names = column_names(ds)
    # Metadata columns only: the audio column is read only when `reason` needs it.
    meta_cols = [
        c
        for c in dict.fromkeys(
            (
                entry.id_column,  # the id a listed drop is named by
                entry.text_column,
                "token_ids",
                "pl_wer",
                "pseudo_label",
                "language",
                entry.duration_column,
            )
        )
        if c and c in names
    ]
    if needs_audio:
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
            stats.add(why, row["sample_id"])
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


def open_train_split(
    entry: DatasetEntry,
    split: str,
    path: str,
    label_source: str,
    streaming: bool = False,
    cache_dir: str | None = None,
) -> tuple[DatasetEntry, datasets.Dataset | datasets.IterableDataset]:
    """One training split read from `path` (the pseudo-label directory, or the entry's own path for reference
    text) with its columns checked: (the entry as read there, the dataset). Missing or unfinished
    pseudo-labels are named with the command that makes them."""
    pseudo = label_source == "pseudo"
    if pseudo and not Path(path).is_dir():
        raise DataError(
            f"no pseudo-labels for dataset {entry.name!r}: {path} does not exist; run "
            f"`python -m distil.pseudo_label` for it (same teacher), or use loss=finetune"
        )
    src_entry = DatasetEntry(**{**entry.__dict__, "path": path})
    if pseudo:
        done = Path(path) / split / SUCCESS
        if not done.is_file():
            raise DataError(
                f"pseudo-labels of {entry.name!r} split {split!r} are missing or incomplete (no {done}); "
                "run (or finish) `python -m distil.pseudo_label` for it with the same teacher"
            )
    try:
        if pseudo:
            ds = load_pseudo_labelled(src_entry, split, streaming=streaming, cache_dir=cache_dir)
        else:
            ds = load_split(src_entry, split, streaming=streaming, cache_dir=cache_dir)
    except DataConfigError as err:
        raise DataError(f"{err} (training data, {entry.key})") from err
    names = column_names(ds)
    if pseudo and entry.id_column is None:
        # pseudo-labelling adds an id column when the source has none (distil.pseudo_label)
        src_entry.id_column = next((c for c in ("pl_id", "id") if c in names), None)
    check_columns(src_entry, split, names, label_source, path)
    return src_entry, ds


def split_fingerprint(entry: DatasetEntry, split: str, path: str) -> list | dict:
    """What a training split is, without reading it: the data files of a local split (names, sizes,
    modification times), or the Hub id/config/split."""
    root = Path(path).expanduser()
    directory = root / split if (root / split).is_dir() else root
    if not directory.is_dir():
        return {"hub": str(entry.path), "config": entry.config, "split": split}
    files = sorted(f for f in directory.rglob("*") if f.is_file() and not f.name.startswith("."))
    return [[str(f.relative_to(directory)), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
