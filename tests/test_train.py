"""End-to-end `train(cfg)` on the tiny random teacher (CPU): configs, run directory, resume, export, bad input."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from helpers import SimulatedKill, atomic_writes, entry, write_kind, write_split
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import distil.whisper.student  # noqa: F401  (resolver)
from distil.train import default_out_dir, override_dirname, train
from distil.training.checkpoints import resolve_ckpt_path
from distil.utils.paths import CONF_DIR

TEACHER = "whisper-tiny-random"


@pytest.fixture(scope="module")
def models_root(tiny_random_dir) -> Path:
    return Path(
        tiny_random_dir
    ).parent  # the session's model cache (tiny random + the tiny.en it borrows from)


@pytest.fixture
def home(tmp_path, monkeypatch, models_root) -> Path:
    """A DISTIL_HOME with the tiny random teacher, pseudo-labels for two datasets and a validation split."""
    from transformers import WhisperTokenizerFast

    monkeypatch.setenv("DISTIL_HOME", str(tmp_path))
    (tmp_path / "models").mkdir()
    for name in (TEACHER, "whisper-tiny.en"):  # the random teacher borrows tiny.en's processor
        (tmp_path / "models" / name).symlink_to(models_root / name)
    tok = WhisperTokenizerFast.from_pretrained(models_root / TEACHER)
    pl = tmp_path / "pseudo_labels" / TEACHER
    labeller = {"name": "another-teacher", "fingerprint": "sha256:0123"}
    write_split(pl, "a", "train", 12, tok, pl_wer=[0.0] * 12, teacher_meta=labeller)
    write_split(pl, "b", "train", 12, tok, pl_wer=[5.0] * 12, id_offset=100)
    write_split(tmp_path / "corpora", "a", "validation", 4, labelled=False, id_offset=500)
    write_split(tmp_path / "corpora", "a", "train", 12, labelled=False)
    write_split(tmp_path / "corpora", "b", "train", 12, labelled=False, id_offset=100)
    return tmp_path


def compose_train(home: Path, overrides=(), steps: int = 4):
    datasets = [entry("a", home / "corpora", weight=1.0), entry("b", home / "corpora", weight=2.0)]
    base = [
        "teacher=tiny_random",
        "student=1dec",
        "trainer=debug",
        f"trainer.max_steps={steps}",
        "data.batch_size=2",
        "data.val_batch_size=4",
        "data.max_val_samples=4",
        "optim.warmup_steps=1",
        "val.max_new_tokens=4",
        "checkpoint.every_n_steps=2",
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("train", overrides=base + list(overrides))
        dirname = override_dirname(overrides)  # named after the test's own overrides, not the base ones
    OmegaConf.set_struct(cfg, False)
    cfg.data.datasets = OmegaConf.create(datasets)
    if cfg.out_dir is None:
        cfg.out_dir = str(default_out_dir(cfg.students_root_dir, dirname))
    return cfg


def test_config_groups_compose(home):
    for loss in ("finetune", "sft", "kd", "kd_mse"):
        cfg = compose_train(home, [f"loss={loss}"])
        assert cfg.loss.name == loss
    for experiment in ("demo", "tiny_random_smoke", "paper"):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = compose("train", overrides=[f"experiment={experiment}"])
        OmegaConf.to_container(cfg, resolve=True)
        assert cfg.name


def test_run_dir_and_ckpt_path(tmp_path):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        assert (
            override_dirname(["experiment=demo", "data.num_workers=2", "out_dir=/x"]) == ""
        )  # excluded keys
        a = override_dirname(["loss.kl_weight=0", "experiment=demo"])
        b = override_dirname(["loss.kl_weight=1"])
        long_a = override_dirname(["data.batch_size=1", "data.pseudo_labels_dir=/" + "x" * 300])
        long_b = override_dirname(["data.batch_size=2", "data.pseudo_labels_dir=/" + "x" * 300])
    assert a == "loss.kl_weight=0" and a != b
    assert default_out_dir(tmp_path, "") == tmp_path
    assert default_out_dir(tmp_path, a) == tmp_path / "loss.kl_weight=0"
    long_a, long_b = default_out_dir(tmp_path, long_a), default_out_dir(tmp_path, long_b)
    assert long_a != long_b and long_a.parent == tmp_path and len(long_a.name) <= 200  # one safe directory
    # A long path value shrinks to its last part and a hash, so the overrides after it stay readable.
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        named = override_dirname(["data.datasets.0.path=/data/some/long/place/my_corpus", "loss.kl_weight=0"])
        other = override_dirname(
            ["data.datasets.0.path=/data/other/long/place/my_corpus", "loss.kl_weight=0"]
        )
    named, other = default_out_dir(tmp_path, named).name, default_out_dir(tmp_path, other).name
    assert (
        re.fullmatch(r"data.datasets.0.path=my_corpus-[0-9a-f]{8},loss.kl_weight=0", named) and named != other
    )
    assert resolve_ckpt_path("last", tmp_path) is None
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert resolve_ckpt_path("last", tmp_path) == str(tmp_path / "checkpoints" / "last.ckpt")
    assert resolve_ckpt_path(None, tmp_path) is None


def test_end_to_end_train_exports_pipeline_loadable_students(home, caplog):
    from transformers import pipeline

    caplog.set_level("INFO", logger="distil.progress")

    from distil.data.label_store import LabellerMismatchWarning
    from distil.whisper.ct2_export import ExportInputError

    with pytest.raises(ExportInputError, match="int3"):  # before any work
        train(compose_train(home, ["data.wer_threshold=4", "export_ctranslate2=[int3]"]))
    cfg = compose_train(
        home, ["data.wer_threshold=4", "export_ctranslate2=[int8]"]
    )  # drops all of b (pl_wer 5)
    assert not Path(cfg.out_dir).exists()
    with pytest.warns(LabellerMismatchWarning, match="another-teacher"):
        summary = train(cfg)
    out = Path(cfg.out_dir)
    from huggingface_hub import ModelCard

    for name in ("best", "last"):  # faster-whisper directories of both exports
        assert summary["exports"][f"{name}-ct2-int8"] == str(out / f"{name}-ct2-int8")
        assert (out / f"{name}-ct2-int8" / "model.bin").is_file()
        # Each export carries its model card (the tiny random teacher has no Hub id: no base_model, no licence).
        hf, ct2 = (
            ModelCard.load(out / d / "README.md", ignore_metadata_errors=False)
            for d in (name, f"{name}-ct2-int8")
        )
        assert (hf.data.library_name, ct2.data.library_name) == ("transformers", "ctranslate2")
        assert hf.data.base_model is None and "decoder: 1 layer of the teacher's 2" in hf.text
        assert f"`{name}-ct2-int8`" in hf.text and "WhisperModel(" in ct2.text
    assert summary["global_step"] == 4
    progress = [r.getMessage() for r in caplog.records if r.name == "distil.progress"]
    assert any(line.startswith("training: 4/4 (100%), ") and "train/loss" in line for line in progress)
    assert any(line.startswith("validation at step ") and "val/wer_weighted" in line for line in progress)
    assert (out / "checkpoints" / "last.ckpt").is_file() and (out / "checkpoints" / "best.ckpt").is_file()
    assert summary["best_val_wer_weighted"] is not None
    filt = json.loads((out / "data_filter.json").read_text())
    assert filt["b/train"]["dropped"] == {"wer": 12} and filt["a/train"]["kept"] == 12
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert all(k.startswith("student.") for k in ckpt["state_dict"])  # no teacher weights
    from transformers import WhisperFeatureExtractor, WhisperTokenizerFast

    for name in ("best", "last"):
        d = out / name
        for f in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
            assert (d / f).is_file(), (name, f)
        assert (
            WhisperFeatureExtractor.from_pretrained(d).feature_size == 80
        )  # (processor_config.json in transformers 5)
        assert WhisperTokenizerFast.from_pretrained(d).eos_token_id is not None
    asr = pipeline("automatic-speech-recognition", model=str(out / "last"), device="cpu")
    result = asr(
        {"raw": torch.zeros(8000).numpy(), "sampling_rate": 16000}, generate_kwargs={"max_new_tokens": 3}
    )
    assert isinstance(result["text"], str)


def test_bf16_mixed_precision_trains_on_cpu(home):
    """`trainer.precision=bf16-mixed` on CPU (fast with AMX): bf16 matmuls, fp32 weights and exports."""
    cfg = compose_train(home, ["trainer.precision=bf16-mixed", "data.num_workers=0"], steps=2)
    summary = train(cfg)
    assert summary["global_step"] == 2
    state, _ = _final_state(Path(cfg.out_dir))
    floats = [v for v in state.values() if v.is_floating_point()]
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in floats)
    from transformers import WhisperForConditionalGeneration

    exported = WhisperForConditionalGeneration.from_pretrained(Path(cfg.out_dir) / "last")
    assert next(exported.parameters()).dtype == torch.float32


def _final_state(out: Path) -> dict:
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    return ckpt["state_dict"], ckpt["global_step"]


def test_resume_continues_and_matches_uninterrupted_run(home, tmp_path):
    straight = compose_train(home, ["out_dir=" + str(tmp_path / "straight"), "export=false"], steps=6)
    train(straight)
    ref_state, ref_step = _final_state(Path(straight.out_dir))
    assert ref_step == 6

    resumed_dir = tmp_path / "resumed"
    first = compose_train(home, ["out_dir=" + str(resumed_dir), "export=false"], steps=3)
    train(first)  # "killed" after 3 steps (last.ckpt at step 3)
    assert _final_state(resumed_dir)[1] == 3
    again = compose_train(
        home, ["out_dir=" + str(resumed_dir), "export=false"], steps=6
    )  # the same command, re-run
    summary = train(again)
    assert summary["resumed_from"] == str(resumed_dir / "checkpoints" / "last.ckpt")
    state, step = _final_state(resumed_dir)
    assert step == 6
    for key, value in ref_state.items():
        torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.slow  # ~2 training runs per kind of write (checkpoint, export, summary, ...)
def test_a_kill_before_each_write_resumes_to_the_uninterrupted_result(home, tmp_path):
    """Every file training writes ends in utils.io's atomic os.replace: stop the run just before one write of
    each kind (its temp file left behind, as a kill leaves it), rerun the same command, and get the
    uninterrupted run's weights, complete exports and no temp file."""
    from transformers import WhisperForConditionalGeneration

    with atomic_writes() as written:
        train(compose_train(home, ["out_dir=" + str(tmp_path / "straight")], steps=4))
    ref_state, _ = _final_state(tmp_path / "straight")
    # The run's own writes (not the shared model cache's), one of each kind, in the order they happen.
    kinds = list(dict.fromkeys(write_kind(p) for p in written if (tmp_path / "straight") in p.parents))
    assert {"last.ckpt", "last", "best"} <= set(kinds), kinds

    for k, write in enumerate(kinds):
        out = tmp_path / f"kill-{k}"

        def kill_before(dst, out=out, write=write):
            return out in dst.parents and write_kind(dst) == write

        with pytest.raises(SimulatedKill), atomic_writes(kill_before):
            train(compose_train(home, ["out_dir=" + str(out)], steps=4))
        summary = train(compose_train(home, ["out_dir=" + str(out)], steps=4))  # the same command again
        assert summary["global_step"] == 4, write
        state, step = _final_state(out)
        assert step == 4, write
        for key, value in ref_state.items():
            torch.testing.assert_close(
                state[key], value, rtol=1e-5, atol=1e-6, msg=f"kill before {write}: {key}"
            )
        for export in ("best", "last"):  # atomic directories: present means whole
            assert WhisperForConditionalGeneration.from_pretrained(out / export) is not None, (write, export)
        leftovers = [p for p in out.rglob("*") if ".tmp" in p.name]
        assert not leftovers, f"kill before {write}: {leftovers}"


def test_resume_on_changed_training_data_is_refused(home, tmp_path):
    from transformers import WhisperTokenizerFast

    from distil.train import TrainingDataChangedError

    run_dir = ["out_dir=" + str(tmp_path / "run"), "export=false"]
    train(compose_train(home, run_dir, steps=2))
    tok = WhisperTokenizerFast.from_pretrained(home / "models" / TEACHER)
    write_split(home / "pseudo_labels" / TEACHER, "a", "train", 10, tok, pl_wer=[0.0] * 10, id_offset=50)
    with pytest.raises(TrainingDataChangedError, match=r"training data of .* changed .*\(a/train\)"):
        train(compose_train(home, run_dir, steps=4))
    summary = train(compose_train(home, [*run_dir, "resume_data_changed=warn"], steps=4))
    assert summary["global_step"] == 4 and summary["resumed_from"]


def test_bad_inputs_fail_at_start_up(home, tmp_path):
    from distil.datamodules.filters import DataError
    from distil.modules.distiller import DistillationSetupError

    # a student whose width differs from the teacher's, in KD mode
    other = tmp_path / "other"
    shutil.copytree(home / "models" / TEACHER, other, symlinks=False)
    config = json.loads((other / "config.json").read_text())
    config["d_model"] = 32
    (other / "config.json").write_text(json.dumps(config))
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    WhisperForConditionalGeneration(WhisperConfig.from_pretrained(other)).save_pretrained(other)
    with pytest.raises(DistillationSetupError, match="d_model 32"):
        train(compose_train(home, [f"student_dir={other}"]))
    # ... but fine-tuning it (no teacher) is allowed up to the data checks; a method needing pseudo-labels
    # on a dataset without them is an error naming the stage to run
    shutil.rmtree(home / "pseudo_labels" / TEACHER / "b")
    with pytest.raises(DataError, match="no pseudo-labels for dataset 'b'"):
        train(compose_train(home, ["loss=sft"]))


def test_nan_loss_stops_with_ids_and_keeps_last_checkpoint(home, monkeypatch):
    from distil.modules.distiller import NonFiniteLossError, WhisperDistiller

    cfg = compose_train(home, ["export=false"], steps=4)
    original = WhisperDistiller.compute_loss

    def poisoned(self, batch):
        loss, parts = original(self, batch)
        return (loss * math.nan if self.global_step == 3 else loss), parts

    monkeypatch.setattr(WhisperDistiller, "compute_loss", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"global step 3.*samples: \['[ab]/train/"):
        train(cfg)
    state, step = _final_state(Path(cfg.out_dir))
    assert step == 2  # the checkpoint written every 2 steps, untouched by the failure
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


@pytest.mark.slow
def test_cli_multirun_gives_each_job_its_own_run_directory(home):
    import subprocess
    import sys

    corpora = home / "corpora"
    overrides = [
        "teacher=tiny_random",
        "student=1dec",
        "trainer=debug",
        "trainer.max_steps=1",
        "trainer.limit_val_batches=0",
        "data=custom",
        f"data.datasets.0.path={corpora}/a",
        "data.datasets.0.name=a",
        "data.datasets.0.id_column=id",
        "data.datasets.0.duration_column=duration",
        "data.batch_size=2",
        "export=false",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "distil.train", "-m", "loss.kl_weight=0,1", *overrides],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "DISTIL_HOME": str(home), "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(p.parent.parent for p in (home / "students").glob("*/*/checkpoints/last.ckpt"))
    assert len(runs) == 2 and runs[0] != runs[1], runs
    assert {p.name.split("loss.kl_weight=")[1][:1] for p in runs} == {"0", "1"}


@pytest.mark.slow
def test_demo_distillation_beats_the_initial_student():
    """tiny.en -> 4 enc / 2 dec on the synthetic corpora (minutes on 2 cores): see benchmarks/distil_demo.py."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "distil_demo", Path(__file__).parent.parent / "benchmarks" / "distil_demo.py"
    )
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    result = demo.run()
    wer = result["test_wer"]
    print(json.dumps(result, indent=2))
    assert wer["trained_student_best"]["all"] < 0.5 * wer["initial_student"]["all"]
    assert wer["trained_student_best"]["all"] < wer["teacher"]["all"] + 25
