"""Lightning callbacks of the training stage (configured under `callbacks:` in conf/train.yaml)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L

from distil.utils.io import write_atomic

log = logging.getLogger(__name__)

DATA_FILTER_REPORT = "data_filter.json"


class FinalCheckpoint(L.Callback):
    """Write last.ckpt when training ends (max_steps need not be a multiple of the checkpoint interval), and
    when SIGTERM stops it (a scheduler's notice before it kills: the rerun resumes from here).

    Runs inside the training processes (also under ddp_spawn) and not after another exception, so a failed
    run leaves the last good checkpoint as it was. Lightning's SIGTERM handler lets the current batch finish
    and then raises `SIGTERMException` in every process at the same step, so saving here is collective like
    any checkpoint. Inside a submitit job SIGTERM is submitit's (`SchedulerSignals`) and never reaches here."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.save_checkpoint(self.path)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if isinstance(exception, SIGTERMException):
            trainer.save_checkpoint(self.path)
            log.warning("stopped by a stop signal at step %d; saved %s", trainer.global_step, self.path)


class DataFilterReport(L.Callback):
    """`<out_dir>/data_filter.json` and the trackers' counts of what the datamodule's filters kept and dropped.

    Lightning runs the datamodule's `setup` before the callbacks' `setup`, so the counts exist here, before
    the first step; only rank 0 writes."""

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        stats = getattr(trainer.datamodule, "filter_stats", None)
        if stage != "fit" or stats is None or not trainer.is_global_zero:
            return
        report = {source: s.as_dict() for source, s in stats.items()}
        write_atomic(self.out_dir / DATA_FILTER_REPORT, json.dumps(report, indent=2) + "\n")
        for (
            logger
        ) in trainer.loggers:  # every tracker (logger=): the counts; TensorBoard also the summary text
            for source, s in stats.items():
                if hasattr(logger.experiment, "add_text"):
                    logger.experiment.add_text("data/filter", s.summary(), 0)
                logger.log_metrics(
                    {f"data/{source}/kept": s.kept, f"data/{source}/dropped": s.total - s.kept}, 0
                )


class SchedulerSignals(L.Callback):
    """The signals a scheduler sends before it kills: inside submitit, SIGTERM is submitit's; outside, SIGUSR1
    stops training like SIGTERM.

    SLURM preempts with SIGTERM followed by submitit's checkpoint signal (USR2): submitit ignores the SIGTERM
    and, on USR2, resubmits the job, which resumes from `checkpoints/last.ckpt`. Lightning (2.x) answers the
    SIGTERM itself by stopping `fit` at the end of the current batch, and the process then exits before
    USR2 arrives, without a result and without a requeue (the sweep fails). So once Lightning has installed
    its handlers, this puts back the one submitit installed.

    Outside submitit, `#SBATCH --signal=USR1@120` (or any scheduler's early-warning SIGUSR1) gets Lightning's
    SIGTERM handler: the batch in hand finishes, `last.ckpt` is saved, and the run exits non-zero naming the
    signal (`received`). Lightning's teardown puts the previous SIGUSR1 handler back."""

    def __init__(self) -> None:
        self._submitit_handler = None
        self.received: str | None = None  # the name of the stop signal received, for the exit message

    @staticmethod
    def active() -> bool:
        import os

        return bool(os.environ.get("SUBMITIT_EXECUTOR"))

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        import signal

        if self.active():  # before Lightning's signal connector replaces it (it does so after `setup`)
            self._submitit_handler = signal.getsignal(signal.SIGTERM)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        if self._submitit_handler is not None:
            signal.signal(signal.SIGTERM, self._submitit_handler)
        elif callable(stop := signal.getsignal(signal.SIGTERM)) and signal.getsignal(signal.SIGUSR1) in (
            signal.SIG_DFL,
            None,
        ):

            def stop_on_usr1(signum, frame):
                self.received = signal.Signals(signum).name
                stop(signum, frame)

            signal.signal(signal.SIGUSR1, stop_on_usr1)


class ResumeWithConfigOptimiser(L.Callback):
    """`resume=force`: the optimiser and schedule of this run's config replace those restored from the checkpoint.

    Lightning restores the optimiser's state and its parameter groups (learning rate, weight decay, betas, ...)
    and the scheduler's base learning rates from the checkpoint, so a new `optim.lr` would be ignored. Here,
    once they are restored (`on_train_start`), each group takes the freshly configured values (the moment
    estimates stay) and the scheduler the new base rates and multipliers, at the restored step. Only
    `LambdaLR` schedules (distil's `build_scheduler`) are recomputed; another scheduler keeps its state."""

    def __init__(self, changes: list[str] | None = None):
        self.changes = list(changes or [])
        self.applied: list[float] = []  # the learning rates in force after the resume, for the log and tests

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import torch

        from distil.training.optim import apply_schedule

        fresh = pl_module.configure_optimizers()
        fresh_optimizer = fresh["optimizer"] if isinstance(fresh, dict) else fresh
        fresh_scheduler = fresh.get("lr_scheduler", {}).get("scheduler") if isinstance(fresh, dict) else None
        (optimizer,) = trainer.optimizers
        for group, new in zip(optimizer.param_groups, fresh_optimizer.param_groups, strict=True):
            group.update({k: v for k, v in new.items() if k != "params"})
        for config in trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR) and isinstance(
                fresh_scheduler, torch.optim.lr_scheduler.LambdaLR
            ):
                scheduler.lr_lambdas = fresh_scheduler.lr_lambdas
                scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
                apply_schedule(optimizer, scheduler)
        self.applied = [group["lr"] for group in optimizer.param_groups]
        if self.changes:
            log.warning(
                "resume=force at step %d: %s; learning rate now %s",
                trainer.global_step,
                "; ".join(self.changes),
                ", ".join(f"{lr:.3g}" for lr in sorted(set(self.applied))),
            )


class LearningRateLog(L.Callback):
    """`optim/lr` in the trackers (`logger=`) at every optimiser step: the rate that step applies, read from the
    optimiser itself (so what is logged is what trained, after warm-up, schedule and any resume). Logged at step
    s (Lightning's global_step before the update) is the rate of the update from s to s + 1, i.e.
    `optim.lr * lr_lambda(s, ...)` (distil/training/optim.py). Every step, whatever `trainer.log_every_n_steps`;
    groups with different rates (a custom optimiser setup) are logged as `optim/lr/group<i>`."""

    def __init__(self) -> None:
        self._logged_step = -1

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int
    ) -> None:
        step = int(trainer.global_step)
        if step == self._logged_step or not trainer.optimizers:  # accumulation: one record per optimiser step
            return
        self._logged_step = step
        rates = [float(group["lr"]) for group in trainer.optimizers[0].param_groups]
        if len(set(rates)) == 1:
            metrics = {"optim/lr": rates[0]}
        else:
            metrics = {f"optim/lr/group{i}": lr for i, lr in enumerate(rates)}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)


class ModelOptions(L.Callback):
    """`model.attn_implementation` and `model.compile` (conf/train.yaml), applied to the loaded models when
    training starts, in every training process.

    The attention kernel is switched with transformers' `set_attn_implementation` (sdpa, eager,
    flash_attention_2, ...; an implementation that cannot run here fails at start-up with transformers' own
    message). `compile` calls `torch.compile` in place (`nn.Module.compile`) on the encoder and decoder of the
    student and, when loaded, the teacher: the modules the distiller calls. In-place compilation keeps the
    parameter names, so checkpoints and exports are unchanged."""

    def __init__(
        self,
        attn_implementation: str | None = None,
        compile: bool = False,
        compile_options: dict | None = None,
    ):
        self.attn_implementation = attn_implementation
        self.compile = bool(compile)
        self.compile_options = dict(compile_options or {})
        self.compiled: list[str] = []  # what was compiled, for the log and tests

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        models = {
            name: model
            for name in ("student", "teacher")
            if (model := getattr(pl_module, name, None)) is not None
        }
        if self.attn_implementation:
            for model in models.values():
                model.set_attn_implementation(str(self.attn_implementation))
        if self.compile and not self.compiled:
            for name, model in models.items():
                for part in ("encoder", "decoder"):
                    getattr(model.model, part).compile(**self.compile_options)
                    self.compiled.append(f"{name}.{part}")
        if self.attn_implementation or self.compiled:
            import logging

            logging.getLogger(__name__).info(
                "attention: %s; compiled: %s",
                self.attn_implementation or "as loaded",
                ", ".join(self.compiled) or "nothing",
            )


class SampleRecord(L.Callback):
    """With `record_samples=true`: `<out_dir>/samples/rank-<r>.jsonl`, one line per training batch of process r:
    `{"step", "epoch", "batch", "ids"}` (optimiser step, data epoch, global batch index, sample ids).

    What a run (and each DDP rank) trained on, in order: to audit a data mixture or a resume, or to find the
    samples behind a loss spike. Every process appends to its own file; a resumed run appends too, so a step
    recorded twice was trained again after the resume (its first record came after the last checkpoint)."""

    def __init__(self, dir: str | Path, enabled: bool = True):
        self.dir, self.enabled = Path(dir), bool(enabled)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int
    ) -> None:
        if not self.enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        row = {
            "step": int(trainer.global_step),
            "epoch": batch.get("epoch"),
            "batch": batch.get("batch_index"),
            "ids": list(batch["sample_ids"]),
        }
        with open(self.dir / f"rank-{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
