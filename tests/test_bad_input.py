"""Bad input, stage by stage: each case fails before any work, with one message naming the file, column or
key and the fix, and leaves nothing on disk that looks complete."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import dead_pid, write_split
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file, save_file

from distil.utils.io import OutputNotWritableError
from distil.utils.paths import CONF_DIR
from distil.whisper.models import ModelConfigError, check_model_path, load_whisper


@pytest.fixture
def model_copy(tiny_random_dir, tmp_path) -> Path:
    out = tmp_path / "model"
    shutil.copytree(tiny_random_dir, out)
    return out


def test_a_non_whisper_directory_is_refused_as_a_teacher(model_copy):
    config = json.loads((model_copy / "config.json").read_text())
    (model_copy / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    with pytest.raises(ModelConfigError, match=rf"{model_copy} is not a Whisper model.*model_type='bert'"):
        check_model_path(str(model_copy))


def test_weights_that_do_not_fit_the_config_are_refused(model_copy):
    check_model_path(str(model_copy))  # the intact copy is accepted
    weights = model_copy / "model.safetensors"
    state = load_file(weights)
    dropped = next(k for k in state if "decoder.layers.1." in k)
    save_file(
        {k: v for k, v in state.items() if k != dropped} | {"bert.pooler.weight": state[dropped]}, weights
    )
    with pytest.raises(ModelConfigError, match=r"do not fit.*missing keys.*unexpected keys"):
        load_whisper(str(model_copy))


def test_a_foreign_tokenizer_is_refused(model_copy, base_dir):
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "added_tokens.json"):
        if (Path(base_dir) / name).is_file():
            shutil.copy(Path(base_dir) / name, model_copy / name)  # the multilingual vocabulary
    with pytest.raises(ModelConfigError, match="tokenizer in .* does not belong to its model"):
        check_model_path(str(model_copy))


def test_no_generation_config_is_refused(model_copy):
    (model_copy / "generation_config.json").unlink()
    with pytest.raises(ModelConfigError, match="no generation_config.json"):
        check_model_path(str(model_copy))
    (model_copy / "model.safetensors").unlink()
    with pytest.raises(ModelConfigError, match="no weights"):
        check_model_path(str(model_copy))


def test_an_unwritable_output_is_found_before_the_teacher_loads(tmp_path, monkeypatch):
    import distil.pseudo_label as stage

    write_split(tmp_path / "corpus", "c", "train", 2, labelled=False)
    (tmp_path / "blocker").write_text("a file where the output directory should go")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(
            "pseudo_label",
            [
                f"paths.root={tmp_path}",
                "teacher=tiny_random",
                "data=custom",
                f"data.datasets.0.path={tmp_path / 'corpus' / 'c'}",
                f"out_dir={tmp_path / 'blocker' / 'labels'}",
            ],
        )

    def no_teacher(*args):
        raise AssertionError("the teacher was resolved before the output was checked")

    monkeypatch.setattr(stage, "_teacher_record", no_teacher)
    with pytest.raises(OutputNotWritableError, match=rf"cannot create out_dir={tmp_path / 'blocker'}"):
        stage.pseudo_label(cfg, run_dir=tmp_path / "run")


def test_a_local_hub_teacher_is_named_after_its_directory(tmp_path):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        local = compose("pseudo_label", ["teacher=hub", f"teacher.path={tmp_path / 'my-whisper'}"])
        hub = compose("pseudo_label", ["teacher=hub", "teacher.path=openai/whisper-large-v3"])
    assert local.teacher.name == "my-whisper"  # not the absolute path, which would label into the model dir
    assert Path(local.out_dir).name == "my-whisper" and Path(local.out_dir).parent.name == "pseudo_labels"
    assert hub.teacher.name == "openai/whisper-large-v3"


def test_auto_threads_respect_omp_num_threads(monkeypatch):
    from distil.utils.parallel import usable_cores

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    free = usable_cores()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert usable_cores() == 1  # a job limited to one thread does not get one process per core
    monkeypatch.setenv("OMP_NUM_THREADS", "not-a-number")
    assert usable_cores() == free


def test_leftovers_of_killed_writers_are_removed_by_the_next_write(tmp_path):
    import os

    from distil.utils.io import STALE_AFTER_S, atomic_directory, write_atomic

    gone_pid = dead_pid()
    old = os.path.getmtime(tmp_path) - 2 * STALE_AFTER_S
    shard_leftover = tmp_path / f".part-00003.parquet.tmp-{gone_pid}"  # a killed shard write
    export_leftover = tmp_path / f".last.tmp-{gone_pid}-abcd"  # a killed export
    export_leftover.mkdir()
    (export_leftover / "model.safetensors").write_bytes(b"x" * 100)
    live = tmp_path / f".part-00003.parquet.tmp-{os.getppid()}"  # another writer still at work: kept
    young = tmp_path / f".part-00003.parquet.tmp-{gone_pid + 100000}"  # just written: kept for now
    for f in (shard_leftover, live, young):
        f.write_bytes(b"partial")
    for f in (shard_leftover, export_leftover, live):
        os.utime(f, (old, old))
    write_atomic(tmp_path / "part-00003.parquet", "done")
    with atomic_directory(tmp_path / "last") as tmp:
        (tmp / "config.json").write_text("{}")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["last", "part-00003.parquet", live.name, young.name])


def test_checkpoints_are_written_beside_their_destination(tmp_path, monkeypatch):
    import tempfile

    import torch

    from distil.training.checkpoints import AtomicCheckpointIO

    system_tmp = tmp_path / "system_tmp"
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    seen = []
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f: (seen.append(Path(f)), real_save(obj, f)))
    AtomicCheckpointIO().save_checkpoint({"step": 3}, tmp_path / "ckpt" / "last.ckpt")
    assert torch.load(tmp_path / "ckpt" / "last.ckpt")["step"] == 3
    assert seen[0].parent == tmp_path / "ckpt" and seen[0].name.startswith(".last.ckpt.tmp-")
    assert not any(system_tmp.iterdir())


@pytest.fixture
def cli_home(tmp_path, tiny_random_dir) -> Path:
    """A DISTIL_HOME with the tiny random teacher (and the tiny.en processor it borrows) already built."""
    (tmp_path / "home" / "models").mkdir(parents=True)
    for name in ("whisper-tiny-random", "whisper-tiny.en"):
        (tmp_path / "home" / "models" / name).symlink_to(Path(tiny_random_dir).parent / name)
    write_split(tmp_path / "home" / "corpus", "c", "train", 3, labelled=False)
    return tmp_path / "home"


def _cli(home: Path, module: str, *overrides: str):
    import os
    import subprocess
    import sys

    env = {**os.environ, "DISTIL_HOME": str(home), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", module, *overrides], capture_output=True, text=True, env=env, timeout=300
    )


LABEL = ["teacher=tiny_random", "data=custom", "progress_bar=false", "trainer.devices=1"]


@pytest.mark.parametrize(
    ("module", "overrides", "names"),
    [
        (
            "distil.pseudo_label",
            [*LABEL, "data.datasets.0.text_column=sentence"],
            ["'sentence'", "text_column"],
        ),
        ("distil.pseudo_label", [*LABEL, "data.datasets.0.splits=[tran]"], ["'tran'", "splits"]),
        ("distil.pseudo_label", [*LABEL, "teacher=hub", "teacher.path=/no/such/model"], ["/no/such/model"]),
        (
            "distil.train",
            ["teacher=tiny_random", "student=1dec", "trainer=debug", "data=custom"],
            ["pseudo-labels", "distil.pseudo_label"],
        ),
    ],
    ids=["renamed column", "unknown split", "missing teacher", "training before labelling"],
)
def test_commands_fail_with_one_line_that_names_the_problem(cli_home, module, overrides, names):
    result = _cli(cli_home, module, *overrides, f"data.datasets.0.path={cli_home / 'corpus' / 'c'}")
    assert result.returncode == 1, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in result.stderr, result.stderr[-2000:]
    for name in names:
        assert name in last, last
    assert not list(cli_home.rglob("_SUCCESS"))  # nothing on disk looks complete


@pytest.mark.parametrize(
    ("module", "typo"),
    [
        ("distil.pseudo_label", "batch_sise=4"),
        ("distil.train", "optim.lr_sheduler=cosine"),
        ("distil.evaluate", "eval.max_new_token=8"),
    ],
)
def test_a_misspelt_key_is_refused_naming_it(cli_home, module, typo):
    """Hydra's struct configs refuse a key that does not exist instead of ignoring it: nothing runs."""
    result = _cli(cli_home, module, typo)
    key = typo.split("=")[0].split(".")[-1]
    assert result.returncode == 1 and f"Key '{key}' is not in struct" in result.stderr, result.stderr[-2000:]
    assert not (cli_home / "runs").exists() or not list((cli_home / "runs").rglob("*.log"))
    assert not list(cli_home.rglob("_SUCCESS"))


# A full disk and read-only destinations (issue 32, item 17).

FULL_DISK = [
    OSError(28, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4416 vs 4310"),
    RuntimeError(
        "[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file data/0: file write failed"
    ),
]


@pytest.mark.parametrize("error", FULL_DISK, ids=["ENOSPC", "unexpected pos", "file write failed"])
def test_a_full_disk_at_a_checkpoint_says_so_naming_the_path_and_the_free_space(tmp_path, monkeypatch, error):
    import torch

    from distil.training.checkpoints import AtomicCheckpointIO
    from distil.utils.io import OutOfSpaceError

    def full_disk(obj, f):
        Path(f).write_bytes(b"half a checkpoint")
        raise error

    monkeypatch.setattr(torch, "save", full_disk)
    path = tmp_path / "checkpoints" / "last.ckpt"
    with pytest.raises(
        OutOfSpaceError, match=rf"^no space left on device writing {path} \(\d+ MB free\): free space"
    ):
        AtomicCheckpointIO().save_checkpoint({"step": 3}, path)
    assert not any((tmp_path / "checkpoints").iterdir())  # the partial temporary is gone


def test_other_checkpoint_errors_are_not_taken_for_a_full_disk(tmp_path, monkeypatch):
    import torch

    from distil.training.checkpoints import AtomicCheckpointIO

    def broken(obj, f):
        raise RuntimeError("cannot pickle 'generator' object")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(RuntimeError, match="cannot pickle"):
        AtomicCheckpointIO().save_checkpoint({"step": 3}, tmp_path / "last.ckpt")


def test_a_full_disk_during_an_export_says_so(tmp_path, monkeypatch):
    from transformers import GenerationConfig

    import distil.training.checkpoints as checkpoints
    from distil.utils.io import OutOfSpaceError

    class Student:  # what model_from_checkpoint returns, with safetensors' error for a full disk
        generation_config = GenerationConfig()

        def save_pretrained(self, out, **kwargs):
            (Path(out) / "model.safetensors").write_bytes(b"half the weights")
            raise OSError(
                'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
            )

    monkeypatch.setattr(checkpoints, "model_from_checkpoint", lambda *a: Student())
    with pytest.raises(
        OutOfSpaceError, match=rf"no space left on device writing {tmp_path / 'run' / 'last'} "
    ):
        checkpoints.export_student(tmp_path / "last.ckpt", str(tmp_path), tmp_path / "run" / "last")
    assert not any((tmp_path / "run").iterdir())


@pytest.fixture(params=["a file in the way", "read-only"])
def unwritable(request, tmp_path) -> Path:
    """A directory distil cannot write into: under a file (any user), or chmod 555 (root ignores that)."""
    import os

    if request.param == "a file in the way":
        (tmp_path / "blocker").write_text("a file where a directory should be")
        return tmp_path / "blocker"
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only directories")
    (tmp_path / "ro").mkdir(mode=0o555)
    return tmp_path / "ro"


def _no_model(*args, **kwargs):
    raise AssertionError("a model was loaded before the output directory was checked")


def test_an_unwritable_export_directory_is_found_before_the_model_loads(
    tmp_path, tiny_random_dir, unwritable, monkeypatch
):
    import distil.export as stage

    monkeypatch.setattr(stage, "resolve_model", _no_model)
    monkeypatch.setattr(stage, "export_student", _no_model)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        for overrides in (
            ["model=path", f"model.path={tiny_random_dir}", f"out_dir={unwritable / 'ct2'}"],
            [
                "model=checkpoint",
                f"model.path={tmp_path / 'last.ckpt'}",
                f"model.base={tiny_random_dir}",
                f"out_dir={unwritable / 'ct2'}",
            ],
        ):
            (tmp_path / "last.ckpt").write_bytes(b"a checkpoint")
            cfg = compose("export", [f"paths.root={tmp_path}", "quantization=float32", *overrides])
            with pytest.raises(OutputNotWritableError, match=rf"^out_dir={unwritable}.* cannot be written"):
                stage.export(cfg)


def test_an_unwritable_student_or_evaluation_directory_is_found_before_the_model_loads(
    tmp_path, unwritable, monkeypatch
):
    import distil.evaluate
    import distil.whisper.models
    from distil.evaluate import evaluate
    from distil.init_student import init_student_from_config

    monkeypatch.setattr(distil.whisper.models, "resolve_model", _no_model)
    monkeypatch.setattr(distil.evaluate, "load_model", _no_model)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        students = compose(
            "init_student", ["teacher=tiny_random", f"paths.students={unwritable / 'students'}"]
        )
        evaluation = compose("evaluate", [f"paths.root={tmp_path}", "model=tiny_random"])
    with pytest.raises(OutputNotWritableError, match=rf"^out_dir={unwritable}.* cannot be written"):
        init_student_from_config(students)
    with pytest.raises(OutputNotWritableError, match=rf"hydra.run.dir={unwritable}"):
        evaluate(evaluation, unwritable / "eval")


def test_an_unwritable_student_directory_is_found_before_training_loads_a_model(
    tmp_path, unwritable, monkeypatch
):
    import distil.train

    monkeypatch.setattr(distil.train, "resolve_model", _no_model)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(
            "train",
            [
                "teacher=tiny_random",
                f"paths.students={unwritable / 'students'}",
                f"out_dir={tmp_path / 'run'}",
            ],
        )
    with pytest.raises(OutputNotWritableError, match=rf"^student.init_dir={unwritable}.* cannot be written"):
        distil.train.train(cfg)


def test_an_unwritable_export_directory_is_one_line(cli_home, tiny_random_dir, tmp_path):
    (tmp_path / "blocker").write_text("a file where the export should go")
    result = _cli(
        cli_home,
        "distil.export",
        "model=path",
        f"model.path={tiny_random_dir}",
        f"out_dir={tmp_path / 'blocker' / 'ct2'}",
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(
            f"error: out_dir={tmp_path / 'blocker' / 'ct2'} cannot be written: out_dir={tmp_path / 'blocker'} is a file"
        )
    )


@pytest.mark.parametrize("module", ["distil.train", pytest.param("distil.evaluate", marks=pytest.mark.slow)])
def test_an_unusable_distil_home_is_one_line_before_hydra_makes_its_run_directory(tmp_path, module):
    """Hydra creates the run directory under DISTIL_HOME before a command's body runs: was Hydra's traceback."""
    home = tmp_path / "home"
    home.write_text("a file where DISTIL_HOME should be")
    result = _cli(home, module)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: DISTIL_HOME={home} is a file, not a directory; choose a directory (DISTIL_HOME=...)"
    )
