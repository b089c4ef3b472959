"""Progress of long Lightning loops (training, validation, labelling) as log lines.

Lightning's bar draws on the terminal only; a run's log file (Hydra's `<job>.log`, the pipeline's
`pipeline.log`) should say as much: how far a stage has got, how fast it goes and when it will end, so that a
user tailing the log of a job on a cluster, or reading it after a crash, sees where it was.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping

import lightning as L

log = logging.getLogger("distil.progress")


def progress_line(
    what: str,
    done: int,
    total: float | None,
    elapsed_s: float,
    extra: Mapping[str, float] | None = None,
    done_before: int = 0,
) -> str:
    """`what: 50/200 (25%), 2.90 s each, 7.3 min left, loss 0.53`; without a known total, no share or ETA.
    `done_before` items were done before `elapsed_s` started (a resumed run): they do not count in the rate."""
    parts = [f"{what}: {done}" + (f"/{int(total)} ({100 * done / total:.0f}%)" if _known(total) else "")]
    if done > done_before:
        per_item = elapsed_s / (done - done_before)
        parts.append(f"{per_item:.2f} s each")
        if _known(total):
            parts.append(f"{max(total - done, 0) * per_item / 60:.1f} min left")
    parts.extend(f"{name} {value:.4g}" for name, value in (extra or {}).items())
    return ", ".join(parts)


def _known(total: float | None) -> bool:
    return total is not None and math.isfinite(total) and total > 0


class ProgressLog(L.Callback):
    """Log the progress of training (optimiser steps, the latest loss terms), of each validation and of
    prediction (labelling batches) every `every_s` seconds and at the end, on the global-zero process."""

    def __init__(
        self,
        every_s: float = 60.0,
        metrics: tuple[str, ...] = ("train/loss",),
        predict_name: str = "predicting",
    ):
        self.every_s = float(every_s)
        self.predict_name = predict_name
        self.metrics = tuple(metrics)
        self._started: dict[str, float] = {}
        self._first_step = 0  # the step training (re)started from
        self._last_logged = 0.0

    def _start(self, loop: str) -> None:
        self._started[loop] = self._last_logged = time.perf_counter()

    def _report(self, trainer: L.Trainer, loop: str, done: int, total: float | None, force: bool = False):
        now = time.perf_counter()
        if not trainer.is_global_zero or (not force and now - self._last_logged < self.every_s):
            return
        self._last_logged = now
        metrics = trainer.callback_metrics
        extra = {m: float(metrics[m]) for m in self.metrics if loop == "training" and m in metrics}
        before = self._first_step if loop == "training" else 0
        log.info(progress_line(loop, done, total, now - self._started.get(loop, now), extra, before))

    def on_train_start(self, trainer, pl_module):
        self._start("training")
        self._first_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        total = trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches
        self._report(trainer, "training", trainer.global_step, total, force=trainer.global_step == total)

    def on_validation_start(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self._started["validation"] = time.perf_counter()

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        took = time.perf_counter() - self._started.get("validation", time.perf_counter())
        scores = {  # the weighted and macro WER over the sets, and each set's
            k: float(v)
            for k, v in trainer.callback_metrics.items()
            if k.startswith("val/") and k.split("/")[-1] in ("wer", "wer_weighted", "wer_macro")
        }
        shown = ", ".join(f"{k} {v:.2f}" for k, v in sorted(scores.items()))
        log.info(
            "validation at step %d took %.0f s%s", trainer.global_step, took, f": {shown}" if shown else ""
        )

    def on_predict_start(self, trainer, pl_module):
        self._start(self.predict_name)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        total = trainer.num_predict_batches[dataloader_idx] if trainer.num_predict_batches else None
        self._report(trainer, self.predict_name, batch_idx + 1, total, force=total == batch_idx + 1)
