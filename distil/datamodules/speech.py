"""Training and validation data for distillation: weighted multi-dataset mixing, filters, collation.

Shape of the training data path (top to bottom):

1. Each `data.datasets` entry (its `splits` are the training splits) is loaded with `distil.data.load_split`:
   from the pseudo-label directory `${paths.pseudo_labels}/<labelling teacher>/<name>` when the method
   trains on pseudo-labels, from the entry's own `path` when it trains on the reference text.
2. Filters (`drop_reason`): pseudo-label WER (`keep iff pl_wer <= wer_threshold`), duration and label
   length; kept/dropped counts are logged per dataset (exact for map-style data, from a pass over the
   metadata columns for streamed data). Raw data (reference text) is decoded once here and checked as
   labelling checks clips (`collator.decoded_problem`: undecodable, over 30 s); those drops are listed by id.
   Pseudo-labels are first checked against their shard manifest and their source (`check_labels_bound`).
3. Mixing: `datasets.interleave_datasets(probabilities ∝ weight, seed, stopping_strategy)`. For map-style
   data the interleaved dataset holds only `(source, row)` pairs (no copy of the audio); streamed
   sources are mapped to one canonical schema and interleaved lazily.
4. `TrainStream` cuts the mixture into batches per epoch (a seeded permutation for map-style data, a
   seeded shuffle buffer for streams) and hands batch `j` to one rank/worker. The global batch order is
   independent of `num_workers`, and a resumed run skips exactly the batches already trained on
   (`start_batch`), without decoding their audio.
5. `SpeechCollator` (in the DataLoader workers): audio decoded with `distil.data.audio.decode_audio`, log-mel
   features, per-sample/per-epoch targets (`distil.data.targets.build_targets`), labels padded to the longest
   in the batch. With the encoder cache, cached batches skip decoding and features altogether.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import lightning as L
import torch
from torch.utils.data import DataLoader

from distil.data.encoder_cache import EncoderCache
from distil.data.entries import (
    DatasetEntry,
    column_names,
    dataset_entries,
)
from distil.data.targets import (
    WHISPER_MAX_LABEL_LENGTH,
)
from distil.datamodules.collator import LABEL_SOURCES, SpeechCollator
from distil.datamodules.filters import DURATION_FILTERS, DataError, FilterStats, sampling_probabilities
from distil.datamodules.mixture import (
    TrainSource,
    TrainStream,
    _MapMixture,
    _StreamMixture,
)
from distil.datamodules.training_splits import filter_source, open_train_split, split_fingerprint
from distil.datamodules.validation import load_validation_sets, validation_entries
from distil.utils.errors import ConfigError

log = logging.getLogger(__name__)

STOPPING_STRATEGIES = ("first_exhausted", "all_exhausted", "all_exhausted_without_replacement")


class SpeechDataModule(L.LightningDataModule):
    """Weighted multi-dataset training stream + named validation sets for `WhisperDistiller`.

    Args (all plain values, so tests build it without Hydra):
        datasets: `data.datasets` entries (see `distil.data.entries`); their `splits` are trained on.
        processor_dir: directory with the tokenizer and feature extractor (the student's).
        label_source: "pseudo" (token_ids from pseudo-labelling) or "text" (reference, fine-tuning).
        pseudo_labels_dir: `${paths.pseudo_labels}/<labelling teacher>`; sources are read from
            `<pseudo_labels_dir>/<dataset name>` when `label_source="pseudo"`.
        validation_splits: for every entry listing one of these splits, a validation set `<name>/<split>`
            read from the entry's own path (references, no pseudo-labels needed).
        validation_datasets: extra validation entries (each split becomes a set).
    """

    def __init__(
        self,
        datasets: Sequence[Mapping[str, Any]],
        processor_dir: str,
        *,
        label_source: str = "pseudo",
        pseudo_labels_dir: str | None = None,
        streaming: bool = False,
        validation_splits: Sequence[str] = ("validation",),
        validation_datasets: Sequence[Mapping[str, Any]] = (),
        batch_size: int = 8,
        val_batch_size: int = 16,
        num_workers: int = 0,
        seed: int = 0,
        stopping_strategy: str = "all_exhausted",
        shuffle: bool = True,
        shuffle_buffer_size: int = 1000,
        wer_threshold: float | None = None,
        wer_inclusive: bool = False,
        drop_uppercase: bool = True,
        drop_truncated: bool = True,
        min_duration_s: float | None = None,
        max_duration_s: float | None = 30.0,
        max_label_length: int = WHISPER_MAX_LABEL_LENGTH,
        max_compression_ratio: float | None = None,
        max_tokens_per_second: float | None = None,
        timestamp_probability: float = 0.0,
        condition_on_prev_probability: float = 0.0,
        max_train_samples: int | None = None,
        max_val_samples: int | None = None,
        count_streamed_filters: bool = True,
        language: str | None = None,
        task: str | None = None,
        encoder_cache: EncoderCache | None = None,
        max_epochs: int | None = None,
        cache_dir: str | None = None,
        bpe_dropout: float = 0.0,
    ):
        super().__init__()
        self.cache_dir = cache_dir  # datasets' arrow cache for map-style loading
        if label_source not in LABEL_SOURCES:
            raise ConfigError(f"label_source must be one of {LABEL_SOURCES}, got {label_source!r}")
        if stopping_strategy not in STOPPING_STRATEGIES:
            raise DataError(
                f"data.stopping_strategy must be one of {STOPPING_STRATEGIES}, got {stopping_strategy!r}"
            )
        if label_source == "pseudo" and not pseudo_labels_dir:
            raise DataError("training on pseudo-labels needs pseudo_labels_dir (data.pseudo_labels_dir)")
        self.entries = dataset_entries(datasets)
        self.val_entries = dataset_entries(validation_datasets) if validation_datasets else []
        self.processor_dir = str(processor_dir)
        self.label_source = label_source
        self.pseudo_labels_dir = pseudo_labels_dir
        self.streaming = streaming
        self.validation_splits = list(validation_splits or [])
        self.batch_size = int(batch_size)
        self.val_batch_size = int(val_batch_size)
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.stopping_strategy = stopping_strategy
        self.shuffle = shuffle
        self.shuffle_buffer_size = shuffle_buffer_size
        if wer_threshold is not None and label_source == "text":
            log.warning(
                "data.wer_threshold=%s is ignored: this loss trains on the reference text, which has no "
                "pseudo-label WER",
                wer_threshold,
            )
            wer_threshold = None
        for key, value in (
            ("max_compression_ratio", max_compression_ratio),
            ("max_tokens_per_second", max_tokens_per_second),
        ):
            if value is not None and (not isinstance(value, int | float) or value <= 0):
                raise ConfigError(
                    f"data.{key}={value!r}: give a positive number, or null to turn the filter off"
                )
        pseudo = label_source == "pseudo"  # the pseudo-label rules do not apply to reference text
        self.filters = {
            "wer_threshold": wer_threshold,
            "wer_inclusive": wer_inclusive,
            "drop_uppercase": drop_uppercase and pseudo,
            "drop_truncated": drop_truncated and pseudo,
            "min_duration_s": min_duration_s,
            "max_duration_s": max_duration_s,
            "max_label_length": max_label_length,
            # hallucination signals of pseudo-labels without references (reference text is what it is)
            "max_compression_ratio": max_compression_ratio if pseudo else None,
            "max_tokens_per_second": max_tokens_per_second if pseudo else None,
        }
        self.max_label_length = max_label_length
        self.timestamp_probability = timestamp_probability
        self.condition_on_prev_probability = condition_on_prev_probability
        self.max_train_samples = max_train_samples
        self.max_val_samples = max_val_samples
        self.count_streamed_filters = count_streamed_filters
        self.language, self.task = language, task
        self.encoder_cache = encoder_cache
        self.bpe_dropout = float(bpe_dropout)  # augment.bpe_dropout: training labels only (the collator)
        self.max_epochs = max_epochs
        self.filter_stats: dict[str, FilterStats] = {}
        self.val_names: list[str] = []
        self.val_sets: list[torch.utils.data.Dataset] = []
        self.train_stream: TrainStream | None = None
        self._prepared = False
        self._resumed_at = (0, 0)  # (global step, consumed global batches) of the checkpoint resumed from

    # ------------------------------------------------------------------ set-up

    def _processor(self):
        from transformers import WhisperFeatureExtractor, WhisperTokenizerFast

        fe = WhisperFeatureExtractor.from_pretrained(self.processor_dir)
        tok = WhisperTokenizerFast.from_pretrained(self.processor_dir)
        return fe, tok

    def make_collator(self) -> SpeechCollator:
        fe, tok = self._processor()
        return SpeechCollator(
            fe,
            tok,
            label_source=self.label_source,
            timestamp_probability=self.timestamp_probability,
            condition_on_prev_probability=self.condition_on_prev_probability,
            max_label_length=self.max_label_length,
            seed=self.seed,
            language=self.language,
            task=self.task,
            encoder_cache=self.encoder_cache,
            bpe_dropout=self.bpe_dropout,
        )

    def source_path(self, entry: DatasetEntry) -> str:
        if self.label_source == "pseudo":
            return str(Path(self.pseudo_labels_dir) / entry.name)
        return str(entry.path)

    def load_train_sources(self) -> list[TrainSource]:
        """Load, validate and filter every training split (errors here come before any training)."""
        collator = self.collator
        sources = []
        for entry in self.entries:
            path = self.source_path(entry)
            for split in entry.splits:
                src_entry, ds = open_train_split(
                    entry, split, path, self.label_source, streaming=self.streaming, cache_dir=self.cache_dir
                )
                names = column_names(ds)
                if self.filters["wer_threshold"] is not None and (
                    entry.text_column is None or entry.text_column not in names
                ):
                    raise DataError(
                        f"data.wer_threshold is set but dataset {entry.name!r} split {split!r} has no reference "
                        f"text ({entry.key}.text_column={entry.text_column!r}), so its pseudo-label WER is "
                        "undefined; set data.wer_threshold=null, or train on datasets with references"
                    )
                # Raw data is decoded here, once, and checked as labelling checks clips (collator.decoded_problem);
                # otherwise the audio is read only for durations from headers.
                needs_audio = self.label_source == "text" or (
                    src_entry.duration_column not in names
                    and any(self.filters[k] is not None for k in DURATION_FILTERS)
                )
                source = filter_source(
                    src_entry,
                    split,
                    ds,
                    lambda row: collator.drop_reason(row, self.filters),
                    needs_audio=needs_audio,
                    count_streamed=self.count_streamed_filters,
                    part=self._rank_world() if self.streaming else (0, 1),
                )
                if source.stats is not None and self.streaming:
                    source.stats = self._sum_over_ranks(source.stats)
                if source.stats is not None:
                    self._log_stats(source.stats)
                sources.append(source)
        return sources

    def _sum_over_ranks(self, stats: FilterStats) -> FilterStats:
        """Each rank counted its own part of a stream; every rank needs the totals (the same sources kept)."""
        if self._rank_world()[1] == 1 or not torch.distributed.is_initialized():
            return stats
        gathered: list[FilterStats | None] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, stats)
        total = FilterStats(stats.source)
        for part in gathered:
            total.merge(part)
        return total

    def data_fingerprint(self) -> dict[str, Any]:
        """What the training data is, per source, without reading it: the data files of a local split (names,
        sizes, modification times), or the Hub id/config/split. A resumed run compares it with its start."""
        return {
            entry.source(split): split_fingerprint(entry, split, self.source_path(entry))
            for entry in self.entries
            for split in entry.splits
        }

    def _log_stats(self, stats: FilterStats) -> None:
        self.filter_stats[stats.source] = stats
        log.info("training data filter: %s", stats.summary())
        if stats.kept == 0:  # a threshold sweep may empty one dataset: train on the others
            log.warning("every sample of %s was filtered out; it is left out of the mixture", stats.source)

    def build_mixture(self, sources: list[TrainSource]) -> _MapMixture | _StreamMixture:
        sources = [s for s in sources if s.stats is None or s.stats.kept > 0]
        if not sources:
            summary = "; ".join(s.summary() for s in self.filter_stats.values())
            raise DataError(
                f"every training sample was filtered out ({summary}); relax data.wer_threshold, "
                "data.min_duration_s/max_duration_s or data.max_label_length"
            )
        probs = sampling_probabilities([s.entry.split_weight(s.split) for s in sources])
        if self.streaming:
            mixed = datasets.interleave_datasets(
                [s.dataset for s in sources],
                probabilities=probs,
                seed=self.seed,
                stopping_strategy=self.stopping_strategy,
            )
            if self.max_train_samples is not None:
                mixed = mixed.take(int(self.max_train_samples))
            return _StreamMixture(mixed, self.shuffle_buffer_size)
        return _MapMixture(
            sources, probs, self.seed, self.stopping_strategy, self.shuffle, self.max_train_samples
        )

    def validation_entries(self) -> list[tuple[DatasetEntry, str]]:
        """(entry, split) of every validation set: `validation_splits` of the training entries that have
        them (read from the entry's own path, references only), then the extra `validation_datasets`."""
        return validation_entries(self.entries, self.validation_splits, self.val_entries)

    def validation_set_names(self) -> tuple[list[str], list[str | None]]:
        """(name, language) of every validation set, from the config alone (no data is read)."""
        entries = self.validation_entries()
        return [entry.source(split) for entry, split in entries], [entry.language for entry, _ in entries]

    def setup(self, stage: str | None = None) -> None:
        if self._prepared:
            return
        self.collator = self.make_collator()
        sources = self.load_train_sources()
        self.mixture = self.build_mixture(sources)
        self.val_names, self.val_sets = load_validation_sets(
            self.validation_entries(), self.streaming, self.cache_dir, self.max_val_samples
        )
        self._prepared = True

    # ------------------------------------------------------------------ loaders

    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return int(trainer.global_rank), int(trainer.world_size)

    def consumed_batches(self) -> int:
        """Global batches already trained on (for an exact resume): those recorded in the checkpoint resumed
        from, plus steps since then x accumulation x ranks. Recorded, not recomputed from the current
        settings, so a checkpoint of a 2-process run resumed in 1 process (or with another accumulation)
        skips the batches that run trained on, not `global_step` batches."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0
        step, consumed = self._resumed_at
        per_step = int(trainer.accumulate_grad_batches) * int(trainer.world_size)
        return consumed + (int(trainer.global_step) - step) * per_step

    def _stream_parts(self) -> int:
        return self._rank_world()[1] * max(1, self.num_workers)

    def _accumulation(self) -> int:
        trainer = getattr(self, "trainer", None)
        return int(trainer.accumulate_grad_batches) if trainer is not None else 1

    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint (Lightning calls it): where the training stream stands."""
        trainer = getattr(self, "trainer", None)
        return {
            "global_step": int(trainer.global_step) if trainer is not None else 0,
            "consumed_batches": self.consumed_batches(),
            "stream_parts": self._stream_parts(),
            "accumulate_grad_batches": self._accumulation(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resumed_at = (int(state["global_step"]), int(state["consumed_batches"]))
        saved = state.get("accumulate_grad_batches", self._accumulation())
        if saved != self._accumulation():
            log.warning(
                "resuming with trainer.accumulate_grad_batches=%s instead of %s: the data continues where it "
                "stopped, but Lightning counts accumulation from its restored batch counter, so the first "
                "optimiser step may accumulate fewer batches",
                self._accumulation(),
                saved,
            )
        if self.streaming and state.get("stream_parts") != self._stream_parts():
            log.warning(
                "resuming a streamed run with %s reading processes (ranks x data.num_workers) instead of %s: "
                "each process reads another part of the stream now, so the resumed run skips as many batches as "
                "were trained on, but not exactly those (map-style data resumes exactly)",
                self._stream_parts(),
                state.get("stream_parts"),
            )

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        self.train_stream = TrainStream(
            self.mixture,
            self.collator,
            self.batch_size,
            self.seed,
            shuffle=self.shuffle,
            rank=rank,
            world_size=world,
            max_epochs=self.max_epochs,
        )
        self.train_stream.start_batch = self.consumed_batches()
        return DataLoader(
            self.train_stream,
            batch_size=None,  # TrainStream yields whole batches
            num_workers=self.num_workers,
            persistent_workers=False,  # workers must see this iteration's start_batch
            pin_memory=torch.cuda.is_available(),
        )

    def val_dataloader(self) -> list[DataLoader]:
        return [
            DataLoader(
                ds,
                batch_size=self.val_batch_size,
                shuffle=False,
                num_workers=self.num_workers,
                collate_fn=self.collator.validation,
            )
            for ds in self.val_sets
        ]
