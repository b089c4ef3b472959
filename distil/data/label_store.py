"""The pseudo-label store: the on-disk layout of a labelled split, its schema, the plan a resume must match, and
the shard writer, so a killed run resumes (finalising a split and merging jobs: distil.data.label_jobs).

Layout of `<out_dir>/<dataset>/<split>/`: `part-K.parquet` shards, `_progress/part-K.json` manifests
(a shard is complete iff its manifest exists), `_progress/plan.json` (the settings a resume must match),
`_progress/extent.json` (the number of units), then `skipped.jsonl`, `distil_labels.json`, `summary.json`
and `_SUCCESS`. Readers must require `_SUCCESS`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import signal
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
from lightning.pytorch.callbacks import BasePredictionWriter
from omegaconf import DictConfig, OmegaConf

from distil.data.entries import DatasetEntry, column_names, is_hub_id
from distil.data.label_plan import LabellingSpec, Skip
from distil.data.text import get_normalizer, sample_wer
from distil.utils.errors import InputError
from distil.utils.io import atomic_file, read_json, write_json_atomic

log = logging.getLogger(__name__)


SUCCESS = "_SUCCESS"  # written last: the split is complete
LABELS_METADATA = "distil_labels.json"
# Columns the pseudo-labelling stage adds (see distil.pseudo_label).
PSEUDO_LABEL_COLUMNS = ("token_ids", "pl_wer")


PROGRESS = "_progress"


PROMPT_TOKEN = "<|startofprev|>"


LABEL_COLUMNS = ("whisper_transcript", "token_ids", "pseudo_label", "pl_wer", "pl_index")


class LabellingStateError(InputError):
    """An output directory written with different settings than this run's."""


def build_prompt(previous_text: str | None) -> str | None:
    """`<|startofprev|>` + the previous segment's text with Whisper's leading space; never doubled."""
    if previous_text is None:
        return None
    text = previous_text.strip()
    while text.startswith(PROMPT_TOKEN):
        text = text[len(PROMPT_TOKEN) :].strip()
    return f"{PROMPT_TOKEN} {text}" if text else None


def split_dir(out_dir: str | Path, dataset: str, split: str) -> Path:
    return Path(out_dir) / dataset / split


def shard_name(k: int) -> str:
    return f"part-{k:05d}"


def id_output_column(entry: DatasetEntry, names: Sequence[str]) -> str:
    """Where sample ids live in the output: the id column, or a new `id` (`pl_id` if `id` is taken)."""
    if entry.id_column:
        return entry.id_column
    return "pl_id" if "id" in names else "id"


def normalizer_for(language: str | None):
    return get_normalizer(language or "en")


def output_features(
    ds, entry: DatasetEntry, multilingual: bool, packing: bool
) -> tuple[datasets.Features, str]:
    """The labelled split's features (the input's plus the label columns) and its id column."""
    if isinstance(ds, datasets.IterableDataset) and ds.features is None:
        input_features = ds._resolve_features().features
    else:
        input_features = ds.features
    id_column = id_output_column(entry, list(input_features))
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
    return datasets.Features(feats), id_column


def write_table(table: pa.Table, features: datasets.Features, meta: dict, path: Path) -> None:
    """Write parquet with datasets' feature metadata (so Audio stays Audio) plus ours, atomically."""
    metadata = dict(table.schema.metadata or {})
    metadata[b"huggingface"] = json.dumps({"info": {"features": features.to_dict()}}).encode()
    metadata[b"distil"] = json.dumps(meta, default=str).encode()
    with atomic_file(path) as tmp:
        pq.write_table(table.replace_schema_metadata(metadata), tmp)


# A scheduler's notice before it kills (SLURM sends SIGTERM; `--signal=USR1@<seconds>` sends SIGUSR1 earlier).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class ShardWriter(BasePredictionWriter):
    """Collects each shard's labelled rows and writes the shard (parquet, then manifest) once it is whole.

    SIGTERM or SIGUSR1 (`STOP_SIGNALS`) stop labelling after the shard being labelled is written: the predict
    loop ends at a `StopIteration` from a hook (Lightning's loop treats it as the end of the data), and
    `stop_signal` names the signal for the command to exit non-zero. The handler is this writer's in every
    labelling process (installed at predict start, replacing Lightning's, which would only log SIGTERM), and the
    command installs it around `predict` too (`catch_stop_signals`) so the parent of forked CPU ranks passes
    the signal on to them. Inside a submitit job the signals are left to submitit (it requeues the job)."""

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
        self.stop_signal: str | None = None
        self._launcher = None  # the trainer's launcher: the processes a signal is passed on to
        self._saved_handlers: dict = {}

    def __getstate__(self) -> dict:  # spawned ranks: handlers and launchers stay in the process that has them
        return {**self.__dict__, "_launcher": None, "_saved_handlers": {}}

    def _on_signal(self, signum: int, frame=None) -> None:
        if self.stop_signal is None:
            log.warning(
                "%s received: finishing the shard being labelled, then stopping", signal.Signals(signum).name
            )
            if self._launcher is not None:  # forked/spawned ranks, or the other ranks of a DDP script launch
                self._launcher.kill(signum)
        self.stop_signal = signal.Signals(signum).name

    def _install(self) -> dict:
        """Make `_on_signal` this process's handler of `STOP_SIGNALS`; returns the handlers it replaced."""
        if os.environ.get("SUBMITIT_EXECUTOR") or threading.current_thread() is not threading.main_thread():
            return {}
        return {signum: signal.signal(signum, self._on_signal) for signum in STOP_SIGNALS}

    @staticmethod
    def _restore(saved: dict) -> None:
        for signum, handler in saved.items():
            signal.signal(signum, handler)

    @contextmanager
    def catch_stop_signals(self, trainer) -> Iterator[None]:
        """Around `trainer.predict` in the command's process (the parent of forked ranks)."""
        self._launcher = trainer.strategy.launcher
        saved = self._install()
        try:
            yield
        finally:
            self._restore(saved)

    def on_predict_start(self, trainer, pl_module) -> None:
        self._launcher = trainer.strategy.launcher
        self._saved_handlers = self._install()  # Lightning's, registered after `setup`; restored at the end

    def on_predict_end(self, trainer, pl_module) -> None:
        self._restore(self._saved_handlers)
        self._saved_handlers = {}

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self.on_predict_end(trainer, pl_module)

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
        if self.stop_signal is not None and not self.pending:
            raise StopIteration  # the shard in hand is written: end the predict loop here (see the class)

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
        (self.out_dir / PROGRESS / f"{shard_name(k)}.claim").unlink(
            missing_ok=True
        )  # complete: no longer claimed
        self.shards_written += 1


def input_fingerprint(ds, entry: DatasetEntry) -> str:
    """`sha256:` of the split's row identities in order (its id column, else its text column, else the row
    count): a resume on data that was rewritten, reordered, grown or shrunk since the plan is refused. Reads
    one small column, never the audio."""
    names = column_names(ds)
    cols = [c for c in (entry.id_column, entry.text_column) if c and c in names][:1]
    digest = hashlib.sha256()
    n = 0
    if cols:
        for batch in ds.select_columns(cols).iter(batch_size=10_000):
            values = batch[cols[0]]
            n += len(values)
            digest.update(json.dumps(values, default=str).encode())
    else:
        n = (
            len(ds)
            if isinstance(ds, datasets.Dataset)
            else sum(1 for _ in ds.select_columns([entry.audio_column]))
        )
    digest.update(f"rows={n}".encode())
    return f"sha256:{digest.hexdigest()}"


def plan_record(
    cfg: DictConfig, entry: DatasetEntry, split: str, teacher: dict, input_hash: str, packing: bool
) -> dict:
    """Everything that decides the labels and the shard layout; a resumed run must match it. `packing`: whether
    this split's clips are packed (not for a dataset without speakers under packing.without_speaker=clips)."""
    return {
        "teacher": teacher,
        "input": input_hash,
        "generation": OmegaConf.to_container(cfg.generation, resolve=True),
        "dtype": cfg.dtype,
        "packing": _set_options(cfg.packing) if packing else None,
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


def _set_options(options: DictConfig) -> dict:
    """The options that are set: one left at null is left out, so labels made before it existed still match."""
    options = OmegaConf.to_container(options, resolve=True)
    # without_speaker says which datasets pack, not how: theirs record packing: null.
    options.pop("without_speaker", None)
    return {k: v for k, v in options.items() if v is not None}


def check_plan(out_dir: Path, plan: dict, ignore: tuple[str, ...] = ()) -> None:
    """Refuse to resume or reuse `out_dir` if its recorded plan differs from `plan` (keys in `ignore` aside)."""
    path = out_dir / PROGRESS / "plan.json"
    if path.exists():
        old = read_json(path)
        changed = sorted(
            k
            for k in set(old) | set(plan)
            if k not in ignore and old.get(k) != json.loads(json.dumps(plan.get(k), default=str))
        )
        if changed:
            if "input" in changed:
                raise LabellingStateError(
                    f"the input of {out_dir} changed since it was labelled: {plan['dataset']['path']} split "
                    f"{plan['dataset']['split']!r} now holds other rows, or the same rows in another order "
                    "(its id/text column differs). The labels there belong to the old data: delete the "
                    "directory (or set out_dir) to relabel, or restore the data to resume."
                )
            layout = (
                " (the shard layout follows shard_size, min_shards and batch_size: set them as before)"
                if "shard_size" in changed
                else ""
            )
            raise LabellingStateError(
                f"{out_dir} holds labels made with different settings ({', '.join(changed)} differ{layout}). "
                "Rerun with the same settings to resume, or delete the directory (or set out_dir) to relabel."
            )
    else:
        write_json_atomic(path, plan)


def label_shard_files(directory: Path) -> list[Path]:
    """The parquet shards of a labelled split as training reads them (the directory also holds JSON metadata;
    hidden names are temporary files of an atomic write)."""
    return sorted(p for p in Path(directory).glob("*.parquet") if not p.name.startswith((".", "_")))


def shard_manifest(files: Sequence[Path]) -> dict:
    """What a finished split's shards are: each file's name, rows and bytes, and the total rows (recorded in
    `distil_labels.json` at finalise; training compares the files on disk with it)."""
    shards = {p.name: {"rows": pq.read_metadata(p).num_rows, "bytes": p.stat().st_size} for p in files}
    return {"files": shards, "rows": sum(s["rows"] for s in shards.values())}


def shard_problems(directory: Path, expected: dict[str, dict]) -> list[str]:
    """How the shards in `directory` differ from `expected` (file name -> the rows and/or bytes it must have):
    missing, extra and changed files, one phrase each; [] when they match."""
    on_disk = {p.name: p for p in label_shard_files(directory)}
    problems = [f"{name} missing" for name in sorted(set(expected) - set(on_disk))]
    problems += [f"{name} extra" for name in sorted(set(on_disk) - set(expected))]
    for name in sorted(set(expected) & set(on_disk)):
        want = expected[name]
        try:
            have = {"rows": pq.read_metadata(on_disk[name]).num_rows, "bytes": on_disk[name].stat().st_size}
        except (OSError, pa.ArrowException) as err:
            problems.append(f"{name} unreadable ({err})")
            continue
        changed = [
            f"{k} {have[k]} instead of {want[k]}"
            for k in ("rows", "bytes")
            if k in want and want[k] != have[k]
        ]
        if changed:
            problems.append(f"{name} changed ({', '.join(changed)})")
    return problems


def is_local_path(path: str) -> bool:
    """Whether a dataset `path` names a local directory (else a Hub id), as `distil.data.entries.load_split`
    decides: it exists, or it does not have a Hub id's shape (`is_hub_id`)."""
    return Path(path).expanduser().exists() or not is_hub_id(str(path))


def split_directory(path: str, split: str) -> Path | None:
    """The local directory holding a split's data files (`<path>/<split>` when it exists, else `<path>`), or
    None when `path` is not a local directory (a Hub id)."""
    root = Path(str(path)).expanduser()
    directory = root / split if (root / split).is_dir() else root
    return directory if directory.is_dir() else None


def data_files(directory: Path) -> list[tuple[str, int, int]]:
    """(name relative to `directory`, bytes, modification time in ns) of every file below it, hidden ones aside."""
    files = sorted(f for f in directory.rglob("*") if f.is_file() and not f.name.startswith("."))
    return [(str(f.relative_to(directory)), f.stat().st_size, f.stat().st_mtime_ns) for f in files]


def resolved_path(path: str) -> str:
    """A local dataset path made absolute (so `./data` and `/home/me/data` compare equal); a Hub id as given."""
    return str(Path(path).expanduser().resolve()) if is_local_path(path) else str(path)


def source_record(path: str, split: str) -> dict:
    """Where labels come from, recorded at finalise: the absolute path of a local dataset and its split's files
    (names and sizes: a copy or move keeps them, another dataset does not), or the Hub id as given."""
    directory = split_directory(path, split) if is_local_path(path) else None
    files = None if directory is None else [[name, size] for name, size, _ in data_files(directory)]
    return {"path": resolved_path(path), "files": files}


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


class LabellerMismatchWarning(UserWarning):
    """The pseudo-labels were made by another teacher than the KD teacher."""


def check_labeller(pseudo_labels_dir: str, datasets_cfg, teacher_dir: str, teacher_name: str) -> list[str]:
    """Warn when the pseudo-labels' teacher (distil_labels.json) is not the KD teacher; returns the messages."""
    from distil.whisper.models import model_fingerprint

    fingerprint = model_fingerprint(teacher_dir)
    messages = []
    for entry in datasets_cfg:
        for split in entry.get("splits") or ["train"]:
            meta_path = Path(pseudo_labels_dir) / entry["name"] / split / LABELS_METADATA
            if not meta_path.is_file():
                continue
            labeller = json.loads(meta_path.read_text()).get("teacher", {})
            if labeller.get("fingerprint") and labeller["fingerprint"] != fingerprint:
                messages.append(
                    f"pseudo-labels of {entry['name']}/{split} were made by {labeller.get('name')!r} "
                    f"({labeller['fingerprint']}) but the KD teacher is {teacher_name!r} ({fingerprint}): the KL term "
                    "pulls the student towards a different model than the one that wrote its labels"
                )
    for m in messages:
        warnings.warn(m, LabellerMismatchWarning, stacklevel=2)
        log.warning(m)
    return messages
