"""The validation sets of training: which (entry, split) pairs validate, and each loaded with references."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import datasets
import torch

from distil.data.entries import DataConfigError, DatasetEntry, column_names, load_split, spread_subset
from distil.datamodules.filters import DataError
from distil.datamodules.mixture import _ListDataset, _MapRows, canonical_row
from distil.datamodules.training_splits import check_columns

log = logging.getLogger(__name__)


def validation_entries(
    entries: Sequence[DatasetEntry], splits: Sequence[str], extra: Sequence[DatasetEntry] = ()
) -> list[tuple[DatasetEntry, str]]:
    """(entry, split) of every validation set: `splits` of the training entries that have them (read from the
    entry's own path, references only), then every split of the `extra` validation entries."""
    wanted = []
    for entry in entries:
        root = Path(str(entry.path)).expanduser()
        for split in splits:
            if split in entry.splits:
                continue  # never validate on a split that is trained on
            if root.is_dir() and not ((root / split).is_dir() or (root / "dataset_dict.json").is_file()):
                log.info("no %s split in %s: not a validation set", split, root)
                continue
            wanted.append((entry, split))
    wanted += [(e, s) for e in extra for s in e.splits]
    return wanted


def load_validation_sets(
    wanted: Sequence[tuple[DatasetEntry, str]],
    streaming: bool = False,
    cache_dir: str | None = None,
    max_samples: int | None = None,
) -> tuple[list[str], list[torch.utils.data.Dataset]]:
    """(names `<dataset>/<split>`, datasets of canonical rows) of the `wanted` validation sets."""
    sets = []
    for entry, split in wanted:
        try:
            ds = load_split(entry, split, streaming=streaming, cache_dir=cache_dir)
        except DataConfigError as err:
            raise DataError(f"{err} (validation data)") from err
        check_columns(entry, split, column_names(ds), "text", str(entry.path), features=ds.features)
        if isinstance(ds, datasets.Dataset):
            sets.append(_MapRows(ds, entry, split, spread_subset(len(ds), max_samples)))
        else:  # a stream can only be read from its start: its first max_samples rows
            it = ds if max_samples is None else ds.take(int(max_samples))
            sets.append(_ListDataset([canonical_row(r, entry, split, i) for i, r in enumerate(it)]))
    names = [entry.source(split) for entry, split in wanted]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DataError(
            f"two validation sets are named {duplicates[0]!r}; give the extra validation datasets other names"
        )
    return names, sets
