"""Experiment trackers (`logger=`, conf/logger/): real short training runs that log to MLflow's file store and
to W&B in offline mode, and the one-line errors for a tracker that does not exist or is not installed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from test_bad_input import _cli, cli_home  # noqa: F401  (a fixture)
from test_train import compose_train, home, models_root  # noqa: F401  (fixtures)

from distil.config.choices import unknown_choice
from distil.config.schema import validate
from distil.train import train
from distil.training.trackers import log_evaluation
from distil.utils.errors import ConfigError
from distil.utils.paths import CONF_DIR

# A short run: two steps, one validation, no exports (the trackers are what is tested).
SHORT = ["export=false", "trainer.val_check_interval=2"]


def test_mlflow_file_store_gets_config_losses_wer_filter_counts_and_final_results(home, monkeypatch):  # noqa: F811
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # set by the logger (reading needs it too)
    cfg = compose_train(home, [*SHORT, "logger=[tensorboard,mlflow]", "data.wer_threshold=4"], steps=2)
    summary = train(cfg)
    out = Path(cfg.out_dir)
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))  # TensorBoard still gets everything
    mlflow.set_tracking_uri(f"file:{out / 'mlruns'}")
    runs = mlflow.search_runs(experiment_names=[cfg.name], output_format="list")
    assert len(runs) == 1
    run = runs[0]
    metrics, params = run.data.metrics, run.data.params
    assert {"train/loss", "val/wer_weighted", "optim/lr"} <= set(metrics)
    assert any(k.startswith("train/") and k != "train/loss" for k in metrics)  # the loss terms
    assert (metrics["data/a/train/kept"], metrics["data/b/train/dropped"]) == (12, 12)  # pl_wer 5 > 4
    assert metrics["final/best_val_wer_weighted"] == pytest.approx(summary["best_val_wer_weighted"])
    assert metrics["final/global_step"] == 2
    assert (
        params["config/optim/lr"] == str(cfg.optim.lr) and params["config/logger/mlflow/log_model"] == "False"
    )
    assert run.data.tags["out_dir"] == str(out) and run.info.status == "FINISHED"

    # The pipeline's evaluation of the student joins the same runs (train_summary.json's `trackers`).
    recorded = json.loads((out / "train_summary.json").read_text())
    assert recorded["trackers"] == {"mlflow": run.info.run_id}
    log_evaluation(cfg, recorded, "student", {"model": {"size": 1}, "short_form": {"average": {"wer": 12.5}}})
    (run,) = mlflow.search_runs(experiment_names=[cfg.name], output_format="list")
    assert run.data.metrics["eval/student/short_form/average/wer"] == 12.5
    assert "eval/student/model/size" not in run.data.metrics
    assert _tensorboard_tags(out / "tensorboard") >= {
        "eval/student/short_form/average/wer",
        "val/wer_weighted",
    }


def _tensorboard_tags(directory: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: set[str] = set()
    for events in directory.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    return tags


def test_wandb_offline_writes_its_run_directory(home, monkeypatch):  # noqa: F811
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = compose_train(home, [*SHORT, "logger=wandb"], steps=2)
    train(cfg)
    out = Path(cfg.out_dir)
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    recorded = json.loads((out / "train_summary.json").read_text())["trackers"]
    assert run_dir.name.endswith(f"-{recorded['wandb']}")  # the run the pipeline's evaluation joins
    (records,) = run_dir.glob("run-*.wandb")  # what `wandb sync` uploads: the run's records, keys in clear
    logged = records.read_bytes()
    for key in ("train/loss", "val/wer_weighted", "optim/lr", "data/a/train/kept", "final/global_step"):
        assert key.encode() in logged, key
    assert b'"optim":{"lr":0.0001' in logged  # the run's config
    assert not (out / "tensorboard").exists()  # only the trackers selected


@pytest.mark.unit
def test_mlflow_honours_its_tracking_uri_and_otherwise_writes_into_the_run_directory(monkeypatch):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("train", ["logger=mlflow", "out_dir=/runs/a"])
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert (cfg.logger.mlflow.tracking_uri, cfg.logger.mlflow.save_dir) == (None, "/runs/a/mlruns")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert cfg.logger.mlflow.tracking_uri == "http://mlflow.example:5000"
    assert list(cfg.logger) == ["mlflow"]


@pytest.mark.unit
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["logger=nope"],
            "logger=nope: there is no such logger (conf/logger/nope.yaml); choose from mlflow, ",
        ),
        (["trainer.max_steps=3", "logger=[tensorboard,wandbb]"], "logger=wandbb: there is no such logger"),
        (["-m", "logger=tensorboard,mlfow"], "logger=mlfow: "),
        (["teacher=tiny"], "teacher=tiny: there is no such teacher"),
    ],
)
def test_an_unknown_option_is_named_with_those_there_are(args, message):
    assert unknown_choice(args).startswith(message)


@pytest.mark.unit
@pytest.mark.parametrize(
    "args",
    [
        ["logger=[tensorboard,mlflow]", "logger=null", "~logger", "logger.tensorboard.name=tb"],
        ["hydra/launcher=basic", "data.batch_size=2", "--cfg", "job", "-m", "logger=tensorboard,wandb"],
        ["--config-dir", "/elsewhere", "logger=mine"],  # options outside conf/: Hydra's to find
    ],
)
def test_known_options_and_other_overrides_pass(args):
    assert unknown_choice(args) is None


@pytest.mark.unit
@pytest.mark.parametrize(("logger", "module"), [("wandb", "wandb"), ("mlflow", "mlflow")])
def test_a_tracker_that_is_not_installed_is_one_line_with_the_fix(monkeypatch, logger, module):
    monkeypatch.setitem(sys.modules, module, None)  # import fails: as if not installed
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("train", [f"logger=[tensorboard,{logger}]", "out_dir=/runs/a"])
    with pytest.raises(ConfigError) as err:
        validate(cfg, "train")
    assert str(err.value).startswith(
        f"logger={logger} needs the {module} package, which is not installed: pip install 'distil[{logger}]'"
    )


@pytest.mark.unit
def test_a_pipeline_names_an_unknown_tracker_of_its_training_stage():
    from distil.pipeline import compose_stage

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        paths = compose("pipeline").paths
        with pytest.raises(ConfigError, match=r"^train stage: logger=nope: there is no such logger"):
            compose_stage("train", ["logger=nope"], paths)


def test_train_refuses_an_unknown_tracker_in_one_line_before_anything_loads(cli_home):  # noqa: F811
    result = _cli(cli_home, "distil.train", "teacher=tiny_random", "logger=[tensorboard,nope]")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: logger=nope: there is no such logger (conf/logger/nope.yaml); choose from mlflow, tensorboard, wandb"
    ]
    assert not list(cli_home.rglob("run_info.json"))


@pytest.mark.unit
@pytest.mark.parametrize(
    "stage", ["corpus", "import_model", "pseudo_label", "init_student", "train", "evaluate", "pipeline"]
)
def test_every_command_names_an_unknown_group_option_before_hydra_composes(stage, monkeypatch):
    import importlib

    module = importlib.import_module(f"distil.{stage}")
    monkeypatch.setattr(sys, "argv", [f"distil-{stage}", "paths=nope"])
    with pytest.raises(SystemExit) as exit_:  # SystemExit(message): Python prints it, exit status 1
        module.main()
    assert (
        exit_.value.code
        == "error: paths=nope: there is no such paths (conf/paths/nope.yaml); choose from default"
    )
