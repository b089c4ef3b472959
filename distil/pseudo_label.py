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
import json
import logging
import math
import multiprocessing
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import hydra
import lightning as L
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, Callback, TQDMProgressBar
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
from distil.data.text import corpus_wer, get_normalizer, identity, sample_wer
from distil.datamodules.labelling import LabellingDataModule, LabellingSource, LabellingSpec, Skip
from distil.modules.transcriber import GenerationSettings, WhisperTranscriber, check_generation
from distil.utils.paths import CONF_DIR
from distil.utils.runinfo import hydra_output_dir, write_run_info

log = logging.getLogger(__name__)

SUCCESS = "_SUCCESS"
PROGRESS = "_progress"
PROMPT_TOKEN = "<|startofprev|>"
LABEL_COLUMNS = ("whisper_transcript", "token_ids", "pseudo_label", "pl_wer", "pl_index")


class LabellingStateError(RuntimeError):
    """An output directory written with different settings than this run's."""


# ------------------------------------------------------------------------------------------------------
# Small pure helpers
# ------------------------------------------------------------------------------------------------------
def build_prompt(previous_text: str | None) -> str | None:
    """`<|startofprev|>` + the previous segment's text with Whisper's leading space; never doubled."""
    if previous_text is None:
        return None
    text = previous_text.strip()
    while text.startswith(PROMPT_TOKEN):
        text = text[len(PROMPT_TOKEN) :].strip()
    return f"{PROMPT_TOKEN} {text}" if text else None


def split_dir(output_dir: str | Path, dataset: str, split: str) -> Path:
    return Path(output_dir) / dataset / split


def shard_name(k: int) -> str:
    return f"part-{k:05d}"


def write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def id_output_column(entry: DatasetEntry, names: Sequence[str]) -> str:
    """Where sample ids live in the output: the id column, or a new `id` (`pl_id` if `id` is taken)."""
    if entry.id_column:
        return entry.id_column
    return "pl_id" if "id" in names else "id"


def normalizer_for(language: str | None):
    return get_normalizer(language or "en")


# ------------------------------------------------------------------------------------------------------
# Output schema and shard writing
# ------------------------------------------------------------------------------------------------------
def output_features(
    input_features: datasets.Features, entry: DatasetEntry, id_column: str, multilingual: bool, packing: bool
) -> datasets.Features:
    feats = dict(input_features)
    feats[entry.audio_column] = datasets.Audio(decode=False)
    if id_column not in feats:
        feats[id_column] = datasets.Value("string")
    feats["whisper_transcript"] = datasets.Value("string")
    feats["token_ids"] = datasets.List(datasets.Value("int32"))
    feats["pseudo_label"] = datasets.Value("string")
    feats["pl_wer"] = datasets.Value("float64")
    feats["pl_index"] = datasets.Value("int64")
    if multilingual:
        feats["language"] = datasets.Value("string")
    if packing:
        feats["packed_ids"] = datasets.List(datasets.Value("string"))
        feats["pl_continues"] = datasets.Value("bool")
        feats["prompt"] = datasets.Value("string")
    return datasets.Features(feats)


def write_table(table: pa.Table, features: datasets.Features, meta: dict, path: Path) -> None:
    """Write parquet with datasets' feature metadata (so Audio stays Audio) plus ours, atomically."""
    metadata = dict(table.schema.metadata or {})
    metadata[b"huggingface"] = json.dumps({"info": {"features": features.to_dict()}}).encode()
    metadata[b"distil"] = json.dumps(meta, default=str).encode()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table.replace_schema_metadata(metadata), tmp)
    os.replace(tmp, path)


class ShardWriter(BasePredictionWriter):
    """Collects each shard's labelled rows and writes the shard (parquet, then manifest) once it is whole."""

    def __init__(
        self,
        out_dir: Path,
        entry: DatasetEntry,
        features: datasets.Features,
        id_column: str,
        language: str | None,
        packing: bool,
        meta: dict,
    ):
        super().__init__(write_interval="batch")
        self.out_dir, self.entry, self.features, self.id_column = out_dir, entry, features, id_column
        self.language, self.packing, self.meta = language, packing, meta
        self.pending: dict[int, dict] = {}
        self.shards_written = 0
        self.units_done = 0
        self.audio_seconds = 0.0
        self.started = time.perf_counter()

    def label_row(self, row: dict, pred: dict, i: int) -> dict:
        out = {k: v for k, v in row.items() if not k.startswith("__")}
        out[self.id_column] = row["__id"]
        language = pred["language"][i] or self.language
        reference = row.get(self.entry.text_column) if self.entry.text_column else None
        out["whisper_transcript"] = pred["whisper_transcript"][i]
        out["token_ids"] = pred["token_ids"][i]
        out["pseudo_label"] = pred["pseudo_label"][i]
        out["pl_wer"] = sample_wer(reference, pred["pseudo_label"][i], normalizer_for(language))
        out["pl_index"] = row["__unit"]
        if "language" in self.features:
            out["language"] = pred["language"][i]
        if self.packing:
            out["pl_continues"] = bool(row["__continues"])
            out["prompt"] = None  # filled in when the split is finalised (needs the previous shard)
        return out

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0
    ):
        k = batch["shard"]
        state = self.pending.setdefault(
            k, {"rows": [], "skipped": [], "seen": 0, "audio_seconds": 0.0, "truncated": 0, "clips": 0}
        )
        for i, row in enumerate(batch["rows"]):
            state["rows"].append(self.label_row(row, prediction, i))
            state["audio_seconds"] += row["__audio_seconds"]
            state["truncated"] += int(prediction["truncated"][i])
            state["clips"] += len(row.get("packed_ids") or [0])
        state["skipped"] += [s.to_dict() if isinstance(s, Skip) else s for s in batch["skipped"]]
        state["seen"] += batch["n_units"]
        self.units_done += batch["n_units"]
        self.audio_seconds += sum(r["__audio_seconds"] for r in batch["rows"])
        if state["seen"] == batch["shard_units"]:
            self.write_shard(k, self.pending.pop(k))

    def write_shard(self, k: int, state: dict) -> None:
        rows = sorted(state["rows"], key=lambda r: r["pl_index"])
        path = self.out_dir / f"{shard_name(k)}.parquet"
        if rows:
            # pyarrow directly: datasets' Audio encoder would need torchcodec; rows already hold {bytes, path}.
            table = pa.Table.from_pylist(rows, schema=self.features.arrow_schema)
            write_table(table, self.features, self.meta, path)
        manifest = {
            "shard": k,
            "units": state["seen"],
            "labelled": len(rows),
            "clips": state["clips"],
            "skipped": sorted(state["skipped"], key=lambda s: s["indices"][0]),
            "audio_seconds": state["audio_seconds"],
            "truncated": state["truncated"],
            "file": path.name if rows else None,
        }
        write_json_atomic(self.out_dir / PROGRESS / f"{shard_name(k)}.json", manifest)
        self.shards_written += 1


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
def plan_record(cfg: DictConfig, entry: DatasetEntry, split: str, teacher: dict) -> dict:
    """Everything that decides the labels and the shard layout; a resumed run must match it."""
    return {
        "teacher": teacher,
        "generation": OmegaConf.to_container(cfg.generation, resolve=True),
        "dtype": cfg.dtype,
        "packing": OmegaConf.to_container(cfg.packing, resolve=True) if cfg.packing.enabled else None,
        "shard_size": int(cfg.shard_size),
        "dataset": {
            "name": entry.name,
            "path": str(entry.path),
            "config": entry.config,
            "split": split,
            "audio_column": entry.audio_column,
            "text_column": entry.text_column,
            "id_column": entry.id_column,
            "speaker_column": entry.speaker_column,
        },
    }


def check_plan(out_dir: Path, plan: dict) -> None:
    path = out_dir / PROGRESS / "plan.json"
    if path.exists():
        old = read_json(path)
        if old != json.loads(json.dumps(plan, default=str)):
            changed = sorted(
                k for k in set(old) | set(plan) if old.get(k) != json.loads(json.dumps(plan.get(k)))
            )
            raise LabellingStateError(
                f"{out_dir} holds labels made with different settings ({', '.join(changed)} differ). "
                "Rerun with the same settings to resume, or delete the directory (or set output_dir) to relabel."
            )
    else:
        write_json_atomic(path, plan)


def complete_shards(out_dir: Path) -> set[int]:
    progress = out_dir / PROGRESS
    if not progress.is_dir():
        return set()
    return {int(p.stem.split("-")[1]) for p in progress.glob("part-*.json")}


def total_shards(out_dir: Path) -> int | None:
    path = out_dir / PROGRESS / "extent.json"
    return read_json(path)["shards"] if path.exists() else None


def record_extent(out_dir: Path, units: int, planning_skipped: list, shard_size: int) -> None:
    """Written once the number of units is known (map-style: at planning; streaming: at the stream's end)."""
    write_json_atomic(
        out_dir / PROGRESS / "extent.json",
        {
            "units": units,
            "shards": math.ceil(units / shard_size),
            "planning_skipped": [s.to_dict() if isinstance(s, Skip) else s for s in planning_skipped],
        },
    )


def shard_files(out_dir: Path) -> list[Path]:
    return sorted(out_dir.glob("part-*.parquet"))


def fill_prompts(out_dir: Path) -> None:
    """Packing: each unit that continues its predecessor gets `<|startofprev|>` + the predecessor's label."""
    previous: tuple[int, str] | None = None  # (pl_index, pseudo_label) of the last row seen
    for path in shard_files(out_dir):
        table = pq.read_table(path)
        metadata = table.schema.metadata
        idx = table.column("pl_index").to_pylist()
        labels = table.column("pseudo_label").to_pylist()
        continues = table.column("pl_continues").to_pylist()
        prompts = []
        for i, label, cont in zip(idx, labels, continues, strict=True):
            ok = cont and previous is not None and previous[0] == i - 1
            prompts.append(build_prompt(previous[1]) if ok else None)
            previous = (i, label)
        table = table.set_column(
            table.schema.get_field_index("prompt"), "prompt", pa.array(prompts, pa.string())
        )
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        pq.write_table(table.replace_schema_metadata(metadata), tmp)
        os.replace(tmp, path)


def summarise(out_dir: Path, entry: DatasetEntry, language: str | None) -> dict:
    """Split summary from the finished files: WER over every labelled sample, counts, audio hours."""
    manifests = [read_json(p) for p in sorted((out_dir / PROGRESS).glob("part-*.json"))]
    extent = read_json(out_dir / PROGRESS / "extent.json")
    skipped = extent["planning_skipped"] + [s for m in manifests for s in m["skipped"]]
    refs, hyps = [], []
    for path in shard_files(out_dir):
        cols = ["pseudo_label"] + ([entry.text_column] if entry.text_column else [])
        cols += ["language"] if "language" in pq.read_schema(path).names else []
        table = pq.read_table(path, columns=cols).to_pydict()
        langs = table.get("language") or [None] * len(table["pseudo_label"])
        if entry.text_column:
            for ref, hyp, lang in zip(table[entry.text_column], table["pseudo_label"], langs, strict=True):
                if ref is None:
                    continue
                norm = normalizer_for(lang or language)
                refs.append(norm(ref))
                hyps.append(norm(hyp or ""))
    wer = corpus_wer(refs, hyps, identity) if refs else None
    reasons: dict[str, int] = {}
    for s in skipped:
        reasons[s["reason"]] = reasons.get(s["reason"], 0) + 1
    audio_seconds = sum(m["audio_seconds"] for m in manifests)
    return {
        "samples": sum(m["labelled"] for m in manifests),
        "clips": sum(m["clips"] for m in manifests),
        "skipped": len(skipped),
        "skipped_by_reason": reasons,
        "truncated_at_max_new_tokens": sum(m["truncated"] for m in manifests),
        "audio_hours": audio_seconds / 3600,
        "wer": None if wer is None else wer.wer,
        "wer_detail": None if wer is None else wer.to_dict(),
    }


def finalise(
    out_dir: Path, entry: DatasetEntry, language: str | None, packing: bool, labels_meta: dict
) -> dict:
    """Turn complete shards into the finished dataset; `_SUCCESS` is written last."""
    if packing:
        fill_prompts(out_dir)
    extent = read_json(out_dir / PROGRESS / "extent.json")
    manifests = [read_json(p) for p in sorted((out_dir / PROGRESS).glob("part-*.json"))]
    skipped = extent["planning_skipped"] + [s for m in manifests for s in m["skipped"]]
    skipped.sort(key=lambda s: s["indices"][0])
    tmp = out_dir / f".skipped.jsonl.tmp-{os.getpid()}"
    tmp.write_text("".join(json.dumps(s) + "\n" for s in skipped))
    os.replace(tmp, out_dir / "skipped.jsonl")
    summary = summarise(out_dir, entry, language)
    write_json_atomic(out_dir / "distil_labels.json", {**labels_meta, "summary": summary})
    write_json_atomic(out_dir / "summary.json", summary)
    (out_dir / SUCCESS).write_text("")
    return summary


def try_finalise(out_dir: Path, entry, language, packing, labels_meta) -> dict | None:
    """Finalise if every shard is complete and nobody else is doing it; None when shards are missing."""
    n = total_shards(out_dir)
    if n is None or complete_shards(out_dir) < set(range(n)):
        return None
    lock = out_dir / PROGRESS / "finalise.lock"
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:  # another job is finalising; a stale lock (killed job) is taken after 10 min
        if time.time() - lock.stat().st_mtime < 600:
            return None
        lock.unlink(missing_ok=True)
        return try_finalise(out_dir, entry, language, packing, labels_meta)
    os.close(fd)
    try:
        return finalise(out_dir, entry, language, packing, labels_meta)
    finally:
        lock.unlink(missing_ok=True)


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


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def on_cpu(accelerator: str) -> bool:
    """Whether Lightning's accelerator choice lands on the CPU."""
    if accelerator == "cpu":
        return True
    if accelerator != "auto":
        return False
    from lightning.pytorch.accelerators import CUDAAccelerator, MPSAccelerator

    return not (CUDAAccelerator.is_available() or MPSAccelerator.is_available())


def resolve_parallelism(
    devices: int | str,
    strategy: str,
    threads_per_process: int | str | None,
    cpu: bool,
    cores: int,
    work_items: int | None = None,
    fork: bool = True,
) -> tuple[int | str, str, int | None]:
    """(devices, strategy, torch threads per process) for the Trainer.

    CPU: `devices: auto` means one process per `threads_per_process` cores (`auto` threads: 1), but never more
    processes than there are shards to label (`work_items`), since each shard is labelled by one process;
    `threads_per_process: auto` then shares the cores among the processes. Several small single-threaded
    processes beat one process with many threads: Whisper's decoder runs one small matrix product per token,
    where intra-op threading mostly synchronises. Processes are forked (`ddp_fork`: no re-import, works the
    same from the CLI, scripts and tests), or spawned where fork does not exist.
    GPU: devices and strategy go to Lightning unchanged (`auto`: one process per GPU); threads are left alone
    unless given as a number.
    """
    if not cpu:
        return devices, strategy, threads_per_process if isinstance(threads_per_process, int) else None
    threads = threads_per_process if isinstance(threads_per_process, int) else None
    if devices == "auto":
        devices = max(1, cores // (threads or 1))
        if work_items is not None:
            devices = max(1, min(devices, work_items))
    devices = int(devices)
    if threads is None:
        threads = max(1, cores // devices)
    if strategy == "auto" and devices > 1:
        strategy = "ddp_fork" if fork else "ddp_spawn"
    return devices, strategy, threads


class TorchThreads(Callback):
    """Sets torch's intra-op threads in each process that runs the stage (each rank), restored afterwards."""

    def __init__(self, threads: int):
        self.threads, self.saved = threads, None

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.saved = torch.get_num_threads()
        torch.set_num_threads(self.threads)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self.saved is not None:
            torch.set_num_threads(self.saved)


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


def run_record(out_dir: Path, before: set[int], spec: LabellingSpec, seconds: float) -> dict:
    """What this run labelled, read from the manifests it wrote (every rank's, whichever process launched them)."""
    new = sorted(k for k in complete_shards(out_dir) - before if spec.wanted(k))
    manifests = [read_json(out_dir / PROGRESS / f"{shard_name(k)}.json") for k in new]
    audio = sum(m["audio_seconds"] for m in manifests)
    return {
        "samples": sum(m["units"] for m in manifests),
        "audio_seconds": audio,
        "seconds": seconds,
        "audio_seconds_per_second": audio / seconds if seconds > 0 else None,
        "shards_written": len(manifests),
    }


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
    plan = plan_record(cfg, entry, split, teacher_meta)
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
        (log.warning if trainer.is_global_zero else log.debug)(
            "%s/%s: %s shards still missing (other jobs' shards?); rerun any job to finish and merge",
            entry.name,
            split,
            "some" if missing is None else len(missing),
        )
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
def main(cfg: DictConfig) -> float | None:
    write_run_info(cfg)
    summary = pseudo_label(cfg)
    wers = [s["wer"] for s in summary["splits"].values() if s.get("wer") is not None]
    return sum(wers) / len(wers) if wers else None


if __name__ == "__main__":
    main()
