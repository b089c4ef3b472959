"""distil.data.entries: dataset entries, loading local layouts (parquet dirs, saved datasets), column checks."""

import datasets
import numpy as np
import pytest

from distil.data.audio import decode_audio, encode_flac
from distil.data.entries import (
    DataConfigError,
    DatasetEntry,
    column_names,
    dataset_entries,
    duration_column,
    load_split,
    stable_id,
    validate_columns,
)

pytestmark = pytest.mark.unit  # no model, no audio synthesis: `make test-unit`


def _rows(n, prefix):
    rng = np.random.default_rng(0)
    return [
        {
            "audio": {
                "bytes": encode_flac(rng.uniform(-0.1, 0.1, 1600 * (i + 1)).astype(np.float32), 16000),
                "path": None,
            },
            "sentence": f"{prefix} {i}",
            "uid": f"{prefix}-{i}",
        }
        for i in range(n)
    ]


def _dataset(rows):
    return datasets.Dataset.from_list(rows).cast_column("audio", datasets.Audio(decode=False))


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    train, valid = _dataset(_rows(3, "train")), _dataset(_rows(2, "valid"))
    for split, ds in (("train", train), ("validation", valid)):
        (root / "parquet" / split).mkdir(parents=True)
        ds.to_parquet(str(root / "parquet" / split / "part-0.parquet"))
    datasets.DatasetDict({"train": train, "validation": valid}).save_to_disk(str(root / "dict"))
    train.save_to_disk(str(root / "per_split" / "train"))
    return root


def _entry(path, **kw):
    return DatasetEntry(name="toy", path=str(path), text_column="sentence", id_column="uid", **kw)


@pytest.mark.parametrize("layout", ["parquet", "dict", "per_split"])
@pytest.mark.parametrize("streaming", [False, True])
def test_load_split_reads_every_local_layout_with_undecoded_audio(layouts, layout, streaming, tmp_path):
    ds = load_split(_entry(layouts / layout), "train", streaming=streaming, cache_dir=str(tmp_path))
    assert isinstance(ds, datasets.IterableDataset if streaming else datasets.Dataset)
    rows = list(ds)
    assert [r["uid"] for r in rows] == ["train-0", "train-1", "train-2"]
    assert set(column_names(ds)) >= {"audio", "sentence", "uid"}
    # Audio stays encoded ({bytes, path}); our decoder reads it.
    assert isinstance(rows[0]["audio"]["bytes"], bytes)
    assert len(decode_audio(rows[1]["audio"])) == 3200


def test_load_split_other_split_and_clear_errors(layouts, tmp_path):
    assert len(load_split(_entry(layouts / "parquet"), "validation", cache_dir=str(tmp_path))) == 2
    with pytest.raises(DataConfigError, match=r"no split 'test'.*data.datasets\[0\].splits"):
        load_split(_entry(layouts / "dict"), "test")
    with pytest.raises(DataConfigError, match="does not exist"):
        load_split(_entry(layouts / "nowhere"), "train")


def test_validate_columns_names_dataset_split_column_and_key():
    entry = DatasetEntry(name="mine", path="/x", text_column="transcript", id_column=None, index=2)
    with pytest.raises(DataConfigError) as err:
        validate_columns(entry, "train", ["audio", "sentence"])
    msg = str(err.value)
    for part in (
        "'mine'",
        "'train'",
        "'transcript'",
        "['audio', 'sentence']",
        "data.datasets[2].text_column",
    ):
        assert part in msg
    validate_columns(DatasetEntry(name="m", path="/x", text_column=None, id_column=None), "train", ["audio"])
    with pytest.raises(DataConfigError, match="speaker_column"):
        validate_columns(
            DatasetEntry(name="m", path="/x"), "train", ["audio", "text", "id"], need_speaker=True
        )


def test_dataset_entries_defaults_and_errors():
    entries = dataset_entries([{"name": "a", "path": "/a", "splits": "train"}, {"name": "b", "path": "/b"}])
    assert entries[0].splits == ["train"] and entries[1].index == 1 and entries[1].key == "data.datasets[1]"
    with pytest.raises(DataConfigError, match="unknown keys"):
        dataset_entries([{"name": "a", "path": "/a", "txt_column": "x"}])
    with pytest.raises(DataConfigError, match="unique"):
        dataset_entries([{"name": "a", "path": "/a"}, {"name": "a", "path": "/b"}])
    with pytest.raises(DataConfigError, match=r"data.datasets\[0\].path"):
        dataset_entries([{"name": "a", "path": "???"}])


def test_stable_ids_and_duration_column():
    assert stable_id("ds", "train", 7) == "ds:train:7"
    entry = DatasetEntry(name="m", path="/x")
    assert duration_column(entry, ["audio", "duration"]) == "duration"
    assert duration_column(entry, ["audio"]) is None


def _audio_folder(root, split, names, metadata="csv"):
    """`root/split/` as people keep their data: wav files beside a metadata file (datasets' audiofolder)."""
    import soundfile as sf

    (root / split / "sub").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for i, name in enumerate(names):
        sf.write(str(root / split / name), rng.uniform(-0.1, 0.1, 800 * (i + 1)).astype(np.float32), 8000)
    if metadata == "csv":
        lines = ["file_name,transcription"] + [f"{n},words of {n}" for n in names]
        (root / split / "metadata.csv").write_text("\n".join(lines) + "\n")
    elif metadata == "jsonl":
        rows = [f'{{"file_name": "{n}", "transcription": "words of {n}"}}' for n in names]
        (root / split / "metadata.jsonl").write_text("\n".join(rows) + "\n")


@pytest.mark.parametrize("metadata", ["csv", "jsonl"])
@pytest.mark.parametrize("streaming", [False, True])
def test_an_audio_folder_is_read_with_its_metadata(tmp_path, metadata, streaming):
    _audio_folder(tmp_path / "mine", "train", ["a.wav", "sub/b.wav"], metadata)
    entry = DatasetEntry(
        name="mine", path=str(tmp_path / "mine"), text_column="transcription", id_column=None
    )
    ds = load_split(entry, "train", streaming=streaming, cache_dir=str(tmp_path / "cache"))
    rows = list(ds)
    validate_columns(entry, "train", column_names(ds))
    assert [r["transcription"] for r in rows] == ["words of a.wav", "words of sub/b.wav"]
    assert rows[1]["audio"]["path"] == str(tmp_path / "mine" / "train" / "sub" / "b.wav")
    assert len(decode_audio(rows[1]["audio"])) == 3200  # 1600 samples at 8 kHz, resampled to 16 kHz


def test_audio_only_folders_flat_folders_and_unreadable_layouts(tmp_path):
    _audio_folder(tmp_path / "raw", "train", ["x.wav", "y.wav"], metadata=None)
    entry = DatasetEntry(name="raw", path=str(tmp_path / "raw"), text_column=None, id_column=None)
    rows = list(load_split(entry, "train"))
    assert [r["file_name"] for r in rows] == ["x.wav", "y.wav"] and rows[0]["audio"]["bytes"] is None
    # A flat folder (no split directories) is split `train`, as datasets' audiofolder reads it.
    flat = DatasetEntry(name="flat", path=str(tmp_path / "raw" / "train"), text_column=None, id_column=None)
    assert len(load_split(flat, "train")) == 2

    _audio_folder(tmp_path / "mine", "train", ["a.wav"])
    mine = DatasetEntry(name="mine", path=str(tmp_path / "mine"), text_column="transcription", id_column=None)
    with pytest.raises(DataConfigError, match=r"no split 'test'; its audio-folder splits are \['train'\]"):
        load_split(mine, "test")
    (tmp_path / "mine" / "train" / "metadata.csv").write_text("file_name,transcription\nghost.wav,boo\n")
    with pytest.raises(
        DataConfigError, match=r"1 file\(s\) named in .*metadata.csv do not exist.*'ghost.wav'"
    ):
        load_split(mine, "train")
    (tmp_path / "mine" / "train" / "metadata.csv").write_text("path,transcription\na.wav,boo\n")
    with pytest.raises(DataConfigError, match=r"metadata.csv has no column 'file_name'"):
        load_split(mine, "train")

    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    junk = DatasetEntry(name="junk", path=str(tmp_path / "junk"))
    with pytest.raises(
        DataConfigError, match=r"cannot read split 'train' of .*junk \(it holds: notes.txt;.*audiofolder"
    ):
        load_split(junk, "train")


def test_a_reader_is_chosen_by_inspection_or_by_name(tmp_path, layouts):
    from distil.data.entries import READERS

    _audio_folder(tmp_path / "mine", "train", ["a.wav"])
    assert [r.name for r in READERS.values() if r.finds(tmp_path / "mine", "train")][:1] == ["audiofolder"]
    assert [r.name for r in READERS.values() if r.finds(layouts / "parquet", "train")][:1] == ["tables"]
    assert [r.name for r in READERS.values() if r.finds(layouts / "dict", "train")][:1] == ["saved"]
    named = DatasetEntry(name="m", path=str(tmp_path / "mine"), text_column="transcription", id_column=None)
    named.reader = "audiofolder"
    assert len(load_split(named, "train")) == 1
    named.reader = "parquet"
    with pytest.raises(
        DataConfigError, match=r"data.datasets\[0\].reader='parquet' is not one of \['audiofolder'"
    ):
        load_split(named, "train")


def test_the_old_mixing_weight_key_gets_its_migration_line():
    with pytest.raises(DataConfigError, match=r"data.datasets\[0\].samples is now data.datasets\[0\].weight"):
        dataset_entries([{"name": "a", "path": "/data/a", "samples": 2.0}])
    (entry,) = dataset_entries([{"name": "a", "path": "/data/a", "splits": ["x", "y"], "weight": [1, 3]}])
    assert (entry.split_weight("x"), entry.split_weight("y")) == (1.0, 3.0)


def test_the_real_speech_set_is_complete_and_labelled():
    """The packaged real-speech set: every clip decodes at 16 kHz with the duration its row gives, and every row
    names its speaker, source and licence (docs/real-speech.md)."""
    import csv

    from distil.utils.paths import RESOURCES_DIR

    root = RESOURCES_DIR / "real_speech" / "test"
    rows = list(csv.DictReader((root / "metadata.csv").open()))
    assert len(rows) == 48 and len({r["speaker"] for r in rows}) == 6
    assert len({r["id"] for r in rows}) == 48
    for r in rows:
        assert r["text"].strip() and r["licence"] and r["source_package"] and r["transcript_source"], r["id"]
        wave = decode_audio({"path": str(root / r["file_name"]), "bytes": None}, 16_000)
        assert abs(len(wave) / 16_000 - float(r["duration"])) < 0.05, r["id"]
    assert sum(float(r["duration"]) for r in rows) > 300
