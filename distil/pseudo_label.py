"""Stage 1: the teacher pseudo-labels every clip (`python -m distil.pseudo_label teacher=... data=...`).

For each dataset entry and split, the output is one Hugging Face dataset of parquet files at
`<output_dir>/<dataset name>/<split>/` (default `${paths.pseudo_labels}/<teacher.name>/...`), holding every
input column plus:

- `whisper_transcript`: the label exactly as training tokenises it, special prefix and (with
  `return_timestamps`) `<|0.00|>` tokens included, e.g. `<|startoftranscript|><|notimestamps|> Hi.<|endoftext|>`;
- `token_ids`: the same sequence as ids (prefix, generated tokens, end-of-text);
- `pseudo_label`: the plain text (special tokens and timestamps removed, stripped);
- `pl_wer`: percent WER of `pseudo_label` against the reference text (English normaliser for English,
  basic otherwise); null for audio-only data or an empty normalised reference;
- `pl_index`: the unit's position in dataset order (the clip's original index without packing);
- `language` for multilingual teachers; `packed_ids`, `pl_continues` and `prompt` with packing.

Resume: work is cut into shards of `shard_size` units (see `distil.datamodules.labelling`); a shard's
parquet file is written to a temp name and renamed, then its manifest `_progress/part-K.json`; a shard is
complete iff its manifest exists. Restarting the same command labels only what is missing. When every shard
is complete (whichever job or rerun sees that first), the split is finalised: prompts filled in (packing),
`skipped.jsonl`, `distil_labels.json` (teacher + fingerprint + generation config), `summary.json`, then the
`_SUCCESS` marker. Readers must require `_SUCCESS`.

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

import datasets
import hydra
import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from distil.data.entries import (
    DataConfigError,
    DatasetEntry,
    column_names,
    dataset_entries,
    load_split,
    validate_columns,
)
from distil.data.label_plan import LabellingSpec
from distil.data.label_store import (
    LABEL_COLUMNS,
    PROGRESS,
    SUCCESS,
    ShardWriter,
    check_plan,
    complete_shards,
    finalise_owner,
    id_output_column,
    input_fingerprint,
    live_claims,
    output_features,
    plan_record,
    record_extent,
    run_record,
    split_dir,
    total_shards,
    try_finalise,
)
from distil.datamodules.labelling import LabellingDataModule, LabellingSource
from distil.modules.transcriber import GenerationSettings, WhisperTranscriber, check_generation
from distil.utils.errors import InputError, one_line_errors
from distil.utils.io import ensure_writable_directory, read_json, write_json_atomic
from distil.utils.parallel import TorchThreads, on_cpu, resolve_parallelism, usable_cores
from distil.utils.paths import CONF_DIR
from distil.utils.runinfo import hydra_output_dir, write_run_info

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------------
# Small pure helpers
# ------------------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------------------
# Output schema and shard writing
# ------------------------------------------------------------------------------------------------------


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


# ------------------------------------------------------------------------------------------------------
# Plan, finalise, summarise
# ------------------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------------------
# The stage
# ------------------------------------------------------------------------------------------------------
def _teacher_record(cfg: DictConfig) -> tuple[str, dict]:
    from distil.whisper.models import model_fingerprint, resolve_model

    model_dir = resolve_model(cfg.teacher, models_root=cfg.paths.models)
    return model_dir, {
        "name": cfg.teacher.name,
        "fingerprint": model_fingerprint(model_dir),
        "path": str(model_dir),
    }


def _load_inputs(cfg: DictConfig) -> list[tuple[DatasetEntry, str, Any]]:
    """Load and check every dataset split before the teacher is touched."""
    entries = dataset_entries(cfg.data.datasets)
    loaded = []
    for entry in entries:
        for split in entry.splits:
            ds = load_split(entry, split, streaming=cfg.streaming, cache_dir=cfg.get("cache_dir"))
            validate_columns(entry, split, column_names(ds), need_speaker=cfg.packing.enabled)
            loaded.append((entry, split, ds))
    return loaded


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
    out_dir = split_dir(cfg.output_dir, entry.name, split)
    language = entry.language or cfg.generation.language
    packing = bool(cfg.packing.enabled)
    plan = plan_record(cfg, entry, split, teacher_meta, input_fingerprint(ds, entry))
    labels_meta = {**plan, "columns_added": list(LABEL_COLUMNS)}
    if (out_dir / SUCCESS).exists():
        check_plan(out_dir, plan)
        summary = read_json(out_dir / "summary.json")
        log.info("%s/%s already labelled in %s", entry.name, split, out_dir)
        return {**summary, "status": "complete", "output_dir": str(out_dir), "this_run": None}
    out_dir.mkdir(parents=True, exist_ok=True)
    check_plan(out_dir, plan)

    done = complete_shards(out_dir)
    spec = LabellingSpec(
        entry=entry,
        split=split,
        shard_size=int(cfg.shard_size),
        packing=packing,
        max_seconds=float(cfg.packing.max_seconds if packing else 30.0),
        job_index=int(cfg.shard.index),
        job_count=int(cfg.shard.count),
        done=done,
        claims_dir=str(out_dir / PROGRESS),
    )
    source = LabellingSource(ds, spec, streaming=bool(cfg.streaming))
    if source.num_units is not None:
        record_extent(out_dir, source.num_units, source.skipped_in_planning, spec.shard_size)
    else:
        source.on_stream_end = functools.partial(record_extent, out_dir, shard_size=spec.shard_size)

    if isinstance(ds, datasets.IterableDataset):
        features = ds._resolve_features().features if ds.features is None else ds.features
    else:
        features = ds.features
    id_column = id_output_column(entry, list(features))
    features = output_features(features, entry, id_column, teacher.multilingual, packing)
    writer = ShardWriter(out_dir, entry, features, id_column, language, packing, {"teacher": teacher_meta})
    callbacks = [writer, *extra_callbacks]
    if cfg.progress_bar:
        callbacks.append(LabellingProgressBar(writer))
    datamodule = LabellingDataModule(source, feature_extractor, int(cfg.batch_size), int(cfg.num_workers))
    pending = None if source.num_shards is None else sum(spec.wanted(k) for k in range(source.num_shards))
    trainer = _trainer(cfg, run_dir, callbacks, work_items=pending)
    started = time.perf_counter()
    # Both warnings are expected here: lengths are per rank, and batches carry their own unit ids.
    with warnings.catch_warnings():
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
    if summary is None:
        n = total_shards(out_dir)
        missing = None if n is None else sorted(set(range(n)) - complete_shards(out_dir))
        owner = finalise_owner(out_dir)
        if owner is not None:
            message = (
                f"another process (pid {owner.get('pid')} on {owner.get('host')}) has been finalising "
                f"{out_dir} for {owner['age_s']:.0f} s (lock {owner['lock']}); it writes {SUCCESS} when done"
            )
        elif claimed := live_claims(out_dir):
            message = (
                f"shards {claimed} are being labelled by another live run on this output; it (or the last "
                "run to finish) merges them"
            )
        else:
            message = (
                f"{'some' if missing is None else len(missing)} shards still missing {missing or ''}: other "
                f"jobs (shard.index/shard.count) own them; run those jobs, or this command without "
                "shard.* overrides, to label them and merge"
            )
        (log.warning if trainer.is_global_zero else log.debug)("%s/%s: %s", entry.name, split, message)
        return {
            "status": "incomplete",
            "missing_shards": missing,
            "output_dir": str(out_dir),
            "this_run": this_run,
        }
    print(
        f"{entry.name}/{split}: {summary['samples']} samples, {summary['audio_hours']:.3f} h, "
        f"WER {summary['wer'] if summary['wer'] is None else round(summary['wer'], 2)}%, "
        f"{summary['skipped']} skipped (listed in {out_dir / 'skipped.jsonl'})"
    )
    return {**summary, "status": "complete", "output_dir": str(out_dir), "this_run": this_run}


def pseudo_label(cfg: DictConfig, run_dir: str | Path | None = None, callbacks: Sequence[Any] = ()) -> dict:
    """Label every configured split; return {"splits": {"<dataset>/<split>": summary}, ...}."""
    run_dir = (
        Path(run_dir) if run_dir else hydra_output_dir() or Path(cfg.paths.runs) / "pseudo_label" / "latest"
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    inputs = _load_inputs(cfg)  # missing columns are reported here, before the teacher is loaded
    ensure_writable_directory(cfg.output_dir, "output_dir")  # a read-only output: before the teacher loads
    if not 0 <= int(cfg.shard.index) < int(cfg.shard.count):
        raise DataConfigError(
            f"shard.index must be in [0, shard.count), got {cfg.shard.index}/{cfg.shard.count}"
        )
    settings = GenerationSettings(**OmegaConf.to_container(cfg.generation, resolve=True))
    model_dir, teacher_meta = _teacher_record(cfg)
    from transformers import GenerationConfig, WhisperFeatureExtractor

    check_generation(settings, GenerationConfig.from_pretrained(model_dir), cfg.teacher.name)
    teacher = WhisperTranscriber(
        model_dir, settings, dtype=cfg.dtype, attn_implementation=cfg.attn_implementation
    )
    feature_extractor = WhisperFeatureExtractor.from_pretrained(model_dir)

    results = {}
    for entry, split, ds in inputs:
        results[f"{entry.name}/{split}"] = label_split(
            cfg, entry, split, ds, teacher, feature_extractor, teacher_meta, run_dir, callbacks
        )
    summary = {"teacher": teacher_meta, "generation": settings.to_dict(), "splits": results}
    write_json_atomic(run_dir / "summary.json", summary)
    _log_tensorboard(run_dir, results)
    return summary


class LabellingIncompleteError(InputError):
    """`merge=true` on splits whose shards are not all labelled yet."""


def merge(cfg: DictConfig) -> dict:
    """`merge=true`: finalise every split whose shards are all written (e.g. by the jobs of a SLURM array whose
    last job died before merging), without loading the teacher or the audio; the settings are the ones the
    jobs recorded in `_progress/plan.json`. Splits that are already complete are left as they are. Raises
    `LabellingIncompleteError` naming the missing shards of every split that is not ready."""
    results: dict[str, dict] = {}
    not_ready: list[str] = []
    for entry in dataset_entries(cfg.data.datasets):
        for split in entry.splits:
            name, out_dir = f"{entry.name}/{split}", split_dir(cfg.output_dir, entry.name, split)
            plan_path = out_dir / PROGRESS / "plan.json"
            if (out_dir / SUCCESS).exists():
                results[name] = {**read_json(out_dir / "summary.json"), "status": "complete", "merged": False}
                continue
            if not plan_path.exists():
                not_ready.append(f"{name}: nothing labelled yet in {out_dir}")
                continue
            n = total_shards(out_dir)
            if n is None:
                not_ready.append(
                    f"{name}: the number of shards is not known yet (no job reached the end of the stream)"
                )
                continue
            missing = sorted(set(range(n)) - complete_shards(out_dir))
            if missing:
                shown = ", ".join(map(str, missing[:20])) + (", ..." if len(missing) > 20 else "")
                claimed = live_claims(out_dir)
                busy = f"; being labelled now: {claimed}" if claimed else ""
                not_ready.append(f"{name}: {len(missing)} of {n} shards missing ({shown}){busy}")
                continue
            plan = read_json(plan_path)
            labels_meta = {**plan, "columns_added": list(LABEL_COLUMNS)}
            language = entry.language or cfg.generation.language
            summary = try_finalise(out_dir, entry, language, plan.get("packing") is not None, labels_meta)
            if summary is None:  # another process holds the finalise lock
                owner = finalise_owner(out_dir) or {}
                not_ready.append(f"{name}: being merged by pid {owner.get('pid')} on {owner.get('host')}")
                continue
            print(f"{name}: merged {n} shards, {summary['samples']} samples into {out_dir}")
            results[name] = {**summary, "status": "complete", "merged": True}
    if not_ready:
        raise LabellingIncompleteError(
            "cannot merge: "
            + "; ".join(not_ready)
            + ". Shard k belongs to the job with shard.index = k mod shard.count: rerun those jobs (or this "
            "command without shard.* and merge, which labels what is missing and merges)"
        )
    return {"splits": results}


def dry_run_plan(cfg: DictConfig) -> dict:
    """What `distil-pseudo-label` would do: the splits, their state on disk and this job's share of the shards."""
    from distil.data.label_plan import job_owns
    from distil.utils.launch import trainer_plan

    index, count = int(cfg.shard.index), int(cfg.shard.count)
    splits = {}
    for entry in dataset_entries(cfg.data.datasets):
        for split in entry.splits:
            out_dir = split_dir(cfg.output_dir, entry.name, split)
            n, done = total_shards(out_dir), complete_shards(out_dir)
            if (out_dir / SUCCESS).exists():
                state = "complete"
            elif n is None:
                state = f"{len(done)} shards done, total not known until the data is read"
            else:
                mine = [k for k in range(n) if job_owns(k, index, count) and k not in done]
                state = f"{len(done)} of {n} shards done; this job labels {len(mine)}: {mine[:20]}"
            splits[f"{entry.name}/{split}"] = {
                "input": str(entry.path),
                "output": str(out_dir),
                "state": state,
            }
    return {
        "mode": "merge finished shards" if cfg.get("merge") else "label",
        "teacher": {
            "name": cfg.teacher.name,
            "source": cfg.teacher.get("source"),
            "path": cfg.teacher.get("path"),
        },
        "dtype": cfg.dtype,
        "attn_implementation": cfg.attn_implementation,
        "shard": {"index": index, "count": count, "shard_size": int(cfg.shard_size)},
        "splits": splits,
        "trainer": {**trainer_plan(cfg.trainer), "threads_per_process": cfg.get("threads_per_process")},
        "run_directory": str(hydra_output_dir()),
    }


def _log_tensorboard(run_dir: Path, results: dict) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(run_dir / "tensorboard")) as tb:
        for name, s in results.items():
            if s.get("status") != "complete":
                continue
            for key in ("wer", "samples", "audio_hours", "skipped"):
                if s.get(key) is not None:
                    tb.add_scalar(f"pseudo_label/{name}/{key}", s[key], 0)
            rate = (s.get("this_run") or {}).get("audio_seconds_per_second")
            if rate is not None:
                tb.add_scalar(f"pseudo_label/{name}/audio_seconds_per_second", rate, 0)


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="pseudo_label")
@one_line_errors
def main(cfg: DictConfig) -> float | None:
    if cfg.get("dry_run"):
        from distil.utils.launch import launcher_plan, print_dry_run

        print_dry_run(
            "distil-pseudo-label",
            {**dry_run_plan(cfg), "launcher": launcher_plan(cfg, "distil-pseudo-label")},
        )
        return None
    write_run_info(cfg)
    summary = merge(cfg) if cfg.get("merge") else pseudo_label(cfg)
    wers = [s["wer"] for s in summary["splits"].values() if s.get("wer") is not None]
    return sum(wers) / len(wers) if wers else None


if __name__ == "__main__":
    main()
