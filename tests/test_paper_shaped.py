"""`experiment=paper` end to end on local stand-ins shaped like its nine datasets (CPU, tiny random teacher).

Each stand-in has the column names, id/speaker columns, split names and language that conf/experiment/paper.yaml
gives for the Hub dataset, TTS audio, and the rows real corpora break training with: references that normalise
to empty (AMI's "Mm-hmm.", GigaSpeech's "<SIL>", TED-LIUM's "<unk>"), upper-case
references with punctuation tags (GigaSpeech), a clip over 30 s and an undecodable file. Labelling and
training run as the stages do (Hydra-composed configs), streaming as in the paper config.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from distil.data.audio import SAMPLING_RATE, encode_flac
from distil.pseudo_label import pseudo_label
from distil.train import train
from distil.utils.paths import CONF_DIR

TEACHER = "whisper-tiny-random"
# Rows real corpora have and synthetic ones do not, by dataset (the other rows are plain TTS sentences).
ODD_ROWS = {
    "ami": ["Mm-hmm.", "UM"],
    "gigaspeech": ["<SIL>", "AS THEY'RE LEAVING <COMMA> CAN YOU PULL HER ASIDE <QUESTIONMARK>"],
    "tedlium": ["<unk>"],
    "common_voice": ["(laughs)"],
}
LONG_CLIP = ("peoples_speech", "train")  # a 31-s clip: labelling lists it as too_long
BAD_AUDIO = ("voxpopuli", "train")  # an undecodable file: labelling lists it as unreadable_audio


def paper_config(stage: str, overrides=()):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(stage, overrides=list(overrides))


def build_standins(root: Path, clips: list[dict], entries: list[dict]) -> None:
    """One small split directory per (dataset, split) of `entries`, with that dataset's own column names."""
    k = 0
    for e in entries:
        for split in e["splits"]:
            texts = [c["text"] for c in clips[k % len(clips) :][:2]] + ODD_ROWS.get(e["name"], [])
            rows = []
            for i, text in enumerate(texts):
                clip = clips[(k + i) % len(clips)]["audio"]
                row = {e["audio_column"]: {"bytes": encode_flac(clip, SAMPLING_RATE), "path": None}}
                row[e["text_column"]] = text
                if e.get("id_column"):
                    row[e["id_column"]] = f"{e['name']}-{split}-{i}"
                if e.get("speaker_column"):
                    row[e["speaker_column"]] = f"spk{i % 2}"
                rows.append(row)
            if (e["name"], split) == LONG_CLIP:
                rows[0][e["audio_column"]]["bytes"] = encode_flac(
                    np.resize(clips[0]["audio"], 31 * SAMPLING_RATE), SAMPLING_RATE
                )
            if (e["name"], split) == BAD_AUDIO:
                rows[0][e["audio_column"]]["bytes"] = b"RIFF garbage"
            k += 1
            out = root / e["name"] / split
            out.mkdir(parents=True)
            ds = datasets.Dataset.from_list(rows).cast_column(e["audio_column"], datasets.Audio(decode=False))
            ds.to_parquet(str(out / "data.parquet"))


@pytest.fixture
def home(tmp_path, monkeypatch, tiny_random_dir) -> Path:
    monkeypatch.setenv("DISTIL_HOME", str(tmp_path))
    (tmp_path / "models").mkdir()
    for name in (TEACHER, "whisper-tiny.en"):  # the random teacher borrows tiny.en's processor
        (tmp_path / "models" / name).symlink_to(Path(tiny_random_dir).parent / name)
    return tmp_path


@pytest.mark.slow  # about 15 s: the paper recipe end to end on local stand-ins
def test_paper_recipe_runs_on_paper_shaped_data(home, tts_clips):
    paper = paper_config("train", ["experiment=paper"])
    train_entries = OmegaConf.to_container(paper.data.datasets)
    val_entries = OmegaConf.to_container(paper.data.validation_datasets)
    assert [e["name"] for e in train_entries] == [
        "librispeech", "common_voice", "voxpopuli", "tedlium", "peoples_speech",
        "gigaspeech", "ami", "spgispeech", "earnings22",
    ]  # fmt: skip
    corpora = home / "standins"
    build_standins(corpora, tts_clips, train_entries + val_entries)
    for e in train_entries + val_entries:
        e["path"] = str(corpora / e["name"])

    # Stage 1: the tiny random teacher labels every split of every dataset.
    label_cfg = paper_config("pseudo_label", ["teacher=tiny_random", "progress_bar=false"])
    label_cfg.data.datasets = OmegaConf.create(train_entries)
    labelled = pseudo_label(label_cfg, run_dir=home / "label_run")["splits"]
    assert len(labelled) == 11  # 9 datasets, LibriSpeech with its 3 training splits
    skipped = {name: s["skipped"] for name, s in labelled.items() if s["skipped"]}
    assert skipped == {"peoples_speech/train": 1, "voxpopuli/train": 1}
    skip_reasons = [
        json.loads(line)["reason"]
        for name in skipped
        for line in (Path(label_cfg.out_dir) / name / "skipped.jsonl").read_text().splitlines()
    ]
    assert sorted(skip_reasons) == ["too_long", "unreadable_audio"]
    wers = [
        w
        for name in labelled
        for w in datasets.load_dataset(
            "parquet", data_files=str(Path(label_cfg.out_dir) / name / "*.parquet"), split="train"
        )["pl_wer"]
    ]
    scored = sorted(w for w in wers if w is not None)
    assert wers.count(None) == 5  # every reference that normalises to empty: no WER, never 0 or 100
    threshold = float(np.median(scored))  # a threshold that keeps some samples and drops others

    # Stage 3: experiment=paper on CPU, a few steps, streaming as the paper config does.
    train_cfg = paper_config(
        "train",
        [
            "experiment=paper",
            "teacher=tiny_random",
            "trainer=cpu",
            "trainer.devices=1",
            "trainer.max_steps=2",
            "trainer.val_check_interval=2",
            "trainer.precision=32-true",
            "checkpoint.every_n_steps=2",
            "data.batch_size=2",
            "data.val_batch_size=2",
            "data.num_workers=0",
            "data.max_val_samples=2",
            "data.shuffle_buffer_size=8",
            f"data.wer_threshold={threshold}",
            "model.gradient_checkpointing=false",
            "val.max_new_tokens=4",
            f"out_dir={home / 'run'}",
        ],
    )
    assert train_cfg.data.streaming
    train_cfg.data.datasets = OmegaConf.create(train_entries)
    train_cfg.data.validation_datasets = OmegaConf.create(val_entries)
    result = train(train_cfg)

    by_source = json.loads((home / "run" / "data_filter.json").read_text())
    assert set(by_source) == set(labelled)
    dropped = {}
    for s in by_source.values():
        assert s["kept"] + sum(s["dropped"].values()) == s["total"]  # nothing silently lost
        for reason, n in s["dropped"].items():
            dropped[reason] = dropped.get(reason, 0) + n
    assert dropped["no_reference"] == 5 and dropped["wer"] > 0
    assert sum(s["total"] for s in by_source.values()) == len(wers)
    assert result["global_step"] == 2
    assert (home / "run" / "last" / "model.safetensors").is_file()  # trained and exported
