"""Stage 1: the teacher pseudo-labels every clip (`python -m distil.pseudo_label teacher=... data=...`).

For each dataset entry and split, the output is one Hugging Face dataset of parquet files at
`<out_dir>/<dataset name>/<split>/` (default `${paths.pseudo_labels}/<teacher.name>/...`), holding every
input column plus:

- `whisper_transcript`: the label exactly as training tokenises it, special prefix and (with
  `return_timestamps`) `<|0.00|>` tokens included, e.g. `<|startoftranscript|><|notimestamps|> Hi.<|endoftext|>`;
- `token_ids`: the same sequence as ids (prefix, generated tokens, end-of-text);
- `pseudo_label`: the plain text (special tokens and timestamps removed, stripped);
- `pl_wer`: percent WER of `pseudo_label` against the reference text (English normaliser for English,
  basic otherwise); null for audio-only data or an empty normalised reference;
- `pl_index`: the unit's position in dataset order (the clip's original index without packing);
- `language` for multilingual teachers; `packed_ids`, `pl_continues` and `prompt` with packing.

Resume: work is cut into shards of `shard_size` units (fewer in a split too small for `min_shards` shards of
that size: `split_shard_size`; see `distil.datamodules.labelling`); a shard's
parquet file is written to a temp name and renamed, then its manifest `_progress/part-K.json`; a shard is
complete iff its manifest exists. Restarting the same command labels only what is missing. SIGTERM or SIGUSR1
(a scheduler's notice) stops labelling once the shard in hand is written, with exit status 1 (`ShardWriter`).
When every shard is complete (whichever job or rerun sees that first), the split is finalised: prompts filled
in (packing), `skipped.jsonl`, `distil_labels.json` (teacher + fingerprint + generation config), `summary.json`,
then the `_SUCCESS` marker. Readers must require `_SUCCESS`.

Parallelism: ranks take whole shards. On GPU, `trainer.devices=auto` is Lightning's (one process per GPU). On
CPU it means one forked single-threaded process per core (`threads_per_process`), capped at the number of
shards still to label (see `resolve_parallelism`): on 2 cores this labels ~2x faster than one 2-thread process,
because Whisper's decoder is a long chain of small matrix products that intra-op threads only slow down.
`this_run` (count, audio seconds, wall time of `Trainer.predict`, i.e. start-up + decode + features +
generation + writing) is read back from the manifests that this run's ranks wrote.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from distil.config.choices import known_choices
from distil.config.schema import validate
from distil.data.encoder_cache import EncoderCache, cache_fingerprint
from distil.data.entries import (
    DataConfigError,
    DatasetEntry,
    check_input_ids,
    column_names,
    dataset_entries,
    load_split,
    validate_columns,
)
from distil.data.label_jobs import incomplete_state, merge, split_states, try_finalise
from distil.data.label_plan import LabellingSpec, check_packing_limits, split_shard_size
from distil.data.label_store import (
    LABEL_COLUMNS,
    PROGRESS,
    SUCCESS,
    ShardWriter,
    check_plan,
    complete_shards,
    input_fingerprint,
    output_features,
    plan_record,
    record_extent,
    run_record,
    split_dir,
)
from distil.datamodules.labelling import LabellingDataModule, LabellingProgressBar, LabellingSource
from distil.modules.transcriber import GenerationSettings, WhisperTranscriber, check_generation
from distil.utils.errors import one_line_errors
from distil.utils.io import ensure_writable_directory, read_json, writable_home, write_json_atomic
from distil.utils.parallel import TorchThreads, on_cpu, resolve_parallelism, usable_cores
from distil.utils.paths import CONF_DIR
from distil.utils.progress import ProgressLog
from distil.utils.runinfo import hydra_output_dir, write_run_info
from distil.utils.tensorboard import write_tensorboard
from distil.whisper.models import weights_fingerprint

log = logging.getLogger(__name__)


def _teacher_record(cfg: DictConfig) -> tuple[str, dict]:
    from distil.whisper.models import model_fingerprint, resolve_model

    model_dir = resolve_model(cfg.teacher, models_root=cfg.paths.models)
    return model_dir, {
        "name": cfg.teacher.name,
        "fingerprint": model_fingerprint(model_dir),
        "path": str(model_dir),
    }


def _load_inputs(cfg: DictConfig) -> list[tuple[DatasetEntry, str, Any]]:
    """Load and check every dataset split before the teacher is touched: columns, the text column's type (from the
    schema) and, map-style, that the ids are unique (reading only the id column). A stream is not read twice for
    its ids: there a duplicate is found when the split is finalised."""
    entries = dataset_entries(cfg.data.datasets)
    without_speaker = cfg.packing.get("without_speaker")  # null or clips (distil.config.schema)
    loaded = []
    for entry in entries:
        for split in entry.splits:
            ds = load_split(entry, split, streaming=cfg.streaming, cache_dir=cfg.get("cache_dir"))
            need_speaker = cfg.packing.enabled and without_speaker is None
            validate_columns(entry, split, column_names(ds), need_speaker=need_speaker, features=ds.features)
            if entry.id_column and not cfg.streaming:
                check_input_ids(entry, split, ds.with_format("arrow")[entry.id_column].to_pylist())
            if cfg.packing.enabled and not packs(cfg, entry) and split == entry.splits[0]:
                log.warning(
                    "dataset %r has no speaker column: its clips are labelled one by one, not packed "
                    "(packing.without_speaker=clips)",
                    entry.name,
                )
            loaded.append((entry, split, ds))
    return loaded


def packs(cfg: DictConfig, entry: DatasetEntry) -> bool:
    """Whether this dataset's clips are packed: packing is on and it says who speaks (packing never crosses a
    speaker change; `packing.without_speaker=clips` labels speakerless datasets clip by clip)."""
    return bool(cfg.packing.enabled) and entry.speaker_column is not None


def _trainer(cfg: DictConfig, run_dir: Path, callbacks: list, work_items: int | None = None) -> L.Trainer:
    t = cfg.trainer
    devices, strategy, threads = resolve_parallelism(
        t.devices,
        t.strategy,
        cfg.get("threads_per_process", "auto"),
        cpu=on_cpu(t.accelerator),
        cores=usable_cores(),
        work_items=work_items,
        fork="fork" in multiprocessing.get_all_start_methods(),
    )
    if threads is not None:
        callbacks = [*callbacks, TorchThreads(threads)]
    log.info("pseudo-labelling with devices=%s strategy=%s threads/process=%s", devices, strategy, threads)
    return L.Trainer(
        accelerator=t.accelerator,
        devices=devices,
        num_nodes=t.num_nodes,
        strategy=strategy,
        logger=TensorBoardLogger(str(run_dir), name="tensorboard", version=""),
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_model_summary=False,
        use_distributed_sampler=False,  # shards are already split by rank
        inference_mode=True,
        enable_progress_bar=bool(cfg.progress_bar),
    )


def label_split(
    cfg: DictConfig,
    entry: DatasetEntry,
    split: str,
    ds,
    teacher: WhisperTranscriber,
    feature_extractor,
    teacher_meta: dict,
    run_dir: Path,
    extra_callbacks: Sequence[Any] = (),
) -> dict:
    out_dir = split_dir(cfg.out_dir, entry.name, split)
    language = entry.language or cfg.generation.language
    packing = packs(cfg, entry)
    plan = plan_record(cfg, entry, split, teacher_meta, input_fingerprint(ds, entry), packing)
    if (out_dir / SUCCESS).exists():
        # Finished labels: the shard layout no longer matters (the split is reused under any shard settings).
        check_plan(out_dir, plan, ignore=("shard_size",))
        summary = read_json(out_dir / "summary.json")
        log.info("%s/%s already labelled in %s", entry.name, split, out_dir)
        return {**summary, "status": "complete", "out_dir": str(out_dir), "this_run": None}
    out_dir.mkdir(parents=True, exist_ok=True)
    done = complete_shards(out_dir)
    spec = LabellingSpec(
        entry=entry,
        split=split,
        shard_size=int(cfg.shard_size),
        packing=packing,
        max_seconds=float(cfg.packing.max_seconds if packing else 30.0),
        min_seconds=None if cfg.packing.min_seconds is None else float(cfg.packing.min_seconds),
        single_probability=cfg.packing.get("single_probability"),
        job_index=int(cfg.shard.index),
        job_count=int(cfg.shard.count),
        done=done,
        claims_dir=str(out_dir / PROGRESS),
        cache_keys=bool(cfg.encoder_cache.enabled),
    )
    source = LabellingSource(ds, spec, streaming=bool(cfg.streaming))  # map-style: plans the units
    spec.shard_size = plan["shard_size"] = split_shard_size(
        source.num_units, int(cfg.shard_size), int(cfg.min_shards), int(cfg.batch_size)
    )
    check_plan(out_dir, plan)
    labels_meta = {**plan, "columns_added": list(LABEL_COLUMNS)}
    if source.num_units is not None:
        record_extent(out_dir, source.num_units, source.skipped_in_planning, spec.shard_size)
    else:
        source.on_stream_end = functools.partial(record_extent, out_dir, shard_size=spec.shard_size)

    features, id_column = output_features(ds, entry, teacher.multilingual, packing)
    writer = ShardWriter(out_dir, entry, features, id_column, language, packing, {"teacher": teacher_meta})
    progress = ProgressLog(float(cfg.progress_log_every_s), predict_name=f"labelling {entry.name}/{split}")
    callbacks = [writer, progress, *extra_callbacks]
    if cfg.progress_bar:
        callbacks.append(LabellingProgressBar(writer))
    datamodule = LabellingDataModule(source, feature_extractor, int(cfg.batch_size), int(cfg.num_workers))
    pending = None if source.num_shards is None else sum(spec.wanted(k) for k in range(source.num_shards))
    trainer = _trainer(cfg, run_dir, callbacks, work_items=pending)
    started = time.perf_counter()
    # Both warnings are expected here: lengths are per rank, and batches carry their own unit ids.
    with warnings.catch_warnings(), writer.catch_stop_signals(trainer):  # SIGTERM: finish the shard, stop
        warnings.filterwarnings("ignore", message=r".*`IterableDataset` has `__len__` defined.*")
        warnings.filterwarnings("ignore", message=r"Couldn't infer the batch indices.*")
        warnings.filterwarnings("ignore", message=r"You have overridden `transfer_batch_to_device`.*")
        trainer.predict(teacher, datamodule=datamodule, return_predictions=False)
    seconds = time.perf_counter() - started
    trainer.strategy.barrier()
    this_run = run_record(out_dir, done, spec, seconds)
    summary = None
    if trainer.is_global_zero:
        summary = try_finalise(out_dir, entry, language, packing, labels_meta)
    if writer.stop_signal is not None:
        raise LabellingStopped(writer.stop_signal, out_dir)
    if summary is None:
        missing, message = incomplete_state(out_dir)
        (log.warning if trainer.is_global_zero else log.debug)("%s/%s: %s", entry.name, split, message)
        return {
            "status": "incomplete",
            "missing_shards": missing,
            "out_dir": str(out_dir),
            "this_run": this_run,
        }
    print(
        f"{entry.source(split)}: {summary['samples']} samples, {summary['audio_hours']:.3f} h, "
        f"WER {summary['wer'] if summary['wer'] is None else round(summary['wer'], 2)}%, "
        f"{summary['skipped']} skipped (listed in {out_dir / 'skipped.jsonl'})"
    )
    return {**summary, "status": "complete", "out_dir": str(out_dir), "this_run": this_run}


class LabellingStopped(SystemExit):
    """SIGTERM or SIGUSR1 stopped labelling after the shard in hand: exit non-zero with one line (the shards
    written so far are kept, and the same command labels the rest)."""

    def __init__(self, signal_name: str, out_dir: Path):
        super().__init__(
            f"stopped by {signal_name}: the shards labelled so far are kept in {out_dir}; rerun the same command "
            "to resume"
        )


def _check_encoder_cache(cfg: DictConfig, entries: Sequence[DatasetEntry]) -> None:
    """Before the teacher loads: the cache can be written, and training will find what is written."""
    if cfg.dtype != "fp32":
        # The cache directory is named by the encoder weights' fingerprint: a bf16/fp16 teacher's would not be
        # the fp32 student's, so training would never read these entries.
        raise DataConfigError(
            f"encoder_cache.enabled needs dtype=fp32 (got {cfg.dtype}): training looks up the fp32 encoder's "
            "outputs; use dtype=fp32 or encoder_cache.enabled=false"
        )
    ensure_writable_directory(cfg.encoder_cache.dir, "encoder_cache.dir")
    for entry in entries:
        if not entry.id_column:
            log.warning(
                "%s has no id column (%s.id_column): its encoder outputs cannot be keyed as training keys them, "
                "so encoder_cache.enabled stores none of them (training's first epoch computes them)",
                entry.name,
                entry.key,
            )


def pseudo_label(cfg: DictConfig, run_dir: str | Path | None = None, callbacks: Sequence[Any] = ()) -> dict:
    """Label every configured split; return {"splits": {"<dataset>/<split>": summary}, ...}."""
    run_dir = (
        Path(run_dir) if run_dir else hydra_output_dir() or Path(cfg.paths.runs) / "pseudo_label" / "latest"
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    inputs = _load_inputs(cfg)  # missing columns are reported here, before the teacher is loaded
    ensure_writable_directory(cfg.out_dir, "out_dir")  # a read-only output: before the teacher loads
    if not 0 <= int(cfg.shard.index) < int(cfg.shard.count):
        raise DataConfigError(
            f"shard.index must be in [0, shard.count), got {cfg.shard.index}/{cfg.shard.count}"
        )
    if cfg.packing.enabled:
        check_packing_limits(
            cfg.packing.min_seconds, cfg.packing.max_seconds, cfg.packing.get("single_probability")
        )
    if cfg.encoder_cache.enabled:
        _check_encoder_cache(cfg, [entry for entry, _, _ in inputs])
    settings = GenerationSettings(**OmegaConf.to_container(cfg.generation, resolve=True))
    model_dir, teacher_meta = _teacher_record(cfg)
    from transformers import GenerationConfig, WhisperFeatureExtractor

    check_generation(settings, GenerationConfig.from_pretrained(model_dir), cfg.teacher.name)
    teacher = WhisperTranscriber(
        model_dir, settings, dtype=cfg.dtype, attn_implementation=cfg.attn_implementation
    )
    feature_extractor = WhisperFeatureExtractor.from_pretrained(model_dir)
    if cfg.encoder_cache.enabled:  # the key training will look for: the same encoder weights and features
        fingerprint = cache_fingerprint(weights_fingerprint(teacher.model.model.encoder), feature_extractor)
        teacher.set_encoder_cache(EncoderCache(cfg.encoder_cache.dir, fingerprint))

    results = {}
    for entry, split, ds in inputs:
        results[entry.source(split)] = label_split(
            cfg, entry, split, ds, teacher, feature_extractor, teacher_meta, run_dir, callbacks
        )
    summary = {"teacher": teacher_meta, "generation": settings.to_dict(), "splits": results}
    write_json_atomic(run_dir / "summary.json", summary)
    scalars = {
        name: {
            **{key: s.get(key) for key in ("wer", "samples", "audio_hours", "skipped")},
            "audio_seconds_per_second": (s.get("this_run") or {}).get("audio_seconds_per_second"),
        }
        for name, s in results.items()
        if s.get("status") == "complete"
    }
    write_tensorboard(run_dir, {"pseudo_label": scalars})
    return summary


def run_command(cfg: DictConfig) -> dict[str, Any]:
    """What `distil-pseudo-label` does with its composed config (also `distil.run("pseudo_label", ...)`): the
    labelling summary ({"splits": ...}), or {"plan": ...} with dry_run=true (printed too)."""
    validate(cfg, "pseudo_label")  # every key's type and range, before any model or data loads
    if cfg.get("dry_run"):
        from distil.training.sizing import estimate_labelling
        from distil.utils.launch import launcher_plan, model_plan, print_dry_run, trainer_plan

        plan = {
            "mode": "merge finished shards" if cfg.get("merge") else "label",
            "teacher": model_plan(cfg.teacher),
            "dtype": cfg.dtype,
            "attn_implementation": cfg.attn_implementation,
            "shard": {
                "index": int(cfg.shard.index),
                "count": int(cfg.shard.count),
                "shard_size": int(cfg.shard_size),
            },
            "splits": split_states(cfg),
            "trainer": {**trainer_plan(cfg.trainer), "threads_per_process": cfg.get("threads_per_process")},
            "run_directory": str(hydra_output_dir()),
            "launcher": launcher_plan(cfg, "distil-pseudo-label"),
            "estimate": estimate_labelling(cfg),
        }
        print_dry_run("distil-pseudo-label", plan)
        return {"plan": plan}
    write_run_info(cfg)
    return merge(cfg) if cfg.get("merge") else pseudo_label(cfg)


@writable_home
@known_choices  # an unknown option of a config group (model=nope): one line before Hydra composes
@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="pseudo_label")
@one_line_errors
def main(cfg: DictConfig) -> float | None:
    summary = run_command(cfg)
    wers = [s["wer"] for s in summary.get("splits", {}).values() if s.get("wer") is not None]
    return sum(wers) / len(wers) if wers else None


if __name__ == "__main__":
    main()
