"""Hostile training data (issue 32): labels bound to their source and to the shards labelling wrote, an empty
split never marked complete, and raw-data training (`loss=finetune`) checking clips as labelling does.

The finished pseudo-label splits here are made by `label_jobs.finalise` from hand-written shards and their
`_progress` manifests (what the shard writer leaves), so no teacher runs."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import SR, cli, entry, wave, write_split

from distil.data.audio import AudioDecodeError, encode_flac
from distil.data.entries import DatasetEntry
from distil.data.label_jobs import NothingLabelledError, finalise
from distil.data.label_store import LABELS_METADATA, PROGRESS, SUCCESS, LabellingStateError
from distil.datamodules.filters import DataError
from distil.datamodules.speech import SpeechDataModule

ROWS = 6  # per shard


def make_dm(tiny_dir, datasets, pl_root, **kw) -> SpeechDataModule:
    kw.setdefault("batch_size", 2)
    kw.setdefault("validation_splits", [])
    kw.setdefault("cache_dir", str(pl_root / ".hf_cache"))
    return SpeechDataModule(datasets, tiny_dir, pseudo_labels_dir=str(pl_root), **kw)


def labelled_shards(pl_root: Path, name: str, tokenizer, rows: list[int], skipped: list[dict] = ()) -> Path:
    """`<pl_root>/<name>/train` as the shard writer leaves it: shard k with rows[k] labelled rows (its parquet
    file and its `_progress` manifest), `skipped` listed in the first manifest, the extent."""
    out = pl_root / name / "train"
    (out / PROGRESS).mkdir(parents=True)
    for k, n in enumerate(rows):
        shard = f"part-{k:05d}.parquet"
        if n:
            write_split(pl_root / "tmp", name, "train", n, tokenizer, id_offset=k * 100)
            shutil.move(pl_root / "tmp" / name / "train" / "part-00000.parquet", out / shard)
        manifest = {
            "shard": k,
            "units": n,
            "labelled": n,
            "clips": n,
            "skipped": list(skipped) if k == 0 else [],
        }
        manifest |= {"audio_seconds": 1.0, "truncated": 0, "file": shard if n else None}
        (out / PROGRESS / f"part-{k:05d}.json").write_text(json.dumps(manifest))
    shutil.rmtree(pl_root / "tmp", ignore_errors=True)
    extent = {"units": sum(rows) + len(skipped), "shards": len(rows), "planning_skipped": []}
    (out / PROGRESS / "extent.json").write_text(json.dumps(extent))
    return out


def finish(out: Path, source: Path) -> dict:
    """`finalise` as labelling calls it, for labels made from the dataset at `source`."""
    name = out.parent.name
    ds_entry = DatasetEntry(**{**entry(name, source.parent), "path": str(source)})
    meta = {"teacher": {}, "dataset": {"name": name, "path": str(source), "split": out.name}}
    return finalise(out, ds_entry, "en", False, meta)


def finished_labels(pl_root: Path, name: str, source: Path, tokenizer) -> Path:
    out = labelled_shards(pl_root, name, tokenizer, [ROWS, ROWS])
    finish(out, source)
    assert (out / SUCCESS).is_file()
    return out


@pytest.fixture
def raw(tmp_path) -> Path:
    """Two raw datasets, `good` and `other` (other clips, other sizes)."""
    write_split(tmp_path / "raw", "good", "train", 2 * ROWS, labelled=False)
    write_split(tmp_path / "raw", "other", "train", 2 * ROWS, labelled=False, id_offset=1000)
    return tmp_path / "raw"


# ============================================================ item 3: a finished split with a shard file lost


def test_a_lost_shard_file_is_refused_not_trained_around(tmp_path, raw, tiny_dir, tokenizer, caplog):
    pl = tmp_path / "pl"
    out = finished_labels(pl, "good", raw / "good", tokenizer)
    assert json.loads((out / LABELS_METADATA).read_text())["shards"]["rows"] == 2 * ROWS
    dm = make_dm(tiny_dir, [entry("good", raw)], pl)
    dm.setup("fit")
    assert dm.filter_stats["good/train"].total == 2 * ROWS

    (out / "part-00001.parquet").unlink()
    with pytest.raises(
        DataError, match=r"part-00001.parquet missing.*2 files, 12 rows.*restore the files, or delete"
    ):
        make_dm(tiny_dir, [entry("good", raw)], pl).setup("fit")
    shutil.copy(out / "part-00000.parquet", out / "part-00001.parquet")  # same rows again: a changed file
    with pytest.raises(DataError, match=r"part-00001.parquet changed"):
        make_dm(tiny_dir, [entry("good", raw)], pl).setup("fit")
    shutil.copy(out / "part-00000.parquet", out / "part-00002.parquet")
    with pytest.raises(DataError, match=r"part-00002.parquet extra"):
        make_dm(tiny_dir, [entry("good", raw)], pl).setup("fit")

    # Labels finished before the manifest existed: used, with a warning.
    (out / "part-00001.parquet").unlink()
    (out / "part-00002.parquet").unlink()
    meta = json.loads((out / LABELS_METADATA).read_text())
    del meta["shards"]
    (out / LABELS_METADATA).write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING):
        make_dm(tiny_dir, [entry("good", raw)], pl).setup("fit")
    assert "no shard manifest" in caplog.text


def test_a_shard_lost_before_finalise_is_not_marked_complete(tmp_path, raw, tokenizer):
    out = labelled_shards(tmp_path / "pl", "good", tokenizer, [ROWS, ROWS])
    (out / "part-00001.parquet").unlink()
    with pytest.raises(LabellingStateError, match=r"part-00001.parquet missing.*not marked complete"):
        finish(out, raw / "good")
    assert not (out / SUCCESS).exists()


# ============================================================ item 4: the labels of `good` for other data


def test_labels_are_refused_for_another_dataset_under_their_name(
    tmp_path, raw, tiny_dir, tokenizer, monkeypatch
):
    pl = tmp_path / "pl"
    finished_labels(pl, "good", raw / "good", tokenizer)
    elsewhere = {**entry("good", raw), "path": str(raw / "other")}
    with pytest.raises(
        DataError, match=r"made from .*raw/good, but data.datasets\[0\].path is .*raw/other"
    ) as err:
        make_dm(tiny_dir, [elsewhere], pl).setup("fit")
    assert "which holds other files" in str(err.value) and "another data.datasets[0].name" in str(err.value)
    assert "\n" not in str(err.value)

    # The same dataset, moved (or copied): the same files, so the labels are its labels.
    shutil.copytree(raw / "good", tmp_path / "moved" / "good")
    shutil.rmtree(raw / "good")
    make_dm(tiny_dir, [entry("good", tmp_path / "moved")], pl).setup("fit")
    # ... and a relative spelling of the recorded path is the same place.
    shutil.copytree(tmp_path / "moved" / "good", raw / "good")
    monkeypatch.chdir(tmp_path)
    make_dm(tiny_dir, [{**entry("good", raw), "path": "./raw/good"}], pl).setup("fit")


# ============================================================ item 8: every clip skipped


def test_a_split_with_nothing_labelled_is_never_marked_complete(tmp_path, raw, tokenizer):
    bad = [{"ids": [f"c{i}"], "indices": [i], "reason": "unreadable_audio", "detail": "x"} for i in range(3)]
    out = labelled_shards(tmp_path / "pl", "good", tokenizer, [0], skipped=bad)
    with pytest.raises(NothingLabelledError) as err:
        finish(out, raw / "good")
    message = str(err.value)
    assert "good/train: no clip was labelled (3 skipped: unreadable_audio" in message, message
    assert str(out / "skipped.jsonl") in message and "\n" not in message
    assert not (out / SUCCESS).exists()
    assert len((out / "skipped.jsonl").read_text().splitlines()) == 3  # the reasons are where it says


# ============================================================ items 2 and 16: raw data (loss=finetune)


def write_raw(root: Path, name: str) -> Path:
    """`<root>/<name>/train`: four good clips, a 44-s clip whose duration column says 3 s, an undecodable clip."""
    audio = [{"bytes": encode_flac(wave(1.0, i), SR), "path": None} for i in range(4)]
    audio += [
        {"bytes": encode_flac(wave(44.0, 4), SR), "path": None},
        {"bytes": b"RIFF garbage", "path": None},
    ]
    rows = {
        "audio": audio,
        "text": [f"clip number {i}" for i in range(6)],
        "id": [f"{name}-{i}" for i in range(4)] + ["long", "broken"],
        "speaker": ["s"] * 6,
        "duration": [1.0] * 4 + [3.0, 1.0],
    }
    out = root / name / "train"
    out.mkdir(parents=True)
    pq.write_table(pa.table(rows), out / "part-00000.parquet")
    return root / name


@pytest.mark.parametrize("max_duration_s", [30.0, None])
def test_raw_data_is_checked_on_its_decoded_audio_and_drops_are_listed(tmp_path, tiny_dir, max_duration_s):
    write_raw(tmp_path, "good")
    dm = make_dm(
        tiny_dir, [entry("good", tmp_path)], tmp_path, label_source="text", max_duration_s=max_duration_s
    )
    dm.setup("fit")
    stats = dm.filter_stats["good/train"]
    # Before: "kept 6/6 (dropped none)"; the 44-s clip was cut to 30 s against its whole transcript.
    assert (stats.total, stats.kept, dict(stats.dropped)) == (6, 4, {"too_long": 1, "unreadable_audio": 1})
    listed = {s["id"]: s for s in stats.as_dict()["skipped"]}
    assert set(listed) == {"long", "broken"} and listed["long"]["source"] == "good/train"
    assert "44.00 s > 30 s" in listed["long"]["detail"] and "cannot decode" in listed["broken"]["detail"]
    assert sorted(int(r) for _, r in dm.mixture.epoch_pairs(0)) == [0, 1, 2, 3]
    assert "2 listed by id in data_filter.json" in stats.summary()


def test_streamed_raw_data_is_checked_and_counted_too(tmp_path, tiny_dir):
    write_raw(tmp_path, "good")
    dm = make_dm(tiny_dir, [entry("good", tmp_path)], tmp_path, label_source="text", streaming=True)
    dm.setup("fit")
    assert dict(dm.filter_stats["good/train"].dropped) == {"too_long": 1, "unreadable_audio": 1}
    rows = [r for batch in dm.mixture.part_batches(0, 0, 1, False, 0, 1) for r in batch]
    assert sorted(r["sample_id"] for r in rows) == ["good-0", "good-1", "good-2", "good-3"]


def test_audio_that_fails_at_batch_time_names_its_sample(tmp_path, tiny_dir):
    """Checked data should never get there, but a clip rewritten since is named, not `<in-memory bytes>`."""
    write_raw(tmp_path, "good")
    dm = make_dm(tiny_dir, [entry("good", tmp_path)], tmp_path, label_source="text")
    dm.setup("fit")
    row = dm.mixture.fetch([[0, 0]])[0] | {"audio": {"bytes": b"RIFF garbage", "path": None}}
    with pytest.raises(AudioDecodeError, match=r"^good/train id good-0: cannot decode audio"):
        dm.collator([row])


@pytest.mark.slow  # ~20 s: the teacher loads in a subprocess
def test_labelling_a_split_of_undecodable_clips_fails_with_one_line(tmp_path, tiny_random_dir):
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    for name in ("whisper-tiny-random", "whisper-tiny.en"):
        (home / "models" / name).symlink_to(Path(tiny_random_dir).parent / name)
    data = home / "corpus" / "c" / "train"
    data.mkdir(parents=True)
    audio = [{"bytes": b"RIFF garbage", "path": None}] * 3
    pq.write_table(
        pa.table({"audio": audio, "text": ["a", "b", "c"], "id": ["x", "y", "z"]}), data / "p.parquet"
    )
    result = cli(
        "pseudo-label",
        "teacher=tiny_random",
        "data=custom",
        "progress_bar=false",
        "trainer.devices=1",
        f"data.datasets.0.path={data.parent}",
        "data.datasets.0.id_column=id",
        home=home,
        check=False,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert (
        last.startswith("error: custom/train: no clip was labelled (3 skipped") and "skipped.jsonl" in last
    ), last
    assert "Traceback" not in result.stderr and not list(home.rglob("_SUCCESS"))


def test_finetune_run_reports_and_lists_the_clips_it_dropped(tmp_path, monkeypatch, tiny_random_dir):
    """The real `loss=finetune` run (2 steps, ~10 s): data_filter.json counts and names the dropped clips."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from distil.train import train
    from distil.utils.paths import CONF_DIR

    monkeypatch.setenv("DISTIL_HOME", str(tmp_path))
    (tmp_path / "models").mkdir()
    for name in ("whisper-tiny-random", "whisper-tiny.en"):
        (tmp_path / "models" / name).symlink_to(Path(tiny_random_dir).parent / name)
    write_raw(tmp_path / "corpora", "good")
    overrides = [
        "teacher=tiny_random",
        "student=1dec",
        "trainer=debug",
        "trainer.max_steps=2",
        "loss=finetune",
    ]
    overrides += [
        "data.batch_size=2",
        "data.validation_splits=[]",
        "optim.warmup_steps=1",
        f"out_dir={tmp_path / 'run'}",
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("train", overrides=overrides)
    OmegaConf.set_struct(cfg, False)
    cfg.data.datasets = OmegaConf.create([entry("good", tmp_path / "corpora")])
    train(cfg)
    report = json.loads((tmp_path / "run" / "data_filter.json").read_text())["good/train"]
    assert (report["kept"], report["dropped"]) == (4, {"too_long": 1, "unreadable_audio": 1})
    assert sorted(s["id"] for s in report["skipped"]) == ["broken", "long"]


def test_raw_data_with_a_number_text_column_is_refused_naming_it(tmp_path, tiny_dir):
    """Item 12 for training: the reference text must be text, refused at set-up (was a crash in the collator)."""
    out = tmp_path / "nums" / "train"
    out.mkdir(parents=True)
    audio = [{"bytes": encode_flac(wave(1.0, i), SR), "path": None} for i in range(2)]
    pq.write_table(
        pa.table({"audio": audio, "text": [1, 2], "id": ["a", "b"], "speaker": ["s", "s"]}),
        out / "part-00000.parquet",
    )
    dm = make_dm(tiny_dir, [entry("nums", tmp_path)], tmp_path, label_source="text")
    with pytest.raises(DataError, match=r"text column 'text' holds int64, not strings"):
        dm.setup("fit")
