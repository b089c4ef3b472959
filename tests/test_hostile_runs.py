"""Hostile runs (issue 32): signals a scheduler sends, a resume with other settings, two runs on one directory.

SIGTERM (SLURM's notice before it kills) stops labelling after the shard in hand and training after the batch
in hand with last.ckpt saved; both exit non-zero with one line, and the same command then completes to the
output of an uninterrupted run. A resume whose training settings changed is refused unless `resume=force`
(which then applies them); a run directory is locked while a run writes it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import cli, dead_pid, write_split

TEACHER = "whisper-tiny-random"


def make_home(root: Path, models: Path, clips: int) -> Path:
    """A DISTIL_HOME with the tiny random teacher (and the tiny.en processor it borrows) and one corpus."""
    (root / "models").mkdir(parents=True)
    for name in (TEACHER, "whisper-tiny.en"):
        (root / "models" / name).symlink_to(models / name)
    write_split(root / "corpus", "c", "train", clips, labelled=False)
    return root


def start(home: Path, module: str, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "DISTIL_HOME": str(home), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", module, *overrides],
        env=env,
        cwd=home,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def wait_for(proc: subprocess.Popen, ready, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not ready():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(proc.communicate()[1][-3000:])
        time.sleep(0.05)


def label_overrides(home: Path, devices: int = 2) -> list[str]:
    return [
        "teacher=tiny_random",
        "data=custom",
        f"data.datasets.0.path={home / 'corpus' / 'c'}",
        "progress_bar=false",
        "shard_size=1",
        "min_shards=1",
        "batch_size=1",
        f"trainer.devices={devices}",  # 2: forked CPU ranks; the signal reaches the parent, which passes it on
    ]


def read_rows(split_dir: Path) -> list[dict]:
    return [row for f in sorted(split_dir.glob("part-*.parquet")) for row in pq.read_table(f).to_pylist()]


@pytest.mark.slow  # three labelling runs of a few clips (~1-2 min on 2 shared cores)
@pytest.mark.parametrize(
    ("devices", "signum"),
    [(2, signal.SIGTERM), (1, signal.SIGUSR1)],
    ids=["forked ranks, SIGTERM", "one process, SIGUSR1"],
)
def test_sigterm_stops_labelling_after_the_shard_and_the_rerun_completes(
    tmp_path, tiny_random_dir, devices, signum
):
    models = Path(tiny_random_dir).parent
    reference = make_home(tmp_path / "reference", models, clips=8)
    rc, err = finish(start(reference, "distil.pseudo_label", *label_overrides(reference, devices)))
    assert rc == 0, err[-3000:]
    expected = reference / "pseudo_labels" / TEACHER / "custom" / "train"

    home = make_home(tmp_path / "stopped", models, clips=8)
    out = home / "pseudo_labels" / TEACHER / "custom" / "train"
    proc = start(home, "distil.pseudo_label", *label_overrides(home, devices))
    wait_for(proc, lambda: any((out / "_progress").glob("part-*.json")))  # labelling is under way
    proc.send_signal(signum)
    rc, err = finish(proc)
    last = err.strip().splitlines()[-1]
    assert rc != 0 and "Traceback" not in err, err[-3000:]
    assert last.startswith(f"stopped by {signum.name}") and "rerun the same command" in last, last
    assert not (out / "_SUCCESS").exists()

    rc, err = finish(start(home, "distil.pseudo_label", *label_overrides(home, devices)))  # the same again
    assert rc == 0, err[-3000:]
    assert (out / "_SUCCESS").exists()
    assert read_rows(out) == read_rows(expected)
    assert (out / "skipped.jsonl").read_text() == (expected / "skipped.jsonl").read_text()


# --- training ---------------------------------------------------------------------------------------------------


def train_overrides(home: Path, *extra: str) -> list[str]:
    """A tiny fine-tuning run (reference text, no labels, no teacher forward) of the home's corpus."""
    return [
        "teacher=tiny_random",
        "student=1dec",
        "trainer=debug",
        "loss=finetune",
        "data=custom",
        f"data.datasets.0.path={home / 'corpus' / 'c'}",
        "data.validation_splits=[]",
        "data.batch_size=2",
        "optim.warmup_steps=1",
        "checkpoint.every_n_steps=1000",
        f"out_dir={home / 'run'}",
        *extra,
    ]


def compose_train(home: Path, *extra: str):
    from hydra import compose, initialize_config_dir

    import distil.whisper.student  # noqa: F401  (the student_name resolver)
    from distil.utils.paths import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose("train", overrides=train_overrides(home, *extra))


def test_run_config_lists_what_changed_and_ignores_what_only_extends_the_run(tmp_path):
    from distil.train import run_config, run_config_changes

    home = tmp_path
    base = run_config(compose_train(home))
    assert base["optim.lr"] == 1e-4 and base["data.datasets.0.path"] == str(home / "corpus" / "c")
    extended = run_config(
        compose_train(
            home,
            "trainer.max_steps=50",
            "trainer.val_check_interval=7",
            "checkpoint.every_n_steps=3",
            "trainer.log_every_n_steps=5",
            "trainer.enable_progress_bar=true",
            "trainer.devices=2",
            "data.num_workers=2",
            "export=false",
        )
    )
    assert run_config_changes(base, extended) == []
    changed = run_config(
        compose_train(home, "optim.lr=5e-4", "loss.ce_weight=0.5", "data.batch_size=4", "student=2dec")
    )
    changes = run_config_changes(base, changed)
    assert "optim.lr 0.0001 → 0.0005" in changes and "data.batch_size 2 → 4" in changes
    assert "loss.ce_weight 1.0 → 0.5" in changes
    assert any(c.startswith("student.decoder_layers 1 → 2") for c in changes), changes


def test_check_run_config_records_refuses_and_forces(tmp_path):
    from distil.train import RUN_CONFIG, ResumeSettingsChangedError, check_run_config
    from distil.utils.io import read_json

    run = {"optim.lr": 1e-4, "data.batch_size": 2, "student.decoder_layers": 1}
    assert check_run_config(tmp_path, run, resuming=False, force=False) == []  # a new run: recorded
    assert read_json(tmp_path / RUN_CONFIG) == run
    assert check_run_config(tmp_path, run, resuming=True, force=False) == []  # the same settings
    faster = {**run, "optim.lr": 5e-4}
    with pytest.raises(
        ResumeSettingsChangedError, match=r"optim\.lr 0\.0001 → 0\.0005\. Rerun .*resume=force"
    ):
        check_run_config(tmp_path, faster, resuming=True, force=False)
    assert read_json(tmp_path / RUN_CONFIG) == run  # a refusal leaves the record as it was
    assert check_run_config(tmp_path, faster, resuming=True, force=True) == ["optim.lr 0.0001 → 0.0005"]
    assert read_json(tmp_path / RUN_CONFIG) == faster  # the record says what the run continues with
    deeper = {**faster, "student.decoder_layers": 2}
    with pytest.raises(
        ResumeSettingsChangedError, match=r"resume=force cannot continue .*decoder_layers 1 → 2"
    ):
        check_run_config(tmp_path, deeper, resuming=True, force=True)


def test_a_resume_with_other_settings_is_refused_in_one_line_before_anything_loads(tmp_path, monkeypatch):
    """A run directory with a checkpoint and its recorded settings; the same out_dir with another lr."""
    from distil.train import RUN_CONFIG, run_config
    from distil.utils.io import write_json_atomic

    home = tmp_path
    monkeypatch.setenv("DISTIL_HOME", str(home))
    (home / "run" / "checkpoints").mkdir(parents=True)
    (home / "run" / "checkpoints" / "last.ckpt").write_bytes(b"not read: the refusal comes first")
    write_json_atomic(home / "run" / RUN_CONFIG, run_config(compose_train(home)))
    result = cli(
        "train", *train_overrides(home, "optim.lr=5e-4", "data.batch_size=4"), home=home, check=False
    )
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert (
        last.startswith("error: ") and "optim.lr 0.0001 → 0.0005" in last and "data.batch_size 2 → 4" in last
    )
    assert "resume=force" in last and "student." not in last  # only what changed
    assert not (home / "models" / "whisper-tiny-random").exists()  # refused before the teacher was built


@pytest.fixture
def train_home(tmp_path, tiny_random_dir, monkeypatch) -> Path:
    home = make_home(tmp_path / "home", Path(tiny_random_dir).parent, clips=8)
    monkeypatch.setenv("DISTIL_HOME", str(home))
    return home


def test_resume_force_applies_the_new_learning_rate_and_records_it(train_home):
    import torch

    from distil.train import RUN_CONFIG, ResumeSettingsChangedError, train
    from distil.utils.io import read_json

    train(compose_train(train_home, "trainer.max_steps=2", "export=false"))
    faster = ("trainer.max_steps=4", "export=false", "optim.lr=5e-4")
    with pytest.raises(ResumeSettingsChangedError, match=r"optim\.lr 0\.0001 → 0\.0005.*resume=force"):
        train(compose_train(train_home, *faster))
    summary = train(compose_train(train_home, *faster, "resume=force"))
    assert summary["resumed_from"] and summary["global_step"] == 4
    last = torch.load(
        train_home / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False
    )
    # Lightning restored lr 1e-4 into the optimiser and the scheduler: the new value replaced it in both.
    assert {g["lr"] for g in last["optimizer_states"][0]["param_groups"]} == {5e-4}
    assert set(last["lr_schedulers"][0]["base_lrs"]) == {5e-4}
    assert read_json(train_home / "run" / RUN_CONFIG)["optim.lr"] == 5e-4
    summary = train(compose_train(train_home, *faster[1:], "trainer.max_steps=5"))  # a plain resume now
    assert summary["global_step"] == 5


@pytest.mark.slow  # three training runs as subprocesses (~1-2 min on 2 shared cores)
def test_sigterm_stops_training_with_last_ckpt_and_the_rerun_matches_an_uninterrupted_run(
    tmp_path, tiny_random_dir
):
    import torch

    models = Path(tiny_random_dir).parent
    steps = ["trainer.max_steps=40", "export=false", "record_samples=true"]
    reference = make_home(tmp_path / "reference", models, clips=8)
    rc, err = finish(start(reference, "distil.train", *train_overrides(reference, *steps)))
    assert rc == 0, err[-3000:]

    home = make_home(tmp_path / "stopped", models, clips=8)
    samples = home / "run" / "samples" / "rank-0.jsonl"
    proc = start(home, "distil.train", *train_overrides(home, *steps))
    wait_for(proc, lambda: samples.is_file() and len(samples.read_text().splitlines()) >= 3)
    proc.send_signal(signal.SIGTERM)
    rc, err = finish(proc)
    last = err.strip().splitlines()[-1]
    assert rc != 0 and "Traceback" not in err, err[-3000:]
    assert last.startswith("stopped by SIGTERM at step ") and "last.ckpt saved" in last, last
    assert "rerun the same command to resume" in last
    step = int(last.split("at step ")[1].split(";")[0])
    ckpt = torch.load(home / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == step and 0 < step < 40

    rc, err = finish(start(home, "distil.train", *train_overrides(home, *steps)))  # the same command again
    assert rc == 0, err[-3000:]
    resumed, straight = (
        torch.load(h / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        for h in (home, reference)
    )
    assert resumed["global_step"] == straight["global_step"] == 40
    for key, value in straight["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.slow  # one training run as a subprocess (~30 s on 2 shared cores)
def test_sigusr1_stops_training_like_sigterm(tmp_path, tiny_random_dir):
    """`#SBATCH --signal=USR1@120`: SIGUSR1 (default action: kill, nothing saved) stops like SIGTERM."""
    import torch

    home = make_home(tmp_path / "stopped", Path(tiny_random_dir).parent, clips=8)
    samples = home / "run" / "samples" / "rank-0.jsonl"
    proc = start(home, "distil.train", *train_overrides(home, "trainer.max_steps=40", "record_samples=true"))
    wait_for(proc, lambda: samples.is_file() and len(samples.read_text().splitlines()) >= 3)
    proc.send_signal(signal.SIGUSR1)
    rc, err = finish(proc)
    last = err.strip().splitlines()[-1]
    assert rc == 1 and "Traceback" not in err, err[-3000:]
    assert last.startswith("stopped by SIGUSR1 at step ") and "rerun the same command to resume" in last, last
    step = int(last.split("at step ")[1].split(";")[0])
    ckpt = torch.load(home / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == step and 0 < step < 40


# --- the run directory lock ---------------------------------------------------------------------------------------


def test_a_lock_of_a_process_that_has_ended_is_taken_over_and_a_live_one_refused(tmp_path):
    import json
    import socket

    from distil.utils.io import LockHeldError, hold_lock

    lock = tmp_path / "run.lock"
    lock.write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname(), "started": 0}))
    with hold_lock(lock):  # a killed run's lock
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with pytest.raises(
            LockHeldError, match=rf"held by pid {os.getpid()} on {socket.gethostname()} since"
        ):
            with hold_lock(lock):
                pass
    assert not lock.exists()  # released at the end of the block
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": 0}))
    os.utime(lock, (time.time() - 300, time.time() - 300))  # another host's owner, silent for 5 minutes
    with hold_lock(lock):
        pass


@pytest.mark.slow  # a subprocess; the lock test above covers the refusal in process
def test_a_second_training_run_on_a_locked_directory_is_refused_naming_the_owner(tmp_path):
    """A live run (this test process stands in for it) holds the run directory: the second run says whose it is
    and what to do, in one line, before anything loads."""
    import json
    import socket

    home = tmp_path
    (home / "run").mkdir()
    lock = home / "run" / "run.lock"
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}))
    result = cli("train", *train_overrides(home), home=home, check=False)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert last.startswith("error: ") and f"pid {os.getpid()} on {socket.gethostname()} since" in last, last
    assert "another out_dir" in last
    assert lock.exists() and not (home / "models").exists()  # the owner's lock is untouched; nothing loaded
