"""Hostile training data (issue 32): raw-data training (`loss=finetune`) checking clips as labelling does."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import SR, entry, wave

from distil.data.audio import AudioDecodeError, encode_flac
from distil.datamodules.speech import SpeechDataModule


def make_dm(tiny_dir, datasets, pl_root, **kw) -> SpeechDataModule:
    kw.setdefault("batch_size", 2)
    kw.setdefault("validation_splits", [])
    kw.setdefault("cache_dir", str(pl_root / ".hf_cache"))
    return SpeechDataModule(datasets, tiny_dir, pseudo_labels_dir=str(pl_root), **kw)


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
