"""The training mixture: sources in one canonical row schema, map-style and streamed interleaving, and
`TrainStream`, which cuts the mixture into a deterministic, resumable sequence of batches per rank/worker.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import torch
from datasets import Audio, Features, List, Value
from datasets.distributed import split_dataset_by_node

from distil.data.entries import DatasetEntry, stable_id
from distil.datamodules.collator import SpeechCollator
from distil.datamodules.filters import DataError, FilterStats

log = logging.getLogger(__name__)


# Every source is mapped to this schema before streamed interleaving (it needs identical features).
CANONICAL_FEATURES = Features(
    {
        "audio": Audio(decode=False),
        "sample_id": Value("string"),
        "source": Value("string"),  # "<dataset>/<split>": the cache key prefix and the stats key
        "text": Value("string"),
        "token_ids": List(Value("int64")),
        "prompt": Value("string"),
        "pl_wer": Value("float64"),
        "pseudo_label": Value("string"),  # the pseudo-label's plain text (the upper-case filter)
        "duration": Value("float64"),
        "language": Value("string"),
    }
)


def canonical_row(row: Mapping[str, Any], entry: DatasetEntry, split: str, index: int) -> dict:
    """One row of a source in `CANONICAL_FEATURES` form (missing optional columns become None)."""
    sid = row[entry.id_column] if entry.id_column else None
    duration = row.get(entry.duration_column) if entry.duration_column else None
    token_ids = row.get("token_ids")
    return {
        "audio": row[entry.audio_column],
        "sample_id": str(sid) if sid is not None else stable_id(entry.name, split, index),
        "source": entry.source(split),
        "text": row.get(entry.text_column) if entry.text_column else None,
        "token_ids": [int(i) for i in token_ids] if token_ids is not None else None,
        "prompt": row.get("prompt"),
        "pl_wer": float(row["pl_wer"]) if row.get("pl_wer") is not None else None,
        "pseudo_label": row.get("pseudo_label"),
        "duration": float(duration) if duration is not None else None,
        "language": row.get("language") or entry.language,  # multilingual pseudo-labels carry one per sample
    }


@dataclass
class TrainSource:
    entry: DatasetEntry
    split: str
    dataset: datasets.Dataset | datasets.IterableDataset
    kept_rows: np.ndarray | None  # map-style: row indices that pass the filters
    stats: FilterStats | None


class _MapMixture:
    """Map-style mixture, drawn anew every epoch (seeded by seed and epoch), as the streamed one is.

    Each epoch: every source's kept rows in a fresh order, interleaved by `datasets.interleave_datasets`
    (the same probabilities and stopping strategy as streaming), then permuted. Drawing per epoch matters
    for `first_exhausted`: a large source contributes another subset of its rows every epoch instead of
    the same subset forever. Only `(source, row)` integer pairs are interleaved, never the audio.
    """

    def __init__(
        self,
        sources: list[TrainSource],
        probabilities: list[float],
        seed: int,
        stopping_strategy: str,
        shuffle: bool = True,
        max_samples: int | None = None,
    ):
        self.sources, self.probabilities = sources, probabilities
        self.seed, self.stopping_strategy, self.shuffle = int(seed), stopping_strategy, shuffle
        self.max_samples = max_samples
        self._drawn: tuple[int, np.ndarray] | None = None

    def epoch_pairs(self, epoch: int) -> np.ndarray:
        """[n, 2] int64 (source index, row index) of one epoch, before the epoch's permutation."""
        epoch = epoch if self.shuffle else 0  # without shuffling every epoch is the same
        if self._drawn is not None and self._drawn[0] == epoch:
            return self._drawn[1]
        index_sets = []
        for i, s in enumerate(self.sources):
            rows = s.kept_rows
            if self.shuffle:
                rows = np.random.default_rng([self.seed, epoch, i]).permutation(rows)
            index_sets.append(
                datasets.Dataset.from_dict({"src": np.full(len(rows), i, dtype=np.int64), "row": rows})
            )
        draw_seed = int(np.random.default_rng([self.seed, epoch]).integers(2**31))
        mixed = datasets.interleave_datasets(
            index_sets,
            probabilities=self.probabilities,
            seed=draw_seed,
            stopping_strategy=self.stopping_strategy,
        )
        table = mixed.with_format("numpy")[:]
        pairs = np.stack([table["src"], table["row"]], axis=1).astype(np.int64)
        if self.max_samples is not None:
            pairs = pairs[: int(self.max_samples)]
        self._drawn = (epoch, pairs)
        return pairs

    def epoch_batches(self, epoch: int, seed: int, batch_size: int, shuffle: bool) -> Iterator[np.ndarray]:
        pairs = self.epoch_pairs(epoch)
        order = (
            np.random.default_rng([seed, epoch]).permutation(len(pairs)) if shuffle else np.arange(len(pairs))
        )
        for start in range(0, len(order) - batch_size + 1, batch_size):  # the last partial batch is dropped
            yield pairs[order[start : start + batch_size]]

    def fetch(self, handles: np.ndarray) -> list[dict]:
        rows = []
        for src, row in handles:
            s = self.sources[int(src)]
            rows.append(canonical_row(s.dataset[int(row)], s.entry, s.split, int(row)))
        return rows


class _StreamMixture:
    """Streamed mixture: canonical rows from `interleave_datasets`, shuffled with a buffer per epoch.

    Each process (DDP rank x DataLoader worker) reads only its own part of the stream, through the
    library's `split_dataset_by_node`: whole shards when their number divides the parts, else every
    n-th row. So with 8 GPUs x 16 workers no process reads the 128 parts that are not its own.
    """

    def __init__(self, dataset: datasets.IterableDataset, shuffle_buffer_size: int):
        self.dataset = dataset
        self.shuffle_buffer_size = int(shuffle_buffer_size)

    def part_batches(
        self, epoch: int, seed: int, batch_size: int, shuffle: bool, part: int, n_parts: int
    ) -> Iterator[list[dict]]:
        """The batches of part `part` of `n_parts` in one epoch (partial last batch dropped)."""
        ds = self.dataset
        if shuffle and self.shuffle_buffer_size > 1:
            ds = ds.shuffle(seed=seed, buffer_size=self.shuffle_buffer_size)
        if n_parts > 1:
            ds = split_dataset_by_node(ds, rank=part, world_size=n_parts)
        ds.set_epoch(epoch)
        # `.iter` (not `__iter__`): the split is ours; datasets must not split it again by DataLoader worker.
        for cols in ds.iter(batch_size=batch_size, drop_last_batch=True):
            yield [dict(zip(cols, values, strict=True)) for values in zip(*cols.values(), strict=True)]


def batches_to_skip(consumed: int, world_size: int, n_workers: int, worker: int) -> int:
    """Batches worker `worker` of a rank already produced when `consumed` global batches were trained on.

    Each rank trained on `consumed / world_size` of them, taken round-robin from its workers (the
    DataLoader's order for iterable datasets), so worker `w` made `ceil((per_rank - w) / n_workers)`."""
    per_rank = consumed // world_size
    return max(0, -(-(per_rank - worker) // n_workers))


class TrainStream(torch.utils.data.IterableDataset):
    """Endless, deterministic stream of collated training batches (epoch after epoch).

    Map-style mixtures: global batch `j` (counted from the start of training, across epochs) is produced
    by rank `(j - start_batch) % world_size` and, on that rank, by worker `((j - start_batch) //
    world_size) % num_workers`; PyTorch's DataLoader returns worker outputs round-robin, so each rank sees
    its batches in global order whatever `num_workers` is, and a process only fetches its own rows.
    Streamed mixtures: each (rank, worker) reads its own part of the stream (`_StreamMixture`); the order
    is deterministic for a given number of ranks x workers. `start_batch` (global batches already trained
    on) skips batches on resume: skipped batches are never decoded.
    """

    def __init__(
        self,
        mixture: _MapMixture | _StreamMixture,
        collator: SpeechCollator,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        max_epochs: int | None = None,
    ):
        self.mixture = mixture
        self.collator = collator
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.max_epochs = max_epochs
        self.start_batch = 0

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if isinstance(self.mixture, _StreamMixture):
            yield from self._iter_stream(worker, n_workers)
            return
        j, epoch, start = 0, 0, self.start_batch
        while self.max_epochs is None or epoch < self.max_epochs:
            produced = 0
            for handles in self.mixture.epoch_batches(epoch, self.seed, self.batch_size, self.shuffle):
                produced += 1
                k = j - start
                if (
                    k >= 0
                    and k % self.world_size == self.rank
                    and (k // self.world_size) % n_workers == worker
                ):
                    batch = self.collator(self.mixture.fetch(handles), epoch)
                    batch["batch_index"] = j
                    yield batch
                j += 1
            self._check_produced(produced)
            epoch += 1

    def _iter_stream(self, worker: int, n_workers: int) -> Iterator[dict]:
        part, n_parts = self.rank * n_workers + worker, self.world_size * n_workers
        skip = batches_to_skip(self.start_batch, self.world_size, n_workers, worker)
        k, epoch = 0, 0  # k: this part's batches so far
        while self.max_epochs is None or epoch < self.max_epochs:
            produced = 0
            for rows in self.mixture.part_batches(
                epoch, self.seed, self.batch_size, self.shuffle, part, n_parts
            ):
                produced += 1
                if k >= skip:
                    batch = self.collator(rows, epoch)
                    batch["batch_index"] = k * n_parts + part
                    yield batch
                k += 1
            self._check_produced(produced)
            epoch += 1

    def _check_produced(self, produced: int) -> None:
        if produced == 0:
            raise DataError(
                f"the training data has fewer samples than one batch (data.batch_size={self.batch_size}) "
                "per process after filtering; lower the batch size or relax the filters"
            )


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


class _MapRows(torch.utils.data.Dataset):
    """The rows `indices` of a map-style validation split, read one by one in canonical form."""

    def __init__(self, dataset: datasets.Dataset, entry: DatasetEntry, split: str, indices: Sequence[int]):
        self.dataset, self.entry, self.split, self.indices = dataset, entry, split, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        index = self.indices[i]
        return canonical_row(self.dataset[index], self.entry, self.split, index)
