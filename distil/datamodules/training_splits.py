"""Training sources: a pseudo-labelled or reference split loaded, its columns checked, its rows filtered, and
what it is on disk (the fingerprint a resumed run compares)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from datasets import Audio
from datasets.distributed import split_dataset_by_node

from distil.data.entries import DataConfigError, DatasetEntry, column_names, load_split, validate_columns
from distil.data.label_store import (
    LABELS_METADATA,
    PSEUDO_LABEL_COLUMNS,
    SUCCESS,
    data_files,
    label_shard_files,
    resolved_path,
    shard_problems,
    source_record,
    split_directory,
)
from distil.datamodules.filters import DataError, Drop, FilterStats
from distil.datamodules.mixture import (
    CANONICAL_FEATURES,
    TrainSource,
    canonical_row,
)
from distil.utils.io import read_json

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
    entry: DatasetEntry,
    split: str,
    names: Sequence[str],
    label_source: str,
    where: str,
    features: Mapping[str, Any] | None = None,
) -> None:
    """Clear start-up errors for unknown columns, a text column that is not text (from the split's `features`),
    and pseudo-labels missing when the method needs them."""
    names = list(names)
    try:  # the one column check; a missing duration column is fine (durations then come from the headers)
        validate_columns(entry, split, names, where=where, features=features)
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


def check_labels_bound(entry: DatasetEntry, split: str, directory: Path) -> None:
    """Finished pseudo-labels are used only as they were written and for the data they were made from.

    Shards: the files on disk must be the manifest's (`distil_labels.json` `shards`, recorded at finalise),
    so a lost shard is not trained around. Source: `entry.path` (the configured data) must be where the labels
    came from. Paths are compared absolute; a dataset at another path is still accepted when its split's data
    files have the recorded names and sizes (moved or copied: the same data), so labels follow a moved corpus
    but not a different one under an old name. Labels finished before these records existed are accepted
    (shards, with a warning) or compared by path alone (source)."""
    meta_path = directory / LABELS_METADATA
    meta = read_json(meta_path) if meta_path.is_file() else {}
    relabel = f"delete {directory} and rerun `python -m distil.pseudo_label`"
    if "shards" not in meta:
        log.warning(
            "%s has no shard manifest (labelled by an older distil): its shard files are not checked",
            directory,
        )
    elif problems := shard_problems(directory, meta["shards"]["files"]):
        raise DataError(
            f"pseudo-labels of {entry.name!r} split {split!r} in {directory} are not the shards labelling wrote "
            f"({'; '.join(problems)}; the manifest in {meta_path} lists {len(meta['shards']['files'])} files, "
            f"{meta['shards']['rows']} rows): restore the files, or {relabel}"
        )
    recorded = (meta.get("source") or {}).get("path") or (meta.get("dataset") or {}).get("path")
    if recorded is None or resolved_path(recorded) == resolved_path(str(entry.path)):
        return
    files = (meta.get("source") or {}).get("files")
    here = source_record(str(entry.path), split)["files"]
    if files is not None and here == files:
        log.info(
            "%s: the labels were made from %s; %s holds the same files (moved): using them",
            entry.source(split),
            recorded,
            entry.path,
        )
        return
    if files is None:
        what = "which cannot be recognised as the same data (the labels predate the record of their files)"
    else:
        what = "which holds other files" if here is not None else "which is not a local dataset directory"
    raise DataError(
        f"pseudo-labels of dataset {entry.name!r} split {split!r} ({directory}) were made from {recorded}, but "
        f"{entry.key}.path is {entry.path}, {what}: give that dataset another {entry.key}.name (it gets its own "
        f"labels), {relabel}, or point {entry.key}.path back to {recorded}"
    )


def load_pseudo_labelled(
    entry: DatasetEntry, split: str, streaming: bool = False, cache_dir: str | None = None
):
    """A finished pseudo-label split: only its parquet shards (the directory also holds JSON metadata)."""
    directory = Path(str(entry.path)) / split
    files = [str(p) for p in label_shard_files(directory)]
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
        check_labels_bound(entry, split, Path(path) / split)
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
    check_columns(src_entry, split, names, label_source, path, features=ds.features)
    return src_entry, ds


def split_fingerprint(entry: DatasetEntry, split: str, path: str) -> list | dict:
    """What a training split is, without reading it: the data files of a local split (names, sizes,
    modification times), or the Hub id/config/split."""
    directory = split_directory(path, split)
    if directory is None:
        return {"hub": str(entry.path), "config": entry.config, "split": split}
    return [list(f) for f in data_files(directory)]
