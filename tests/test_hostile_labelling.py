"""Hostile inputs to pseudo-labelling (issue 32): NaN/inf audio is skipped and listed; duplicate ids, a text column
that is not text, unreadable or empty tables and missing local paths are refused in one line before the teacher
loads (the loading checks live in `load_split`, so every stage that reads data gets them)."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from helpers import wave, write_split
from hydra import compose, initialize_config_dir
from test_bad_input import _cli, cli_home  # noqa: F401 - cli_home is a fixture used below

from distil.data.entries import DataConfigError, DatasetEntry, is_hub_id, load_split
from distil.pseudo_label import pseudo_label
from distil.utils.paths import CONF_DIR


def _cfg(home: Path, data_path: Path, *overrides: str, teacher_dir: Path | None = None):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(
            "pseudo_label",
            [
                f"paths.root={home}",
                "teacher=tiny_random",
                *([f"teacher.path={teacher_dir}"] if teacher_dir else []),
                "data=custom",
                f"data.datasets.0.path={data_path}",
                "data.datasets.0.id_column=id",
                "batch_size=4",
                "shard_size=4",
                "progress_bar=false",
                "trainer.devices=1",
                *overrides,
            ],
        )


@pytest.fixture
def no_teacher(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the teacher was resolved before the input was checked")

    monkeypatch.setattr("distil.whisper.models.resolve_model", refuse)


def _float_wav(samples: np.ndarray) -> dict:
    buffer = io.BytesIO()
    sf.write(buffer, samples, 16000, format="WAV", subtype="FLOAT")  # float WAV keeps NaN/inf; FLAC cannot
    return {"bytes": buffer.getvalue(), "path": None}


def test_nan_and_inf_audio_is_skipped_and_listed(tmp_path, tiny_random_dir):
    """Item 1: NaN audio was labelled ("!" tokens, pl_wer 100) instead of being skipped like undecodable audio."""
    corpus = tmp_path / "corpus"
    split = write_split(corpus, "c", "train", 4, labelled=False)
    table = pq.read_table(split / "part-00000.parquet")
    audio = table.column("audio").to_pylist()
    partly = wave(0.5, 1)
    partly[10:20], partly[30] = np.nan, np.inf
    audio[1] = _float_wav(np.full(8000, np.nan, dtype=np.float32))  # wholly NaN
    audio[2] = _float_wav(partly)  # 10 NaN and one inf sample
    table = table.set_column(0, "audio", [audio])
    pq.write_table(table.replace_schema_metadata(table.schema.metadata), split / "part-00000.parquet")

    summary = pseudo_label(
        _cfg(tmp_path, corpus / "c", teacher_dir=tiny_random_dir), run_dir=tmp_path / "run"
    )
    result = summary["splits"]["custom/train"]
    out = Path(result["out_dir"])
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert [(s["ids"], s["reason"]) for s in skipped] == [
        (["c-1"], "unreadable_audio"),
        (["c-2"], "unreadable_audio"),
    ]
    assert "has 8000 non-finite (NaN/inf) samples of 8000" in skipped[0]["detail"]
    assert "has 11 non-finite (NaN/inf) samples of 8000" in skipped[1]["detail"]
    labelled = [r["id"] for f in sorted(out.glob("part-*.parquet")) for r in pq.read_table(f).to_pylist()]
    assert labelled == ["c-0", "c-3"] and result["skipped"] == 2


def test_duplicate_ids_are_refused_before_the_teacher_loads(tmp_path, no_teacher):
    """Item 11: duplicates were found only after the whole split was labelled, with advice that could not help."""
    ids = ["a", "b", "a", "c", "b", "a"]
    write_split(tmp_path / "corpus", "c", "train", 6, labelled=False, extra_columns={"id": ids})
    cfg = _cfg(tmp_path, tmp_path / "corpus" / "c")
    with pytest.raises(DataConfigError) as err:
        pseudo_label(cfg, run_dir=tmp_path / "run")
    assert str(err.value) == (
        "dataset 'custom' split 'train': id column 'id' (data.datasets[0].id_column) has 2 ids that occur more "
        "than once ('a' at rows [0, 2, 5], 'b' at rows [1, 4]); make the ids unique in the data, or set "
        "data.datasets[0].id_column=null for generated ids"
    )
    assert not (Path(cfg.out_dir) / "custom").exists()  # nothing labelled, no claim left behind


def test_missing_ids_are_refused_before_the_teacher_loads(tmp_path, no_teacher):
    write_split(tmp_path / "corpus", "c", "train", 3, labelled=False, extra_columns={"id": ["a", None, "c"]})
    with pytest.raises(DataConfigError, match=r"id column 'id' .* is empty in 1 rows \(rows \[1\]\)"):
        pseudo_label(_cfg(tmp_path, tmp_path / "corpus" / "c"), run_dir=tmp_path / "run")


@pytest.mark.parametrize("streaming", ["false", "true"])  # the type comes from the schema, no row is read
def test_an_integer_text_column_is_refused_before_the_teacher_loads(tmp_path, no_teacher, streaming):
    """Item 12: an int text column failed with AttributeError after the teacher labelled a batch."""
    write_split(tmp_path / "corpus", "c", "train", 3, labelled=False, extra_columns={"text": [1, 2, 3]})
    cfg = _cfg(tmp_path, tmp_path / "corpus" / "c", f"streaming={streaming}")
    with pytest.raises(DataConfigError) as err:
        pseudo_label(cfg, run_dir=tmp_path / "run")
    assert str(err.value) == (
        "dataset 'custom' split 'train': text column 'text' holds int64, not strings; cast it to string in the "
        "data, or set data.datasets[0].text_column to a text column (null for audio-only data)"
    )
    assert not (Path(cfg.out_dir) / "custom").exists()


def _bad_tables(root: Path, case: str) -> Path:
    """A split `root/<case>/train` that datasets cannot read: no rows, a text file named .parquet, or one good
    parquet file beside one cut short."""
    good = write_split(root / "good", "c", "train", 2, labelled=False) / "part-00000.parquet"
    split = root / case / "train"
    split.mkdir(parents=True)
    if case == "zero_rows":
        pq.write_table(pq.read_table(good).slice(0, 0), split / "part-00000.parquet")
    elif case == "not_parquet":
        (split / "part-00000.parquet").write_text("id,text\n1,hello\n")
    else:
        shutil.copy(good, split / "part-00000.parquet")
        (split / "part-00001.parquet").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    return root / case


@pytest.mark.parametrize(
    ("case", "message"),
    [
        (
            "zero_rows",
            r"dataset 'x' split 'train' \(.*/zero_rows/train\) holds no rows; add data to it or remove ",
        ),
        (
            "not_parquet",
            r"split 'train': .*/not_parquet/train/part-00000.parquet is not a readable parquet file",
        ),
        (
            "one_corrupt",
            r"split 'train': .*/one_corrupt/train/part-00001.parquet is not a readable parquet file",
        ),
    ],
    ids=["zero_rows", "not_parquet", "one_corrupt"],
)
@pytest.mark.parametrize("streaming", [False, True])
def test_unreadable_or_empty_tables_are_one_line_naming_the_file(tmp_path, case, message, streaming):
    """Item 13: these were DatasetGenerationError / ArrowInvalid tracebacks."""
    path = _bad_tables(tmp_path, case)
    with pytest.raises(DataConfigError, match=message):
        load_split(DatasetEntry(name="x", path=str(path)), "train", streaming, cache_dir=str(tmp_path / "hf"))


def test_an_unreadable_jsonl_is_one_line_naming_the_split(tmp_path):
    (tmp_path / "x" / "train").mkdir(parents=True)
    (tmp_path / "x" / "train" / "a.jsonl").write_text('{"audio": "a.wav", "text": "hi"}\n{not json\n')
    with pytest.raises(
        DataConfigError, match=r"cannot read split 'train' from .*/x/train \(ArrowInvalid: JSON"
    ):
        load_split(DatasetEntry(name="x", path=str(tmp_path / "x")), "train", cache_dir=str(tmp_path / "hf"))


@pytest.mark.slow  # a subprocess; the loader test above covers the message in process
def test_a_corrupt_parquet_file_is_one_line_from_the_command(cli_home):  # noqa: F811 - the fixture
    result = _cli(
        cli_home,
        "distil.pseudo_label",
        "teacher=tiny_random",
        "data=custom",
        f"data.datasets.0.path={_bad_tables(cli_home / 'bad', 'one_corrupt')}",
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "Failed to read" not in result.stderr, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: dataset 'custom' split 'train': ") and "part-00001.parquet" in last, last


@pytest.mark.parametrize("path", ["./mydata", "../x", "~/no-such-data", "/no/such/data", "a/b/c", "mydata/"])
def test_a_missing_local_path_is_refused_as_a_path(tmp_path, monkeypatch, path):
    """Item 14: a local-looking path that does not exist went to the Hub (ConnectionError after ~35 s)."""
    monkeypatch.chdir(tmp_path)
    entry = DatasetEntry(name="x", path=path, index=2)
    resolved = Path(path).expanduser().absolute()
    with pytest.raises(DataConfigError) as err:
        load_split(entry, "train")
    assert f"local path {resolved} does not exist (data.datasets[2].path={path};" in str(err.value)


def test_hub_ids_are_told_from_local_paths():
    for hub in (
        "openai/librispeech",
        "librispeech_asr",
        "facebook/multilingual_librispeech",
        "data/x",
        "a.b/c-d",
    ):
        assert is_hub_id(hub), hub
    for local in ("./mydata", "../x", "/data/x", "~/x", "a/b/c", "mydata/", ".hidden", "-x", ""):
        assert not is_hub_id(local), local
