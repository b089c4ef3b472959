"""Stage 3: distil the teacher into the student (`distil-train experiment=demo`).

Reads top to bottom: resolve the teacher, build (or reuse) the initialised student, instantiate the
LightningModule (`module:`), the DataModule (`data:`), the callbacks, the logger and the Trainer from the
config, train, then export the best and the last student as complete Hugging Face directories (and as
CTranslate2 directories for faster-whisper with `export_ctranslate2=[int8]`).

The run directory is `out_dir`, by default `${students_root_dir}/<overrides>` (Hydra's `job.override_dirname`,
without the keys that do not change what is trained), so the same command run twice resumes from
`<out_dir>/checkpoints/last.ckpt` instead of starting over (`ckpt_path: last`), and -m jobs never share one.
A resume keeps the settings that define the training (`run_config.json`; `resume=force` applies new ones), one
run at a time writes a run directory (`run.lock`), and SIGTERM stops a run with `last.ckpt` saved and exit
status 1 (the same command resumes).

Several processes (`trainer.devices=2`, DDP; gloo on CPU, NCCL on GPUs): Lightning's default launcher re-runs
this same command in each further process (with `hydra.run.dir` pinned to the first one's), so every process
derives the same out_dir and checkpoint to resume from. Each process trains on its own batches
(`TrainStream`), one optimiser step consumes `effective_batch_size` samples, validation WER is computed
over all processes' transcripts, and only rank 0 writes files (run info, checkpoints, the trackers' logs,
exports, train_summary.json).
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from distil.config.choices import known_choices
from distil.config.schema import validate
from distil.data.encoder_cache import EncoderCache, cache_fingerprint
from distil.data.label_store import check_labeller
from distil.training.callbacks import DATA_FILTER_REPORT, ResumeWithConfigOptimiser
from distil.training.checkpoints import CHECKPOINT_DIR, AtomicCheckpointIO, export_student, resolve_ckpt_path
from distil.training.optim import effective_batch_size
from distil.training.trackers import FinalResults, close, log_config, run_ids
from distil.utils.errors import InputError, instantiate, one_line_errors
from distil.utils.hub import push_from_config
from distil.utils.io import (
    LockHeldError,
    ensure_writable_directory,
    ensure_writable_parent,
    hold_lock,
    read_json,
    writable_home,
    write_atomic,
    write_json_atomic,
)
from distil.utils.paths import CONF_DIR, safe_dirname
from distil.utils.runinfo import command_line, write_run_info
from distil.whisper.ct2_export import check_quantization, export_ct2
from distil.whisper.model_card import write_run_cards
from distil.whisper.models import resolve_model
from distil.whisper.student import init_student, is_complete_student

log = logging.getLogger(__name__)

DATA_FINGERPRINT = "data_fingerprint.json"  # what the run trains on, checked on resume
RUN_CONFIG = "run_config.json"  # the settings that define the training, checked on resume
RUN_LOCK = "run.lock"  # held by the process that writes the run directory (pid, host, start)

# The config that defines what a run trains (optimiser, schedule, loss, data mixture and batch size, student,
# teacher, the model's trained parts, seed); a resume must keep it (resume=force: apply the new values). The rest
# only extends or observes a run and may change on resume: trainer.max_steps, validation and checkpoint
# cadence, logging, progress, devices, export.
RUN_CONFIG_KEYS = (
    "optim",
    "ema",
    "checkpoint.average_last",
    "augment",
    "loss",
    "data",
    "student",
    "student_dir",
    "teacher",
    "model",
    "seed",
    "trainer.gradient_clip_val",
    "module._target_",
    "module.optimizer._target_",
    "module.scheduler._target_",
)
# ... less these keys within them: speed, memory and validation, not what is trained.
NOT_RUN_CONFIG = (
    "model.gradient_checkpointing",
    "model.attn_implementation",
    "model.compile",
    "model.compile_options",
    "data.num_workers",
    "data.cache_dir",
    "data.val_batch_size",
    "data.max_val_samples",
    "data.validation_splits",
    "data.validation_datasets",
)
# Settings added after runs were first recorded, with the value that reproduces how a run without them trained:
# a record that lacks one (a run started before it existed) is read as having that value.
ADDED_SETTINGS = {
    "optim.min_lr_ratio": 0.0,
    "optim.decay_fraction": 0.1,
    "ema.decay": None,
    "checkpoint.average_last": None,
    "augment.specaugment.enabled": False,
    "augment.specaugment.consistent": True,
    "augment.specaugment.mask_time_prob": 0.05,
    "augment.specaugment.mask_time_length": 10,
    "augment.specaugment.mask_time_min_masks": 2,
    "augment.specaugment.mask_feature_prob": 0.0,
    "augment.specaugment.mask_feature_length": 10,
    "augment.specaugment.mask_feature_min_masks": 0,
    "augment.bpe_dropout": 0.0,
}
# Settings a checkpoint cannot be continued under, even with resume=force: they change which parameters exist
# or train, so the saved weights or optimiser state no longer fit.
NOT_FORCEABLE = (
    "student.encoder_layers",
    "student.decoder_layers",
    "model.freeze_encoder",
    "model.freeze_embed_positions",
    "model.freeze_embed_tokens",
)


def default_out_dir(students_root_dir: str | Path, override_dirname: str) -> Path:
    """`students_root_dir`, plus one sub-directory named after the overrides that change the run."""
    return (
        Path(students_root_dir) / safe_dirname(override_dirname)
        if override_dirname
        else Path(students_root_dir)
    )


def resolve_out_dir(cfg: DictConfig, overrides_dirname: str) -> str:
    """The run directory: `out_dir` when set, else `students_root_dir` plus the sub-directory named after the
    command-line overrides (`overrides_dirname`: Hydra's `job.override_dirname`, or `override_dirname(...)`)."""
    if cfg.get("out_dir"):
        return str(cfg.out_dir)
    return str(default_out_dir(cfg.students_root_dir, overrides_dirname))


def override_dirname(overrides: Sequence[str]) -> str:
    """Hydra's `job.override_dirname` of `distil-train <overrides>` (inside an initialised Hydra, e.g. compose)."""
    from hydra import compose

    return compose(
        config_name="train", overrides=list(overrides), return_hydra_config=True
    ).hydra.job.override_dirname


def resolve_student(cfg: DictConfig, teacher_dir: str) -> str:
    """`student_dir` if given (a ready HF directory), else the initialised student (built on first use)."""
    if cfg.get("student_dir"):
        return str(cfg.student_dir)
    s = cfg.student
    return str(
        init_student(
            teacher_dir, s.init_dir, encoder_layers=s.encoder_layers, decoder_layers=s.decoder_layers
        )
    )


def train(cfg: DictConfig, callbacks: list | None = None, command: str | None = None) -> dict[str, Any]:
    """Run (or resume) one distillation run; returns a summary with the best validation WER. `command` (the
    command line that made the run) is recorded in the summary and the exports' model cards."""
    from contextlib import nullcontext

    from lightning.pytorch.utilities import rank_zero_only

    started = time.time()
    if cfg.get("out_dir") in (None, "", "???"):
        raise ValueError("out_dir must be set (distil-train derives it from the overrides)")
    ct2_quantizations = [check_quantization(str(q)) for q in cfg.get("export_ctranslate2") or []]
    resume = str(cfg.get("resume", "auto"))  # auto | force (distil.config.schema)
    out_dir = ensure_writable_directory(cfg.out_dir, "out_dir")  # before any model loads
    if not cfg.get("student_dir") and not is_complete_student(cfg.student.init_dir):  # built on first use
        ensure_writable_parent(cfg.student.init_dir, "student.init_dir")
    # One run writes a run directory at a time. Under DDP the lock is rank 0's: the launcher's environment
    # (RANK, LOCAL_RANK, SLURM_PROCID) gives each process its rank before the trainer exists.
    first = rank_zero_only.rank == 0
    with lock_run_dir(out_dir) if first else nullcontext():
        ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), out_dir)
        changes = check_run_config(
            out_dir, run_config(cfg), resuming=bool(ckpt_path), force=resume == "force", write=first
        )
        if (
            ckpt_path and resume == "force"
        ):  # every rank, so all apply the same values (rank 0 wrote the record)
            callbacks = [*(callbacks or []), ResumeWithConfigOptimiser(changes)]
        return _train(cfg, out_dir, ckpt_path, ct2_quantizations, started, callbacks, command)


def _train(
    cfg: DictConfig,
    out_dir: Path,
    ckpt_path: str | None,
    ct2_quantizations: list[str],
    started: float,
    callbacks: list | None,
    command: str | None = None,
) -> dict[str, Any]:
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    L.seed_everything(int(cfg.seed), workers=True)
    if cfg.get("matmul_precision"):
        torch.set_float32_matmul_precision(str(cfg.matmul_precision))

    teacher_dir = resolve_model(cfg.teacher, models_root=cfg.paths.models)
    student_dir = resolve_student(cfg, teacher_dir)

    # Validation sets are named from the config alone; their data is loaded (and checked) in setup.
    # augment.bpe_dropout re-tokenizes the training labels in the collator (recorded once, as augment.*).
    bpe_dropout = float(OmegaConf.select(cfg, "augment.bpe_dropout", default=0.0) or 0.0)
    datamodule = instantiate(cfg.data, processor_dir=student_dir, bpe_dropout=bpe_dropout)
    val_names, val_languages = datamodule.validation_set_names()
    module = instantiate(  # loads the teacher only if a loss term needs it; compatibility errors come here
        cfg.module,
        student_dir=student_dir,
        teacher_dir=teacher_dir,
        val_set_names=val_names,
        val_languages=val_languages,
    )
    if cfg.encoder_cache.enabled:
        from transformers import WhisperFeatureExtractor

        fe = WhisperFeatureExtractor.from_pretrained(student_dir)
        cache = EncoderCache(cfg.encoder_cache.dir, cache_fingerprint(module.encoder_fingerprint(), fe))
        module.set_encoder_cache(cache)
        datamodule.encoder_cache = cache
    if module.teacher is not None and cfg.loss.labels == "pseudo":
        check_labeller(cfg.data.pseudo_labels_dir, cfg.data.datasets, teacher_dir, cfg.teacher.name)

    out_dir.mkdir(parents=True, exist_ok=True)
    # The frozen encoder and teacher are in eval mode on purpose (no dropout: their outputs must not change).
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", category=UserWarning)
    # Validation metrics are computed from every rank's transcripts (WhisperDistiller.on_validation_epoch_end).
    warnings.filterwarnings(
        "ignore", message=r".*sync_dist=True.* when logging on epoch level", category=UserWarning
    )
    trainer = instantiate(
        cfg.trainer,
        default_root_dir=str(out_dir),
        logger=[instantiate(c) for c in (cfg.get("logger") or {}).values()],  # logger=null: none
        callbacks=[
            *(instantiate(c) for c in cfg.callbacks.values()),
            *(callbacks or []),
            FinalResults(started),
        ],
        plugins=[AtomicCheckpointIO(), *slurm_plugins()],
    )
    # The trainer knows each process's rank from the launcher's environment before fit: only rank 0 writes.
    if trainer.is_global_zero:
        write_run_info(cfg, out_dir)
        log_config(trainer.loggers, cfg)
    check_training_data(
        out_dir,
        datamodule.data_fingerprint(),
        resuming=bool(ckpt_path),
        cfg=cfg,
        write=trainer.is_global_zero,
    )
    if ckpt_path:
        log.info("resuming from %s", ckpt_path)
    batch = effective_batch_size(
        cfg.data.batch_size, trainer.num_devices, trainer.num_nodes, trainer.accumulate_grad_batches
    )
    log.info(
        "effective batch %d = data.batch_size %d x %d devices x %d nodes x accumulate_grad_batches %d; "
        "max_steps %s optimiser steps",
        batch,
        cfg.data.batch_size,
        trainer.num_devices,
        trainer.num_nodes,
        trainer.accumulate_grad_batches,
        trainer.max_steps,
    )
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)  # data errors come before any step
    except SIGTERMException:  # Lightning stops after the current batch; FinalCheckpoint saved last.ckpt
        raise SystemExit(
            f"stopped by {stop_signal(trainer)} at step {trainer.global_step}; last.ckpt saved in "
            f"{out_dir / CHECKPOINT_DIR}; "
            "rerun the same command to resume"
        ) from None

    # Read the outcome from last.ckpt, not from this process's trainer: with ddp_spawn the training ran in
    # child processes and this trainer never saw the steps.
    final = torch.load(
        out_dir / CHECKPOINT_DIR / "last.ckpt", map_location="cpu", weights_only=False, mmap=True
    )
    best = trainer.checkpoint_callback  # the first ModelCheckpoint: best.ckpt by validation WER
    best.load_state_dict(final["callbacks"].get(best.state_key, {}))
    best_path = (
        best.best_model_path if best.best_model_path and Path(best.best_model_path).is_file() else None
    )
    summary: dict[str, Any] = {
        "out_dir": str(out_dir),
        "student_dir": student_dir,
        "teacher_dir": teacher_dir,
        "global_step": int(final["global_step"]),
        "processes": trainer.num_devices * trainer.num_nodes,
        "effective_batch_size": batch,  # of this (last) invocation; a resumed run may have changed it
        "resumed_from": ckpt_path,
        "train_seconds": time.time() - started,
        "data_filter": json.loads((out_dir / DATA_FILTER_REPORT).read_text()),
        "best_val_wer_weighted": None if best.best_model_score is None else float(best.best_model_score),
        "best_checkpoint": best_path,
        "command": command,
    }
    if not trainer.is_global_zero:  # under DDP (script launcher) the other ranks return here
        return summary
    if cfg.get("export", True):
        last = out_dir / CHECKPOINT_DIR / "last.ckpt"
        exports = {"last": last, "best": best_path}
        summary["exports"] = {
            name: str(export_student(ckpt, student_dir, out_dir / name))
            for name, ckpt in exports.items()
            if ckpt
        }
        for name, weights in averaged_exports(trainer, final).items():  # averaged/, ema/
            summary["exports"][name] = str(export_student(last, student_dir, out_dir / name, weights))
        for name, hf_dir in list(summary["exports"].items()):
            for q in ct2_quantizations:  # the run owns these directories: replace an export of older weights
                summary["exports"][f"{name}-ct2-{q}"] = str(
                    export_ct2(hf_dir, out_dir / f"{name}-ct2-{q}", q, force=True)
                )

    def save_summary() -> None:
        write_atomic(out_dir / "train_summary.json", json.dumps(summary, indent=2, default=str) + "\n")

    summary["trackers"] = run_ids(cfg, trainer.loggers)  # the runs the pipeline's evaluation joins
    save_summary()
    for logger in trainer.loggers:
        close(logger)
    # Each export's README.md, from the records just written (the pipeline adds its evaluation results later).
    exports = summary.get("exports") or {}
    write_run_cards(out_dir, exports, command)
    if cfg.get("push_to_hub") and exports:  # the best export (else last), with its card
        summary["hub_commit"] = push_from_config(cfg, exports.get("best") or exports["last"])
        save_summary()
    return summary


def averaged_exports(trainer: L.Trainer, final: dict) -> dict[str, dict[str, torch.Tensor]]:
    """The weight averages to export beside best and last, as HF weights, from the final checkpoint's state of
    the averaging callbacks (this process's trainer may not have trained: ddp_spawn): `averaged` (the mean of
    the last `checkpoint.average_last` saves) and `ema` (`ema.decay`), when on."""
    from distil.training.averaging import EMA, CheckpointAverage, average_weights, student_weights

    out: dict[str, dict[str, torch.Tensor]] = {}
    for callback in trainer.callbacks:
        state = final.get("callbacks", {}).get(callback.state_key)
        if isinstance(callback, CheckpointAverage) and callback.keep is not None and state:
            callback.load_state_dict(state)
            steps = callback.averaged_steps()
            log.info("averaging the trained weights of steps %s", ", ".join(map(str, steps)))
            snapshots = [torch.load(callback.path(s), map_location="cpu", weights_only=True) for s in steps]
            out["averaged"] = average_weights(snapshots)
        elif isinstance(callback, EMA) and callback.decay is not None and state and state.get("weights"):
            out["ema"] = student_weights(state["weights"])
    return out


def stop_signal(trainer: L.Trainer) -> str:
    """The name of the signal that stopped `fit` (Lightning handles SIGUSR1 through its SIGTERM path)."""
    from distil.training.callbacks import SchedulerSignals

    received = [c.received for c in trainer.callbacks if isinstance(c, SchedulerSignals) and c.received]
    return received[0] if received else "SIGTERM"


class TrainingDataChangedError(InputError):
    """A resumed run whose training data is not what it started on."""


def check_training_data(
    out_dir: Path, fingerprint: dict, resuming: bool, cfg: DictConfig, write: bool = True
) -> None:
    """Record the training data at the start; on resume, refuse (or, with `resume=force` or the older
    `resume_data_changed=warn`, warn) when it changed: the saved batch position would then point into other data. `write=False` (DDP ranks
    other than 0) checks without writing."""
    path = out_dir / DATA_FINGERPRINT
    if not resuming or not path.is_file():
        if write:
            write_json_atomic(path, fingerprint)
        return
    recorded = read_json(path)
    changed = sorted(k for k in set(recorded) | set(fingerprint) if recorded.get(k) != fingerprint.get(k))
    if not changed:
        return
    message = (
        f"the training data of {out_dir} changed since the run started ({', '.join(changed)}): resuming would "
        "continue the old run's batch order on other data. Start a new run (another out_dir), restore the data, "
        "or pass resume=force to resume anyway"
    )
    if cfg.get("resume_data_changed", "error") != "warn" and cfg.get("resume") != "force":
        raise TrainingDataChangedError(message)
    log.warning(message)
    if write:
        write_json_atomic(path, fingerprint)


class RunDirLockedError(InputError):
    """Another live process is writing the run directory."""


@contextmanager
def lock_run_dir(out_dir: Path) -> Iterator[None]:
    """`<out_dir>/run.lock` while this process writes the run directory; refused while a live run holds it."""
    try:
        with hold_lock(out_dir / RUN_LOCK):
            yield
    except LockHeldError as err:
        raise RunDirLockedError(
            f"{out_dir} is being written by another training run ({err}): wait for it to end (or stop it), or "
            "train in another out_dir. The lock of a process that has ended is taken over: at once on this "
            "host, after 2 minutes from another"
        ) from None


def run_config(cfg: DictConfig) -> dict[str, Any]:
    """The settings that define the training (`RUN_CONFIG_KEYS` less `NOT_RUN_CONFIG`), resolved and flattened to
    dotted keys (`optim.lr`, `data.datasets.0.path`), as JSON values."""

    def flatten(key: str, value: Any) -> dict[str, Any]:
        if isinstance(value, dict):
            return {k: v for name, item in value.items() for k, v in flatten(f"{key}.{name}", item).items()}
        if isinstance(value, list) and any(isinstance(item, dict) for item in value):
            return {k: v for i, item in enumerate(value) for k, v in flatten(f"{key}.{i}", item).items()}
        return {key: value}

    flat: dict[str, Any] = {}
    for key in RUN_CONFIG_KEYS:
        value = OmegaConf.select(cfg, key, default=None)
        if isinstance(value, DictConfig | ListConfig):
            value = OmegaConf.to_container(value, resolve=True)
        flat.update(flatten(key, value))
    kept = {k: v for k, v in flat.items() if not any(k == p or k.startswith(p + ".") for p in NOT_RUN_CONFIG)}
    return json.loads(json.dumps(kept, default=str))


def run_config_changes(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`key old → new` for each setting that differs between the recorded run and this config."""

    def shown(settings: dict, key: str) -> str:
        return json.dumps(settings[key]) if key in settings else "(unset)"

    return [
        f"{k} {shown(recorded, k)} → {shown(current, k)}"
        for k in sorted(set(recorded) | set(current))
        if recorded.get(k) != current.get(k) or (k in recorded) != (k in current)
    ]


class ResumeSettingsChangedError(InputError):
    """A resume whose training settings differ from the run's."""


def check_run_config(
    out_dir: Path, settings: dict[str, Any], resuming: bool, force: bool, write: bool = True
) -> list[str]:
    """Record the run's settings at the start; on resume, refuse when they changed, unless `force` (then the
    record becomes the new settings, which `ResumeWithConfigOptimiser` applies). Returns the changes."""
    path = out_dir / RUN_CONFIG
    if not resuming or not path.is_file():  # a new run (or one started before the record existed)
        if write:
            write_json_atomic(path, settings)
        return []
    added = {k: v for k, v in ADDED_SETTINGS.items() if k in settings}
    changes = run_config_changes({**added, **read_json(path)}, settings)
    if not changes:
        return []
    fixed = [c for c in changes if c.split(" ")[0] in NOT_FORCEABLE]
    if force and fixed:
        raise ResumeSettingsChangedError(
            f"resume=force cannot continue {out_dir} with {'; '.join(fixed)}: the checkpoint's weights and "
            "optimiser state belong to the other set of parameters. Rerun with the run's values, or start a new "
            "run (another out_dir, or ckpt_path=null there)"
        )
    if not force:
        raise ResumeSettingsChangedError(
            f"{out_dir} was trained with other settings than this resume's: {'; '.join(changes)}. Rerun with the "
            "run's settings to resume, train in another out_dir (or ckpt_path=null to start over there), or pass "
            "resume=force to continue from the checkpoint with the new settings"
        )
    log.warning("resume=force: continuing %s with changed settings: %s", out_dir, "; ".join(changes))
    if write:
        write_json_atomic(path, settings)
    return changes


def slurm_plugins() -> list:
    """Inside a SLURM batch job, submitit (hydra/launcher=slurm) owns requeueing; Lightning's would fight it."""
    import os

    if "SLURM_JOB_ID" in os.environ and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        from lightning.pytorch.plugins.environments import SLURMEnvironment

        return [SLURMEnvironment(auto_requeue=False)]
    return []


def run_command(cfg: DictConfig) -> dict[str, Any]:
    """What `distil-train` does with its composed config (also `distil.run("train", ...)`): the training summary
    (`out_dir`, `exports`, the best validation WER, ...), or {"plan": ...} with dry_run=true (printed too)."""
    validate(cfg, "train")  # every key's type and range, before any model or data loads
    from hydra.core.hydra_config import HydraConfig
    from lightning.pytorch.utilities import rank_zero_only

    if cfg.get("out_dir") is None:
        OmegaConf.set_struct(cfg, False)
        cfg.out_dir = resolve_out_dir(cfg, HydraConfig.get().job.override_dirname)
        OmegaConf.set_struct(cfg, True)
    if cfg.get("dry_run"):
        from distil.training.sizing import estimate_training
        from distil.utils.launch import launcher_plan, print_dry_run, train_plan

        plan = {
            **train_plan(cfg),
            "launcher": launcher_plan(cfg, "distil-train"),
            "estimate": estimate_training(cfg),
        }
        print_dry_run("distil-train", plan)
        return {"plan": plan}
    # Lightning's DDP launcher re-runs this command in the other processes (LOCAL_RANK/RANK set): they share
    # the Hydra run directory, which rank 0 alone writes.
    run_dir = rank_zero_only(write_run_info)(cfg)
    summary = train(cfg, command=command_line("distil-train"))
    if run_dir is not None:  # rank 0: the job directory's metrics.json is what the sweep collector tabulates
        write_json_atomic(run_dir / "metrics.json", json.loads(json.dumps(summary, default=str)))
    return summary


@writable_home
@known_choices  # logger=nope: one line before Hydra composes
@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="train")
@one_line_errors
def main(cfg: DictConfig) -> float | None:
    return run_command(cfg).get("best_val_wer_weighted")


if __name__ == "__main__":
    main()
