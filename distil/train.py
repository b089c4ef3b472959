"""Stage 3: distil the teacher into the student (`python -m distil.train experiment=demo`).

Reads top to bottom: resolve the teacher, build (or reuse) the initialised student, check the data and the
models (every bad input fails here, before any step), train with Lightning, export the best and the last
student as complete Hugging Face directories.

The run directory is derived from the config (`out_dir`, default `${paths.students}/${name}`, plus the
command-line overrides for ablations and multirun jobs), so the same command run twice resumes from
`<out_dir>/checkpoints/last.ckpt` instead of starting over (`ckpt_path: last`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

import distil.whisper.student  # noqa: F401  (registers the ${student_name:...} resolver used by conf/student)
from distil.data.encoder_cache import EncoderCache, cache_fingerprint
from distil.data.label_store import LABELS_METADATA
from distil.datamodules.filters import DataError
from distil.datamodules.speech import SpeechDataModule
from distil.modules.distiller import DistillationSetupError, WhisperDistiller
from distil.training.checkpoints import (
    CHECKPOINT_DIR,
    FinalCheckpoint,
    _student_state,
    export_student,
    resolve_ckpt_path,
)
from distil.utils.paths import CONF_DIR
from distil.utils.runinfo import write_run_info

log = logging.getLogger(__name__)

# Overrides that do not change what is trained, so they do not change the run directory either.
OUT_DIR_EXCLUDED_KEYS = (
    "experiment",
    "name",
    "out_dir",
    "ckpt_path",
    "data.num_workers",
    "data.val_batch_size",
    "trainer.log_every_n_steps",
    "trainer.enable_progress_bar",
    "hydra/launcher",
)


class LabellerMismatchWarning(UserWarning):
    """The pseudo-labels were made by another teacher than the KD teacher."""


# =========================================================================== config -> objects


def run_dir_from_overrides(base: str | Path, overrides: list[str]) -> Path:
    """`base`, plus one sub-directory named after the overrides that change the run (ablations, -m jobs)."""
    kept = []
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        if key in OUT_DIR_EXCLUDED_KEYS or key.startswith("hydra."):
            continue
        kept.append(item.lstrip("+"))
    if not kept:
        return Path(base)
    full = ",".join(sorted(kept, key=lambda item: (len(item), item)))  # short ablation overrides first
    name = re.sub(r"[^A-Za-z0-9._=,+-]", "_", full)
    if len(name) > 120:  # long (e.g. paths): a readable prefix plus a hash of everything, still unique
        name = name[:110] + "-" + hashlib.sha1(full.encode()).hexdigest()[:8]
    return Path(base) / name


def loss_settings(cfg: DictConfig) -> dict:
    loss = cfg.loss
    return {
        "ce_weight": loss.get("ce_weight"),
        "kl_weight": float(loss.kl_weight),
        "mse_weight": float(loss.get("mse_weight", 0.0) or 0.0),
        "temperature": float(loss.temperature),
    }


def needs_teacher(cfg: DictConfig) -> bool:
    s = loss_settings(cfg)
    return s["kl_weight"] != 0 or s["mse_weight"] != 0


def resolve_student(cfg: DictConfig, teacher_dir: str) -> str:
    """`student_dir` if given (a ready HF directory), else the initialised student (built on first use)."""
    if cfg.get("student_dir"):
        return str(cfg.student_dir)
    from distil.whisper.student import init_student

    return str(
        init_student(
            teacher_dir,
            cfg.student_init_dir,
            encoder_layers=cfg.student.encoder_layers,
            decoder_layers=cfg.student.decoder_layers,
        )
    )


def check_labeller(pseudo_labels_dir: str, datasets_cfg, teacher_dir: str, teacher_name: str) -> list[str]:
    """Warn when the pseudo-labels' teacher (distil_labels.json) is not the KD teacher; returns the messages."""
    from distil.whisper.models import model_fingerprint

    fingerprint = model_fingerprint(teacher_dir)
    messages = []
    for entry in datasets_cfg:
        for split in entry.get("splits") or ["train"]:
            meta_path = Path(pseudo_labels_dir) / entry["name"] / split / LABELS_METADATA
            if not meta_path.is_file():
                continue
            labeller = json.loads(meta_path.read_text()).get("teacher", {})
            if labeller.get("fingerprint") and labeller["fingerprint"] != fingerprint:
                messages.append(
                    f"pseudo-labels of {entry['name']}/{split} were made by {labeller.get('name')!r} "
                    f"({labeller['fingerprint']}) but the KD teacher is {teacher_name!r} ({fingerprint}): the KL term "
                    "pulls the student towards a different model than the one that wrote its labels"
                )
    for m in messages:
        warnings.warn(m, LabellerMismatchWarning, stacklevel=2)
        log.warning(m)
    return messages


def build_module(cfg: DictConfig, student_dir: str, teacher_dir: str | None) -> WhisperDistiller:
    m, o = cfg.model, cfg.optim
    return WhisperDistiller(
        student_dir,
        teacher_dir,
        **loss_settings(cfg),
        freeze_encoder=bool(m.freeze_encoder),
        dropout=m.get("dropout"),
        gradient_checkpointing=bool(m.get("gradient_checkpointing", False)),
        share_encoder=m.get("share_encoder"),
        lr=float(o.lr),
        weight_decay=float(o.weight_decay),
        betas=tuple(o.betas),
        eps=float(o.eps),
        warmup_steps=int(o.warmup_steps),
        schedule=str(o.schedule),
        total_steps=int(cfg.trainer.max_steps),
        val_max_new_tokens=int(cfg.val.max_new_tokens),
        val_num_beams=int(cfg.val.get("num_beams", 1)),
        language=cfg.data.get("language"),
        task=cfg.data.get("task"),
    )


def build_datamodule(cfg: DictConfig, student_dir: str, cache: EncoderCache | None) -> SpeechDataModule:
    d = cfg.data
    label_source = str(cfg.loss.labels)
    return SpeechDataModule(
        OmegaConf.to_container(d.datasets, resolve=True),
        student_dir,
        label_source=label_source,
        pseudo_labels_dir=d.pseudo_labels_dir,
        streaming=bool(d.streaming),
        validation_splits=list(d.validation_splits or []),
        validation_datasets=OmegaConf.to_container(d.validation_datasets, resolve=True)
        if d.validation_datasets
        else [],
        batch_size=int(d.batch_size),
        val_batch_size=int(d.val_batch_size),
        num_workers=int(d.num_workers),
        seed=int(cfg.seed),
        stopping_strategy=str(d.stopping_strategy),
        shuffle_buffer_size=int(d.shuffle_buffer_size),
        wer_threshold=d.wer_threshold,
        min_duration_s=d.min_duration_s,
        max_duration_s=d.max_duration_s,
        max_label_length=int(d.max_label_length),
        timestamp_probability=float(d.timestamp_probability),
        condition_on_prev_probability=float(d.condition_on_prev_probability),
        max_train_samples=d.max_train_samples,
        max_val_samples=d.max_val_samples,
        language=d.get("language"),
        task=d.get("task"),
        encoder_cache=cache,
        cache_dir=d.get("cache_dir"),
    )


def build_trainer(cfg: DictConfig, out_dir: Path, callbacks: list | None = None) -> L.Trainer:
    t = OmegaConf.to_container(cfg.trainer, resolve=True)
    ckpt_dir = out_dir / CHECKPOINT_DIR
    best = ModelCheckpoint(
        dirpath=ckpt_dir,
        filename="best",
        monitor="val/wer_weighted",
        mode="min",
        save_top_k=1,
        auto_insert_metric_name=False,
        enable_version_counter=False,
    )
    last = ModelCheckpoint(
        dirpath=ckpt_dir,
        filename="step-{step}",
        save_top_k=0,
        save_last=True,
        every_n_train_steps=int(cfg.checkpoint.every_n_steps),
        enable_version_counter=False,
    )
    plugins = list(t.pop("plugins", None) or [])
    if "SLURM_JOB_ID" in os.environ and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        from lightning.pytorch.plugins.environments import SLURMEnvironment

        # submitit (hydra/launcher=slurm) owns requeueing; Lightning's own requeue would fight it.
        plugins.append(SLURMEnvironment(auto_requeue=False))
    logger = TensorBoardLogger(save_dir=str(out_dir), name="tensorboard", version="", default_hp_metric=False)
    return L.Trainer(
        **t,
        default_root_dir=str(out_dir),
        logger=logger,
        callbacks=[
            best,
            last,
            FinalCheckpoint(ckpt_dir / "last.ckpt"),
            LearningRateMonitor(logging_interval="step"),
            *(callbacks or []),
        ],
        plugins=plugins or None,
    )


# =========================================================================== export


# =========================================================================== the stage


def train(cfg: DictConfig, callbacks: list | None = None) -> dict[str, Any]:
    """Run (or resume) one distillation run; returns a summary with the best validation WER."""
    from distil.whisper.models import resolve_model

    started = time.time()
    if cfg.get("out_dir") in (None, "", "???"):
        raise ValueError("out_dir must be set (python -m distil.train derives it from the config)")
    out_dir = Path(cfg.out_dir).expanduser()
    L.seed_everything(int(cfg.seed), workers=True)
    if cfg.get("matmul_precision"):
        torch.set_float32_matmul_precision(str(cfg.matmul_precision))

    teacher_dir = resolve_model(cfg.teacher, models_root=cfg.paths.models)
    student_dir = resolve_student(cfg, teacher_dir)
    kd_teacher = teacher_dir if needs_teacher(cfg) else None
    if cfg.loss.labels not in ("pseudo", "text"):
        raise ValueError(f"loss.labels must be 'pseudo' or 'text', got {cfg.loss.labels!r}")

    module = build_module(cfg, student_dir, kd_teacher)  # student/teacher compatibility errors come here
    cache = None
    if cfg.encoder_cache.enabled:
        from transformers import WhisperFeatureExtractor

        fe = WhisperFeatureExtractor.from_pretrained(student_dir)
        cache = EncoderCache(cfg.encoder_cache.dir, cache_fingerprint(module.encoder_fingerprint(), fe))
        module.set_encoder_cache(cache)
    datamodule = build_datamodule(cfg, student_dir, cache)
    datamodule.setup("fit")  # data errors (columns, pseudo-labels, references) before any step
    if kd_teacher is not None and cfg.loss.labels == "pseudo":
        check_labeller(cfg.data.pseudo_labels_dir, cfg.data.datasets, teacher_dir, cfg.teacher.name)

    out_dir.mkdir(parents=True, exist_ok=True)
    write_run_info(cfg, out_dir)
    filter_report = {k: v.as_dict() for k, v in datamodule.filter_stats.items()}
    (out_dir / "data_filter.json").write_text(json.dumps(filter_report, indent=2) + "\n")

    # The frozen encoder is in eval mode on purpose (no dropout: its output must not change).
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", category=UserWarning)
    trainer = build_trainer(cfg, out_dir, callbacks)
    for source, stats in datamodule.filter_stats.items():
        trainer.logger.experiment.add_text("data/filter", stats.summary(), 0)
        trainer.logger.log_metrics(
            {f"data/{source}/kept": stats.kept, f"data/{source}/dropped": stats.total - stats.kept}, 0
        )
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), out_dir)
    if ckpt_path:
        log.info("resuming from %s", ckpt_path)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)

    # Read the outcome from last.ckpt, not from this process's trainer: with ddp_spawn the training ran in
    # child processes and this trainer never saw the steps.
    last_ckpt = out_dir / CHECKPOINT_DIR / "last.ckpt"
    final = torch.load(last_ckpt, map_location="cpu", weights_only=False, mmap=True)
    best_state = next(
        (
            v
            for k, v in final.get("callbacks", {}).items()
            if k.startswith("ModelCheckpoint") and "val/wer_weighted" in k
        ),
        {},
    )
    best_score, best_path = best_state.get("best_model_score"), best_state.get("best_model_path") or ""
    summary: dict[str, Any] = {
        "out_dir": str(out_dir),
        "student_dir": student_dir,
        "teacher_dir": teacher_dir,
        "global_step": int(final["global_step"]),
        "resumed_from": ckpt_path,
        "train_seconds": time.time() - started,
        "data_filter": filter_report,
        "best_val_wer_weighted": None if best_score is None else float(best_score),
        "best_checkpoint": best_path or None,
    }
    if trainer.is_global_zero and cfg.get("export", True):
        summary["exports"] = {
            "last": str(export_student(_student_state(final), student_dir, out_dir / "last"))
        }
        if best_path and Path(best_path).is_file():
            best = torch.load(best_path, map_location="cpu", weights_only=False, mmap=True)
            summary["exports"]["best"] = str(
                export_student(_student_state(best), student_dir, out_dir / "best")
            )
        (out_dir / "train_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    if cfg.get("out_dir") is None:
        overrides = list(HydraConfig.get().overrides.task)
        OmegaConf.set_struct(cfg, False)
        cfg.out_dir = str(run_dir_from_overrides(cfg.students_root_dir, overrides))
        OmegaConf.set_struct(cfg, True)
    write_run_info(cfg)
    try:
        summary = train(cfg)
    except (DataError, DistillationSetupError) as err:
        raise SystemExit(f"error: {err}") from err
    return summary.get("best_val_wer_weighted")


if __name__ == "__main__":
    main()
