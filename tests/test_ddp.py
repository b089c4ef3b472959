"""Two-process DDP distillation on CPU (gloo), launched as a user does: `python -m distil.train trainer.devices=2`.

`trainer.strategy=auto` with 2 devices is Lightning's `ddp` with its script launcher: process 0 re-runs the
same command line for process 1 (adding `hydra.run.dir` so both share one Hydra run directory), so both
derive the same out_dir and checkpoint, and nothing is pickled. That is also what SLURM and torchrun
launch. `ddp_spawn` (pickles module and datamodule into fresh interpreters) is for a local Hydra `-m`
multirun, where re-running the command would re-run the sweep; `ddp_fork` forks a process whose torch
threads already run (it exists for notebooks). Each run here: tiny random teacher, 16 training samples,
batch 4 per process, so an epoch is 2 optimiser steps of 2 processes; ~20 s on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import entry, write_split

TEACHER = "whisper-tiny-random"
DATASETS = {"espeak": 0, "flite": 100, "festival": 200}  # conf/data/synthetic.yaml's names -> id offsets
TRAIN_SAMPLES = {"espeak": 8, "flite": 4, "festival": 4}  # an epoch: 16 samples, 2 steps of 4 per process x 2
VAL_SAMPLES = 6  # per dataset
BASE = [
    "teacher=tiny_random",
    "student=1dec",
    "trainer=debug",  # validation every 2 batches per process, i.e. every 2 optimiser steps
    "trainer.limit_val_batches=null",
    "data.batch_size=4",
    "data.val_batch_size=2",
    "data.stopping_strategy=all_exhausted_without_replacement",  # an epoch: every sample once
    "optim.warmup_steps=1",
    "val.max_new_tokens=8",
    "checkpoint.every_n_steps=1",
    "record_samples=true",
]
TWO = ["trainer.devices=2"]  # strategy auto -> ddp, accelerator cpu -> gloo


@pytest.fixture(scope="module")
def home(tmp_path_factory, tiny_random_dir) -> Path:
    """A DISTIL_HOME with the tiny random teacher, pseudo-labels of the synthetic datasets, and their validation splits."""
    from transformers import WhisperTokenizerFast

    home = tmp_path_factory.mktemp("ddp_home")
    (home / "models").mkdir()
    for name in (TEACHER, "whisper-tiny.en"):  # the random teacher borrows tiny.en's processor
        (home / "models" / name).symlink_to(Path(tiny_random_dir).parent / name)
    tok = WhisperTokenizerFast.from_pretrained(tiny_random_dir)
    for name, offset in DATASETS.items():
        write_split(
            home / "pseudo_labels" / TEACHER, name, "train", TRAIN_SAMPLES[name], tok, id_offset=offset
        )
        write_split(home / "corpora", name, "validation", VAL_SAMPLES, labelled=False, id_offset=offset + 50)
    return home


def distil_train(home: Path, *overrides: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "distil.train", *BASE, *overrides],
        capture_output=True,
        text=True,
        timeout=300,  # a rank that never joins would otherwise hang the suite
        env={**os.environ, "DISTIL_HOME": str(home), "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def records(out_dir: Path) -> dict[int, list[dict]]:
    """SampleRecord's lines per rank."""
    return {
        int(p.stem.split("-")[1]): [json.loads(line) for line in p.read_text().splitlines()]
        for p in sorted((out_dir / "samples").glob("rank-*.jsonl"))
    }


def ids_by_epoch(recs: dict[int, list[dict]]) -> dict[int, dict[int, list[str]]]:
    """epoch -> rank -> sample ids trained on."""
    out: dict[int, dict[int, list[str]]] = {}
    for rank, rows in recs.items():
        for row in rows:
            out.setdefault(row["epoch"], {}).setdefault(rank, []).extend(row["ids"])
    return out


def all_train_ids() -> set[str]:
    return {
        f"{name}/train/{name}-{offset + i}"
        for name, offset in DATASETS.items()
        for i in range(TRAIN_SAMPLES[name])
    }


def assert_each_epoch_split_between_ranks(recs: dict[int, list[dict]], epochs: int) -> None:
    by_epoch = ids_by_epoch(recs)
    assert sorted(by_epoch) == list(range(epochs))
    for epoch, per_rank in by_epoch.items():
        r0, r1 = per_rank[0], per_rank[1]
        assert len(set(r0)) == len(r0) and len(set(r1)) == len(r1), epoch  # no repeat within a rank
        assert not set(r0) & set(r1), epoch  # disjoint
        assert set(r0) | set(r1) == all_train_ids(), epoch  # together: the whole epoch


def tensorboard_scalars(out_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (out_dir / "tensorboard").glob("events.out.tfevents.*")  # one writer: rank 0's
    acc = EventAccumulator(str(events))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def checkpoint(out_dir: Path, name: str) -> dict:
    return torch.load(out_dir / "checkpoints" / name, map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def run(home) -> Path:
    """A 2-process map-style run of 4 steps (2 data epochs) that keeps every step's checkpoint.

    out_dir is not pinned: each process derives it from the overrides, so they must agree."""
    distil_train(home, *TWO, "trainer.max_steps=4", "callbacks.last_checkpoint.save_top_k=-1")
    (summary,) = (home / "students").glob("*/*/train_summary.json")
    return summary.parent


def test_ranks_train_on_disjoint_halves_of_every_epoch(run):
    recs = records(run)
    assert sorted(recs) == [0, 1]
    assert [r["step"] for r in recs[0]] == [r["step"] for r in recs[1]] == [0, 1, 2, 3]
    assert_each_epoch_split_between_ranks(recs, epochs=2)
    # global batch j goes to rank j % 2: process 0 trains on batches 0, 2, 4, 6
    assert [r["batch"] for r in recs[0]] == [0, 2, 4, 6] and [r["batch"] for r in recs[1]] == [1, 3, 5, 7]


def test_only_rank_zero_writes_run_files(run, home):
    files = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())
    assert not [f for f in files if ".tmp" in f], files  # no partial writes left behind
    top = {f.split("/")[0] for f in files}
    assert top == {
        "best",
        "last",
        "checkpoints",
        "config.yaml",
        "run_info.json",
        "data_filter.json",
        "data_fingerprint.json",
        "run_config.json",
        "samples",
        "tensorboard",
        "train_summary.json",
    }, files
    ckpts = sorted(f for f in files if f.startswith("checkpoints/"))
    assert ckpts == ["checkpoints/best.ckpt", "checkpoints/last.ckpt"] + [
        f"checkpoints/step-step={s}.ckpt" for s in (1, 2, 3, 4)
    ]
    assert [f for f in files if f.startswith("tensorboard/")] == [
        "tensorboard/" + p.name for p in sorted((run / "tensorboard").iterdir())
    ]
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["global_step"] == 4 and summary["processes"] == 2
    assert summary["effective_batch_size"] == 4 * 2  # data.batch_size x 2 processes
    assert set(summary["exports"]) == {"best", "last"}
    assert (
        json.loads((run / "data_filter.json").read_text())["espeak/train"]["kept"] == TRAIN_SAMPLES["espeak"]
    )
    assert checkpoint(run, "last.ckpt")["global_step"] == 4
    from transformers import WhisperForConditionalGeneration

    for name in ("best", "last"):
        WhisperForConditionalGeneration.from_pretrained(run / name)
    # both processes ran, each logging to its own file in the one Hydra run directory
    (hydra_dir,) = [
        d
        for d in (home / "runs" / "train").iterdir()
        if f"out_dir: {run}\n" in (d / "config.yaml").read_text()
    ]
    assert sorted(p.name for p in hydra_dir.glob("*.log")) == ["train.log", "train_ddp_process_1.log"]


def test_validation_wer_is_over_both_ranks(run, home):
    """The WER logged by the 2-process run equals a 1-process validation of the same checkpoint, and it is
    over all samples of each set. (The tiny random student transcribes everything as one nonsense word, so
    its WER is 100 on every sample: the sample counts are what tell a rank's share from the whole set.)"""
    import lightning as L

    from distil.datamodules.speech import SpeechDataModule
    from distil.modules.distiller import WhisperDistiller

    summary = json.loads((run / "train_summary.json").read_text())
    best = checkpoint(run, "best.ckpt")
    logged = tensorboard_scalars(run)
    step = best["global_step"] - 1  # Lightning logs a validation after step n at TensorBoard step n - 1
    for name in DATASETS:  # every sample of each set, not a rank's 3
        assert logged[f"val/{name}/validation/samples"][step] == VAL_SAMPLES

    module = WhisperDistiller.load_from_checkpoint(run / "checkpoints" / "best.ckpt", map_location="cpu")
    datamodule = SpeechDataModule(
        [entry(name, home / "corpora") for name in DATASETS],
        module.hparams.student_dir,
        pseudo_labels_dir=str(home / "pseudo_labels" / TEACHER),
        val_batch_size=2,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.validate(module, datamodule=datamodule, verbose=False)
    single = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert single["val/wer_weighted"] == pytest.approx(summary["best_val_wer_weighted"], abs=1e-4)
    for name in DATASETS:
        key = f"val/{name}/validation/wer"
        assert single[key] == pytest.approx(logged[key][step], abs=1e-4), key


@pytest.mark.slow  # ~45 s: the default run checks map-style DDP; test_speech_datamodule the per-rank stream split
def test_streaming_ranks_train_on_disjoint_halves_of_every_epoch(home, tmp_path):
    """~45 s: datasets sleeps 5 s whenever a streamed parquet source or an interleaving of them is read to
    its end (`datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN`, an Arrow thread-shutdown workaround): for the
    filter counts and at the end of each epoch. Long epochs never notice."""
    out = tmp_path / "stream"
    distil_train(
        home,
        *TWO,
        "data.streaming=true",
        "trainer.max_steps=4",
        "trainer.limit_val_batches=0",
        "export=false",
        f"out_dir={out}",
    )
    assert_each_epoch_split_between_ranks(records(out), epochs=2)
    assert checkpoint(out, "last.ckpt")["global_step"] == 4
    # each rank counted the filters over its own part of the stream; the report holds the sums
    assert {k: v["kept"] for k, v in json.loads((out / "data_filter.json").read_text()).items()} == {
        f"{name}/train": TRAIN_SAMPLES[name] for name in DATASETS
    }


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        torch.testing.assert_close(b[key], value, rtol=1e-4, atol=1e-6, msg=key)


def _adam_steps(ckpt: dict) -> set[int]:
    return {int(s["step"]) for s in ckpt["optimizer_states"][0]["state"].values()}


@pytest.mark.slow  # ~25 s: three DDP runs
def test_two_process_checkpoint_resumes_in_two_and_in_one_process(run, home, tmp_path):
    """Resume step 1 of the 2-process run in 2 processes and in 1: both continue its optimiser and schedule and
    train on the batches that come next (across the epoch boundary); in 2 processes they are the straight
    run's own, so it ends with the straight run's weights."""
    straight = checkpoint(run, "last.ckpt")
    straight_batches = {row["batch"]: row for rows in records(run).values() for row in rows}
    start = run / "checkpoints" / "step-step=1.ckpt"
    # quoted: the run directory's name holds '=' (Hydra's override grammar would split at it)
    common = [f"ckpt_path='{start}'", "trainer.max_steps=4", "trainer.limit_val_batches=0", "export=false"]
    for name, devices, batches in (("two", 2, range(2, 8)), ("one", 1, range(2, 5))):
        out = tmp_path / name
        distil_train(home, *common, f"trainer.devices={devices}", f"out_dir={out}")
        resumed = checkpoint(out, "last.ckpt")
        assert resumed["global_step"] == 4, name
        assert _adam_steps(resumed) == {4}, name
        assert resumed["lr_schedulers"][0]["last_epoch"] == 4, name
        rows = [row for rank_rows in records(out).values() for row in rank_rows]
        assert sorted(r["batch"] for r in rows) == list(batches), name  # not batches 0-1 again
        for row in rows:  # global batch j holds the same samples whatever the number of processes
            same = straight_batches[row["batch"]]
            assert (row["ids"], row["epoch"]) == (same["ids"], same["epoch"]), name
        if devices == 2:
            assert [(r["batch"], r["step"]) for r in rows] == [
                (j, straight_batches[j]["step"]) for j in (2, 4, 6, 3, 5, 7)
            ]
            _assert_same_weights(straight["state_dict"], resumed["state_dict"])


def test_accumulation_in_one_process_trains_like_two_processes(run, home, tmp_path):
    """Effective batch = data.batch_size x devices x num_nodes x accumulate_grad_batches: 1 process
    accumulating 2 batches per step trains on the same batches per step as 2 processes, to the same weights."""
    out = tmp_path / "accumulated"
    distil_train(
        home,
        "trainer.devices=1",
        "trainer.accumulate_grad_batches=2",
        "trainer.max_steps=4",
        "trainer.limit_val_batches=0",
        "export=false",
        f"out_dir={out}",
    )
    straight = {row["batch"]: row for rows in records(run).values() for row in rows}
    (rows,) = records(out).values()
    assert [(r["batch"], r["step"], r["ids"]) for r in rows] == [
        (j, straight[j]["step"], straight[j]["ids"]) for j in range(8)
    ]
    accumulated = checkpoint(out, "last.ckpt")
    assert accumulated["global_step"] == 4
    _assert_same_weights(checkpoint(run, "last.ckpt")["state_dict"], accumulated["state_dict"])
    summary = json.loads((out / "train_summary.json").read_text())
    assert (summary["processes"], summary["effective_batch_size"]) == (1, 4 * 2)


def test_effective_batch_size_is_per_process_batch_times_processes_times_accumulation():
    from distil.training.optim import effective_batch_size

    assert effective_batch_size(8, devices=1) == 8
    assert effective_batch_size(8, devices=2) == 16
    assert effective_batch_size(8, devices=8, num_nodes=4, accumulate_grad_batches=2) == 512
    with pytest.raises(ValueError, match="trainer.accumulate_grad_batches"):
        effective_batch_size(8, devices=2, accumulate_grad_batches=0)


def test_resumed_stream_position_comes_from_the_checkpoint_not_the_new_world_size(tmp_path):
    """The schedule counts optimiser steps (trainer.max_steps) whatever the processes; the data position is
    steps x accumulation x processes of the run that took them, recorded in the checkpoint."""
    from types import SimpleNamespace

    from distil.datamodules.speech import SpeechDataModule

    dm = SpeechDataModule([entry("a", tmp_path)], str(tmp_path), label_source="text")
    dm.trainer = SimpleNamespace(global_step=3, accumulate_grad_batches=2, global_rank=0, world_size=4)
    assert dm.consumed_batches() == 24  # no checkpoint: every step so far had this shape
    saved = dm.state_dict()
    assert saved["consumed_batches"] == 24 and saved["global_step"] == 3
    resumed = SpeechDataModule([entry("a", tmp_path)], str(tmp_path), label_source="text")
    resumed.trainer = SimpleNamespace(global_step=3, accumulate_grad_batches=2, global_rank=0, world_size=1)
    resumed.load_state_dict(saved)
    assert resumed.consumed_batches() == 24  # not 3 x 2 x 1
    resumed.trainer.global_step = 5  # two more steps of 2 batches in 1 process
    assert resumed.consumed_batches() == 28
