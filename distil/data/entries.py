"""Dataset entries shared by every stage: one schema, one loader, one column check.

A stage's `data` config holds a list of entries::

    datasets:
      - name: espeak
        path: ${paths.corpora}/espeak   # local dir of parquet/arrow/json/csv files, a saved dataset, or a Hub id
        config: null                     # Hub config name
        splits: [train, validation]
        audio_column: audio
        text_column: text                # null for audio-only data
        id_column: id                    # null -> stable generated ids "<name>:<split>:<index>"
        speaker_column: speaker          # optional (packing needs it)
        duration_column: duration        # optional; read from the audio headers when null or absent
        language: null                   # per-dataset language (WER normaliser, multilingual generation)
        weight: 1.0                      # mixing weight (training): a number shared evenly by the splits,
                                         # or one per split: [100, 360, 500] / {train.clean.100: 100, ...}

Each layout is a `Reader` (`READERS`), asked in this order unless `reader:` names one: `saved` (a `save_to_disk`
dataset or DatasetDict), `tables` (`<path>/<split>/*.parquet|arrow|jsonl|csv`, the corpus and pseudo-label
layout), `audiofolder` (`<path>/<split>/` of audio files with a `metadata.csv` / `metadata.jsonl` whose
`file_name` column names them: the `datasets` convention; audio only without one; a flat folder is `train`),
`builder` (`load_dataset(<path>)`'s own inference, e.g. a cloned Hub dataset; what it cannot read is refused in
one line naming what the directory holds). A path that does not exist locally and has a Hub id's shape (`name` or
`owner/name`: no `./`, `../`, leading `/` or `~`, at most one slash) is read by `hub`: `load_dataset(path, config,
...)`; any other path that does not exist is refused as a missing local path.
Audio is always cast to `Audio(decode=False)`: datasets' decoder needs torchcodec, so stages decode with
`distil.data.audio.decode_audio`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import datasets
import pyarrow.parquet as pq
from datasets import Audio

from distil.utils.errors import InputError

# File extensions a local split directory may hold, mapped to the datasets builder that reads them.
BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".jsonl": "json", ".json": "json", ".csv": "csv"}
# An audio folder: audio files beside an optional metadata table (datasets' audiofolder convention).
AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".aiff", ".aif")
METADATA_FILES = ("metadata.csv", "metadata.jsonl")
# A Hub dataset id: `name` or `owner/name`, each part letters, digits, `_`, `-`, `.`, not starting with `.` or `-`.
HUB_ID = re.compile(r"\w[\w.-]*(/\w[\w.-]*)?")
# The types a text column may have (`null`: a column with no values yet, i.e. audio-only rows).
TEXT_TYPES = ("string", "large_string", "null")
LAYOUTS = (
    "a save_to_disk dataset; <dir>/<split>/ with audio files and a metadata.csv or metadata.jsonl (file_name + "
    "text columns: the audiofolder layout); <dir>/<split>/*.parquet|arrow|jsonl|csv; or a Hub dataset id"
)


class DataConfigError(InputError):
    """A dataset entry that does not match the data (missing split or column, bad path)."""


@dataclass
class DatasetEntry:
    name: str
    path: str
    config: str | None = None
    splits: list[str] = field(default_factory=lambda: ["train"])
    audio_column: str = "audio"
    text_column: str | None = "text"
    id_column: str | None = "id"
    speaker_column: str | None = None
    duration_column: str | None = "duration"
    language: str | None = None
    weight: float | list[float] | dict[str, float] = 1.0
    reader: str | None = None  # a layout by name (distil.data.entries.READERS); null: the first that finds it
    index: int = 0  # position in `data.datasets`, for error messages naming the config key

    @property
    def key(self) -> str:
        return f"data.datasets[{self.index}]"

    def source(self, split: str) -> str:
        """`<name>/<split>`: how logs, label directories, metrics and encoder-cache keys name one split."""
        return f"{self.name}/{split}"

    def split_weight(self, split: str) -> float:
        """The mixing weight of one training split (hours or samples, as the reference's
        `train_dataset_samples`): a list gives one per split in `splits` order, a mapping names the splits,
        a number is the entry's total, shared evenly by its splits."""
        if isinstance(self.weight, Mapping):
            return float(self.weight[split])
        if isinstance(self.weight, list | tuple):
            return float(self.weight[self.splits.index(split)])
        return float(self.weight) / len(self.splits)

    def check_weight(self) -> None:
        """Per-split weights must name exactly the entry's splits (a typo would silently drop a split)."""
        if isinstance(self.weight, Mapping) and set(self.weight) != set(self.splits):
            raise DataConfigError(
                f"{self.key}.weight names splits {sorted(self.weight)} but {self.key}.splits is "
                f"{self.splits}; give one weight per split"
            )
        if isinstance(self.weight, list | tuple) and len(self.weight) != len(self.splits):
            raise DataConfigError(
                f"{self.key}.weight has {len(self.weight)} weights for {len(self.splits)} splits "
                f"{self.splits}; give one weight per split (or one number for the whole entry)"
            )


def dataset_entries(datasets_cfg: Iterable[Mapping[str, Any]]) -> list[DatasetEntry]:
    """Turn the `data.datasets` config list into entries, rejecting unknown keys and duplicate names."""
    known = {f.name for f in fields(DatasetEntry)} - {"index"}
    entries = []
    for i, raw in enumerate(datasets_cfg):
        raw = dict(raw)
        if "samples" in raw:  # the key's name before it was `weight` (a count elsewhere in the configs)
            raise DataConfigError(
                f"data.datasets[{i}].samples is now data.datasets[{i}].weight (the mixing weight, the reference's "
                "train_dataset_samples): rename the key"
            )
        unknown = set(raw) - known
        if unknown:
            raise DataConfigError(
                f"data.datasets[{i}] has unknown keys {sorted(unknown)}; known keys: {sorted(known)}"
            )
        for required in ("name", "path"):
            if raw.get(required) in (None, "", "???"):
                raise DataConfigError(f"data.datasets[{i}].{required} must be set")
        if isinstance(raw.get("splits"), str):
            raw["splits"] = [raw["splits"]]
        raw["splits"] = list(raw.get("splits") or ["train"])
        if isinstance(raw.get("weight"), Mapping):
            raw["weight"] = dict(raw["weight"])
        elif isinstance(raw.get("weight"), Iterable) and not isinstance(raw.get("weight"), str):
            raw["weight"] = list(raw["weight"])
        entry = DatasetEntry(index=i, **raw)
        entry.check_weight()
        entries.append(entry)
    names = [e.name for e in entries]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DataConfigError(
            f"data.datasets names must be unique (they name output directories): {duplicates}"
        )
    return entries


def spread_subset(total: int, limit: int | None) -> list[int]:
    """`limit` row indices spread evenly over `range(total)` (all rows when there is no limit or it is larger).

    Corpora are ordered by speaker (and chapter), so the first N rows of a capped evaluation or validation
    set would hold the first speaker or two; evenly spaced rows hold all of them.
    """
    if limit is None or limit >= total:
        return list(range(total))
    return [i * total // limit for i in range(limit)]


def stable_id(name: str, split: str, index: int) -> str:
    """The id given to samples of a dataset without an id column: stable across runs and shards."""
    return f"{name}:{split}:{index}"


def _split_files(directory: Path, tables_only: bool = False) -> list[str]:
    """Data files of one split. Columnar formats win over json/csv, so sidecar files (e.g. the pseudo-label
    stage's `summary.json`, `skipped.jsonl`) next to parquet shards are not mistaken for data; an audio folder's
    metadata file is not a table of its own (`tables_only`: only files that are no audio folder's metadata)."""
    files = [p for p in directory.iterdir() if p.is_file() and not p.name.startswith((".", "_"))]
    if tables_only:
        files = [p for p in files if p.name not in METADATA_FILES]
    for suffixes in ((".parquet",), (".arrow",), (".jsonl", ".json"), (".csv",)):
        chosen = sorted(str(p) for p in files if p.suffix in suffixes)
        if chosen:
            return chosen
    return []


def _audio_files(directory: Path):
    """The audio files below `directory`, in file-system order (lazily: a check stops at the first)."""
    return (p for p in directory.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file())


def _metadata_file(directory: Path) -> Path | None:
    """The audio folder's metadata table (metadata.csv or metadata.jsonl), if `directory` has one."""
    return next((directory / m for m in METADATA_FILES if (directory / m).is_file()), None)


def _is_audio_folder(directory: Path) -> bool:
    return _metadata_file(directory) is not None or next(_audio_files(directory), None) is not None


def _load_audio_folder(entry: DatasetEntry, directory: Path, split: str, cache_dir: str | None):
    """One split of an audio folder as a table with an `Audio(decode=False)` column of file paths.

    datasets' own `audiofolder` builder encodes audio through torchcodec even when nothing is decoded, so the
    metadata table is read with the csv/json builder and `file_name` becomes the audio column, as audiofolder
    does. Without a metadata file every audio file below the directory is one row (audio only: no text).
    """
    metadata = _metadata_file(directory)
    if metadata is None:
        files = sorted(_audio_files(directory))
        return datasets.Dataset.from_dict(
            {
                entry.audio_column: [{"bytes": None, "path": str(f)} for f in files],
                "file_name": [str(f.relative_to(directory)) for f in files],
            }
        ).cast_column(entry.audio_column, Audio(decode=False))
    builder = "csv" if metadata.suffix == ".csv" else "json"
    table = datasets.load_dataset(
        builder, data_files={split: str(metadata)}, split=split, cache_dir=cache_dir
    )
    if "file_name" not in table.column_names:
        raise DataConfigError(
            f"dataset {entry.name!r}: {metadata} has no column 'file_name' (columns: {table.column_names}); "
            "an audio folder's metadata names each audio file, relative to its directory, in 'file_name'"
        )
    missing = [n for n in table["file_name"] if not (directory / str(n)).is_file()]
    if missing:
        raise DataConfigError(
            f"dataset {entry.name!r}: {len(missing)} file(s) named in {metadata} do not exist under {directory}, "
            f"e.g. {missing[0]!r}; fix file_name or add the files"
        )
    paths = [{"bytes": None, "path": str(directory / str(n))} for n in table["file_name"]]
    if entry.audio_column in table.column_names:
        table = table.remove_columns(entry.audio_column)
    return table.add_column(entry.audio_column, paths).cast_column(entry.audio_column, Audio(decode=False))


def _stream(ds, streaming: bool):
    return ds.to_iterable_dataset() if streaming else ds


class Reader:
    """One layout of a dataset on disk (or on the Hub): `finds` says whether `root` holds `split` in it, `read`
    loads that split. `load_split` asks the readers of `READERS` in order, or the one `data.datasets[i].reader`
    names. A new layout is a subclass here, registered in `READERS`, with a test in tests/test_data.py."""

    name: ClassVar[str]

    def finds(self, root: Path, split: str) -> bool:
        raise NotImplementedError

    def read(self, entry: DatasetEntry, root: Path, split: str, streaming: bool, cache_dir: str | None):
        raise NotImplementedError


class SavedDataset(Reader):
    """`DatasetDict.save_to_disk(<dir>)`, or one saved `Dataset` per split directory."""

    name = "saved"

    def finds(self, root: Path, split: str) -> bool:
        if (root / "dataset_dict.json").exists() or (root / split / "state.json").exists():
            return True
        return (root / "state.json").exists() and not (root / split).is_dir()  # refused in `read`: no splits

    def read(self, entry, root, split, streaming, cache_dir):
        if (root / "dataset_dict.json").exists():
            saved = datasets.load_from_disk(str(root))
            if split not in saved:
                raise DataConfigError(
                    f"dataset {entry.name!r} ({root}) has no split {split!r}; available: {sorted(saved)} "
                    f"(set {entry.key}.splits)"
                )
            return _stream(saved[split], streaming)
        if (root / split / "state.json").exists():
            return _stream(datasets.load_from_disk(str(root / split)), streaming)
        raise DataConfigError(
            f"dataset {entry.name!r}: {root} is a single saved Dataset without splits; save a DatasetDict or "
            f"put it under {root / split}"
        )


class TableFiles(Reader):
    """`<dir>/<split>/*.parquet|arrow|jsonl|csv`: the layout of distil's corpora and label store."""

    name = "tables"

    def finds(self, root: Path, split: str) -> bool:
        return (root / split).is_dir() and not AudioFolder.is_one(root / split)

    def read(self, entry, root, split, streaming, cache_dir):
        files = _split_files(root / split)
        if not files:
            raise DataConfigError(
                f"dataset {entry.name!r}: {root / split} holds no data files ({', '.join(sorted(BUILDERS))})"
            )
        builder = BUILDERS[Path(files[0]).suffix]
        if builder == "parquet":
            _check_parquet(entry, split, files)
        try:
            return datasets.load_dataset(
                builder, data_files={split: files}, split=split, streaming=streaming, cache_dir=cache_dir
            )
        except Exception as err:  # noqa: BLE001 - datasets wraps the reader's error; the user needs one line
            while err.__cause__ is not None:  # DatasetGenerationError's cause says what is wrong
                err = err.__cause__
            raise DataConfigError(
                f"dataset {entry.name!r}: cannot read split {split!r} from {root / split} "
                f"({_reason(err)}); fix or remove the unreadable file"
            ) from err


def _reason(err: BaseException) -> str:
    """`Type: first line of the message` (some readers' errors span lines or are empty)."""
    message = str(err).strip().splitlines()
    return f"{type(err).__name__}: {message[0]}" if message else type(err).__name__


def _check_parquet(entry: DatasetEntry, split: str, files: Sequence[str]) -> None:
    """Each parquet file's footer, before datasets reads the split (cheap: no data is read), so that a file which is
    not parquet or is cut short, and a split without rows, are one line naming the file instead of a traceback."""
    rows = 0
    for f in files:
        try:
            rows += pq.read_metadata(f).num_rows
        except Exception as err:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ... for a bad footer
            raise DataConfigError(
                f"dataset {entry.name!r} split {split!r}: {f} is not a readable parquet file "
                f"({_reason(err)}); replace it with a good copy or move it out of "
                f"{Path(f).parent}"
            ) from err
    if rows == 0:
        raise _no_rows(entry, split, str(Path(files[0]).parent))


def _no_rows(entry: DatasetEntry, split: str, where: str) -> DataConfigError:
    return DataConfigError(
        f"dataset {entry.name!r} split {split!r} ({where}) holds no rows; add data to it or remove {split!r} "
        f"from {entry.key}.splits"
    )


class AudioFolder(Reader):
    """`<dir>/<split>/` of audio files with a metadata.csv/jsonl (datasets' audiofolder convention), or audio
    only; a flat folder is split `train`. Also answers for a folder of audio-folder splits that lacks `split`."""

    name = "audiofolder"

    @staticmethod
    def is_one(directory: Path) -> bool:
        """`directory` is one audio folder: audio or a metadata table, and no table files of its own."""
        return (
            directory.is_dir()
            and not _split_files(directory, tables_only=True)
            and _is_audio_folder(directory)
        )

    @staticmethod
    def _splits(root: Path) -> list[str]:
        return sorted(d.name for d in root.iterdir() if d.is_dir() and _metadata_file(d) is not None)

    def finds(self, root: Path, split: str) -> bool:
        if (root / split).is_dir():
            return self.is_one(root / split)
        return (split == "train" and self.is_one(root)) or bool(self._splits(root))

    def read(self, entry, root, split, streaming, cache_dir):
        if (root / split).is_dir():
            return _stream(_load_audio_folder(entry, root / split, split, cache_dir), streaming)
        if split == "train" and self.is_one(root):
            return _stream(_load_audio_folder(entry, root, split, cache_dir), streaming)
        raise DataConfigError(
            f"dataset {entry.name!r} ({root}) has no split {split!r}; its audio-folder splits are "
            f"{self._splits(root)} (set {entry.key}.splits)"
        )


class InferredBuilder(Reader):
    """Whatever `load_dataset(<dir>)` infers, e.g. a Hub dataset's repository cloned (`data/train-*.parquet`); the
    last resort, so a directory in none of the layouts above is refused here in one line."""

    name = "builder"

    def finds(self, root: Path, split: str) -> bool:
        return True

    def read(self, entry, root, split, streaming, cache_dir):
        try:
            ds = datasets.load_dataset(str(root), split=split, streaming=streaming, cache_dir=cache_dir)
            problem = None if entry.audio_column in column_names(ds) else f"no column {entry.audio_column!r}"
        except Exception as err:  # noqa: BLE001 - whatever the builder says, the answer is the same line
            ds, problem = None, _reason(err)
        if problem is None:
            return ds
        found = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir() if p.name[0] != ".")
        shown = ", ".join(found[:8]) + (" ..." if len(found) > 8 else "")
        raise DataConfigError(
            f"dataset {entry.name!r}: cannot read split {split!r} of {root} (it holds: {shown or 'nothing'}; "
            f"{problem}); distil reads {LAYOUTS} (set {entry.key}.path or {entry.key}.splits)"
        )


class HubDataset(Reader):
    """A Hub dataset id: `load_dataset(path, config, split=...)` (the real code path; needs network)."""

    name = "hub"

    def finds(self, root: Path, split: str) -> bool:
        return not root.exists()

    def read(self, entry, root, split, streaming, cache_dir):
        return datasets.load_dataset(
            str(entry.path), entry.config, split=split, streaming=streaming, cache_dir=cache_dir
        )


# The readers `load_split` asks, in this order (the first that finds the split reads it).
READERS: dict[str, Reader] = {
    r.name: r for r in (SavedDataset(), TableFiles(), AudioFolder(), InferredBuilder(), HubDataset())
}


def load_split(
    entry: DatasetEntry, split: str, streaming: bool = False, cache_dir: str | None = None
) -> datasets.Dataset | datasets.IterableDataset:
    """Load one split of a dataset entry with its audio column cast to `Audio(decode=False)`."""
    root = Path(str(entry.path)).expanduser()
    if entry.reader is not None:
        if entry.reader not in READERS:
            raise DataConfigError(
                f"{entry.key}.reader={entry.reader!r} is not one of {sorted(READERS)} (or null)"
            )
        reader = READERS[entry.reader]
    elif root.exists():
        if not root.is_dir():
            raise DataConfigError(
                f"dataset {entry.name!r}: {root} is a file; {entry.key}.path must be a directory"
            )
        reader = next(r for r in READERS.values() if r.name != "hub" and r.finds(root, split))
    elif not is_hub_id(str(entry.path)):
        raise DataConfigError(
            f"dataset {entry.name!r}: local path {root.absolute()} does not exist "
            f"({entry.key}.path={entry.path}; a Hub id looks like owner/name); fix {entry.key}.path"
        )
    else:
        reader = READERS["hub"]
    ds = reader.read(entry, root, split, streaming, cache_dir)
    if isinstance(ds, datasets.Dataset) and ds.num_rows == 0:  # a stream's length is unknown until read
        raise _no_rows(entry, split, str(root if root.exists() else entry.path))
    names = column_names(ds)
    if entry.audio_column in names:
        ds = ds.cast_column(entry.audio_column, Audio(decode=False))
    return ds


def is_hub_id(path: str) -> bool:
    """Whether a dataset path that does not exist locally is a Hub id (`name`, `owner/name`) rather than a missing
    local path (`./x`, `../x`, `/x`, `~/x`, `a/b/c`): a missing path is refused at once instead of after the Hub's
    connection timeouts."""
    return HUB_ID.fullmatch(path) is not None


def column_names(ds: datasets.Dataset | datasets.IterableDataset) -> list[str]:
    """Column names, peeking at the first row when a streamed dataset does not declare its features."""
    if ds.column_names is not None:
        return list(ds.column_names)
    first = next(iter(ds), None)
    return list(first) if first is not None else []


def validate_columns(
    entry: DatasetEntry,
    split: str,
    names: Iterable[str],
    need_speaker: bool = False,
    where: str | None = None,
    features: Mapping[str, Any] | None = None,
) -> None:
    """Raise DataConfigError naming dataset, split, missing column, available columns and the key to set.

    With the split's `features` (its schema, no rows read) the text column must hold strings: the WER normaliser
    and packing take it as text, and a number column would fail only after the teacher has labelled a batch."""
    names = list(names)
    wanted = [("audio_column", entry.audio_column, False)]
    wanted += [("text_column", entry.text_column, True), ("id_column", entry.id_column, True)]
    wanted += [("speaker_column", entry.speaker_column, True)]
    if need_speaker and entry.speaker_column is None:
        raise DataConfigError(
            f"dataset {entry.name!r}: packing merges clips of one speaker, so it needs a speaker column; "
            f"set {entry.key}.speaker_column to one of {names} (or disable packing)"
        )
    for key, column, nullable in wanted:
        if column is None:
            continue
        if column not in names:
            fix = f"set {entry.key}.{key} to one of {names}" + (" or null" if nullable else "")
            raise DataConfigError(
                f"dataset {entry.name!r} split {split!r}{f' ({where})' if where else ''} has no column {column!r} ({key}); "
                f"available columns: {names}; {fix}"
            )
    kind = None if features is None or entry.text_column is None else features.get(entry.text_column)
    if kind is not None and getattr(kind, "dtype", None) not in TEXT_TYPES:
        raise DataConfigError(
            f"dataset {entry.name!r} split {split!r}{f' ({where})' if where else ''}: text column "
            f"{entry.text_column!r} holds {getattr(kind, 'dtype', type(kind).__name__)}, not strings; cast it to "
            f"string in the data, or set {entry.key}.text_column to a text column (null for audio-only data)"
        )


def check_input_ids(entry: DatasetEntry, split: str, ids: Sequence[Any]) -> None:
    """Every row of the input has an id (`id_column`) and no two share one, checked on the input before any work:
    labels, `skipped.jsonl` and the encoder cache are keyed by the id (compared as text, as labelling keys them)."""
    rows_of: dict[str, list[int]] = {}
    missing = []
    for i, value in enumerate(ids):
        if value is None:
            missing.append(i)
        else:
            rows_of.setdefault(str(value), []).append(i)
    where = f"dataset {entry.name!r} split {split!r}: id column {entry.id_column!r} ({entry.key}.id_column)"
    fix = f"make the ids unique in the data, or set {entry.key}.id_column=null for generated ids"
    if missing:
        raise DataConfigError(
            f"{where} is empty in {len(missing)} rows (rows {missing[:5]}); give every row an id, or set "
            f"{entry.key}.id_column=null for generated ids"
        )
    repeated = [(value, rows) for value, rows in rows_of.items() if len(rows) > 1]
    if repeated:
        shown = ", ".join(f"{value!r} at rows {rows[:5]}" for value, rows in repeated[:3])
        raise DataConfigError(
            f"{where} has {len(repeated)} ids that occur more than once ({shown}"
            f"{', ...' if len(repeated) > 3 else ''}); {fix}"
        )


def duration_column(entry: DatasetEntry, names: Iterable[str]) -> str | None:
    """The duration column to trust, if the entry names one that exists (else durations come from headers)."""
    return entry.duration_column if entry.duration_column and entry.duration_column in set(names) else None
