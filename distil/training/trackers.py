"""The experiment trackers of a training run (`logger=`, conf/logger/*.yaml): TensorBoard, Weights & Biases and
MLflow, alone or together, each one of Lightning's own loggers.

Everything distil records goes to every selected tracker through Lightning's logger API (`log_hyperparams`,
`log_metrics`), never through one tracker's own calls: the run's config, the loss terms and validation WER (the
module's `self.log`), the learning rate and the data filters' counts (callbacks), and the run's final results.
"""

from __future__ import annotations

import importlib.util
import math
import os
import time
from collections.abc import Iterable, Sequence
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf

# Lightning logger class -> (the module it imports, distil's extra that installs it).
TRACKER_PACKAGES = {
    "lightning.pytorch.loggers.WandbLogger": ("wandb", "wandb"),
    "distil.training.trackers.mlflow_logger": ("mlflow", "mlflow"),
    "lightning.pytorch.loggers.MLFlowLogger": ("mlflow", "mlflow"),
}


def mlflow_logger(**kwargs: Any) -> Any:
    """Lightning's `MLFlowLogger`. Without a tracking server (`tracking_uri` null: MLFLOW_TRACKING_URI unset) it
    writes a file store in the run directory, which MLflow 3 refuses (it prefers a database) unless
    MLFLOW_ALLOW_FILE_STORE=true: set for this process when the user has not set it (mlflow-skinny, distil's
    extra, has no database driver)."""
    from lightning.pytorch.loggers import MLFlowLogger

    if not kwargs.get("tracking_uri"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MLFlowLogger(**kwargs)


def missing_tracker_package(cfg: DictConfig) -> str | None:
    """A selected tracker whose package is not installed, as the one-line error (None when all are): checked
    with the config, before any model loads, instead of Lightning's ModuleNotFoundError at the Trainer."""
    for name, node in (cfg.get("logger") or {}).items():
        target = node.get("_target_") if isinstance(node, DictConfig) else None
        module, extra = TRACKER_PACKAGES.get(str(target), (None, None))
        if module and importlib.util.find_spec(module) is None:
            return (
                f"logger={name} needs the {module} package, which is not installed: "
                f"pip install 'distil[{extra}]' (or choose another logger, e.g. logger=tensorboard)"
            )
    return None


def log_config(loggers: Iterable, cfg: DictConfig) -> None:
    """The run's resolved config as hyper-parameters, under `config` (`config/optim/lr` in MLflow): Lightning
    logs the module's own hyper-parameters beside it (`student_dir` the resolved path where the config has null),
    and MLflow refuses a parameter logged twice with two values."""
    config = OmegaConf.to_container(cfg, resolve=True)
    for logger in loggers:
        logger.log_hyperparams({"config": config})


# The argument that attaches a Lightning logger to an existing run (TensorBoard: the same directory is enough).
RUN_ID_ARGUMENT = {
    "lightning.pytorch.loggers.WandbLogger": "id",
    "lightning.pytorch.loggers.MLFlowLogger": "run_id",
    "distil.training.trackers.mlflow_logger": "run_id",
}


def run_ids(cfg: DictConfig, loggers: Sequence) -> dict[str, str]:
    """Each tracker's run id by its name under `logger` (train_summary.json's `trackers`), for later results
    (the pipeline's evaluation of the student) to join the same runs. `loggers` are in the config's order."""
    nodes = (cfg.get("logger") or {}).items()
    return {
        name: str(logger.version)
        for (name, node), logger in zip(nodes, loggers, strict=False)
        if str(node.get("_target_")) in RUN_ID_ARGUMENT and logger.version
    }


def log_evaluation(cfg: DictConfig, summary: dict[str, Any], role: str, metrics: dict[str, Any]) -> None:
    """An evaluation of the trained student (distil-evaluate's metrics) in the training run's trackers, the same
    runs (`summary["trackers"]`), every number as `eval/<role>/<section>/...` at the run's last step."""
    from distil.utils.errors import instantiate
    from distil.utils.tensorboard import numeric_leaves

    ids = summary.get("trackers") or {}
    values = numeric_leaves({k: v for k, v in metrics.items() if k != "model"}, f"eval/{role}")
    for name, node in (cfg.get("logger") or {}).items():
        argument = RUN_ID_ARGUMENT.get(str(node.get("_target_")))
        if argument and name not in ids:
            continue  # a tracker the training did not log to: no run to join
        logger = instantiate(node, **({argument: ids[name]} if argument else {}))
        logger.log_metrics(values, step=int(summary["global_step"]))
        logger.finalize("success")
        close(logger)


class FinalResults(L.Callback):
    """The run's final results in every tracker, `final/best_val_wer_weighted`, `final/global_step` and
    `final/train_seconds` (since `started`), at the last step: at the end of training, before Lightning closes the
    trackers (TensorBoard would otherwise open a second event file), in the process that trained."""

    def __init__(self, started: float):
        self.started = started

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        best = trainer.checkpoint_callback.best_model_score if trainer.checkpoint_callback else None
        final = {
            "final/global_step": float(trainer.global_step),
            "final/train_seconds": time.time() - self.started,
        }
        if best is not None and math.isfinite(float(best)):
            final["final/best_val_wer_weighted"] = float(best)
        for logger in trainer.loggers:
            logger.log_metrics(final, step=trainer.global_step)


def close(logger: Any) -> None:
    """End a W&B run (its offline directory complete, the next run in this process a new one); Lightning's
    `finalize` closes the other trackers, and leaves W&B's open."""
    from lightning.pytorch.loggers import WandbLogger

    # `_experiment`, not `experiment`: the property would start a run where none was started.
    if isinstance(logger, WandbLogger) and getattr(logger, "_experiment", None) is not None:
        logger.experiment.finish()
