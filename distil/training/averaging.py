"""Averages of the student's weights, exported beside `best` and `last` (issue 35, item 4).

- `checkpoint.average_last=N` (`CheckpointAverage`): the trained weights at each save of `last.ckpt` (every
  `checkpoint.every_n_steps` optimiser steps, and the run's final step) are also written, weights only, to
  `checkpoints/averaged/step-<step>.pt`; the last N are kept, and at the end their mean is exported to
  `<out_dir>/averaged`.
- `ema.decay=d` (`EMA`): an exponential moving average of the trained weights, updated after every optimiser
  step with torch's EMA rule (`torch.optim.swa_utils.get_ema_multi_avg_fn`, as Lightning's and torch's
  `AveragedModel`): after the first step it is that step's weights; after step k it is
  `d * ema + (1 - d) * weights_k`. It lives in the callback's state (so in every checkpoint) and is exported to
  `<out_dir>/ema`.

Lightning's `WeightAveraging` callback is not used: it copies the whole LightningModule (the teacher too),
evaluates and checkpoints the average in place of the trained weights (so `best` and `last` would change meaning),
and copies it into the model when training ends. Here the trained weights stay what they are everywhere; only
the student's trainable parameters are averaged (frozen ones are the same at every step), keyed as in the
checkpoint's `state_dict` (`student.model.decoder...`), each tied parameter once.

Both resume exactly: the EMA and the list of saved steps are in `last.ckpt`, so a run stopped and resumed
averages what the uninterrupted run does. The final step's snapshot of a run that is later extended (a larger
`trainer.max_steps`) is not one of the cadence's saves and is left out of the continued run's average, as a
SIGTERM's save of `last.ckpt` is.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch

from distil.utils.io import atomic_file

log = logging.getLogger(__name__)

STUDENT_PREFIX = "student."


def trained_weights(pl_module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The student's trainable parameters keyed as in the module's `state_dict`, each shared tensor once."""
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for key, value in pl_module.state_dict(keep_vars=True).items():
        if not key.startswith(STUDENT_PREFIX) or not isinstance(value, torch.nn.Parameter):
            continue
        if not value.requires_grad or id(value) in seen:
            continue
        seen.add(id(value))
        out[key] = value.detach()
    return out


def average_weights(snapshots: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The element-wise mean of the snapshots (summed in float64, returned in each tensor's dtype)."""
    if not snapshots:
        raise ValueError("no weights to average")
    out = {}
    for key, first in snapshots[0].items():
        total = sum(s[key].double() for s in snapshots)
        out[key] = (total / len(snapshots)).to(first.dtype)
    return out


def ema_update(
    ema: dict[str, torch.Tensor], current: dict[str, torch.Tensor], decay: float, updates: int
) -> None:
    """One EMA step in place, torch's rule: `ema = decay * ema + (1 - decay) * current` (`updates` > 0)."""
    from torch.optim.swa_utils import get_ema_multi_avg_fn

    keys = list(current)
    get_ema_multi_avg_fn(decay)([ema[k] for k in keys], [current[k] for k in keys], torch.tensor(updates))


def student_weights(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`student.*` keys as the Hugging Face model's own (the prefix removed), on the CPU."""
    return {k.removeprefix(STUDENT_PREFIX): v.detach().cpu() for k, v in weights.items()}


class EMA(L.Callback):
    """`ema.decay=d`: an exponential moving average of the student's trainable weights (see the module's doc).
    `decay=None`: off (nothing kept, nothing exported)."""

    def __init__(self, decay: float | None = None):
        self.decay = None if decay is None else float(decay)
        self.weights: dict[str, torch.Tensor] | None = None
        self.updates = 0  # optimiser steps averaged
        self.step = 0  # the global step of the last update (once per optimiser step under accumulation)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        if self.decay is None or trainer.global_step <= self.step:
            return
        current = trained_weights(pl_module)
        if self.weights is None:  # the first step: the EMA starts as that step's weights
            self.weights = {k: v.clone() for k, v in current.items()}
        else:
            self.weights = {k: v.to(current[k].device) for k, v in self.weights.items()}
            ema_update(self.weights, current, self.decay, self.updates)
        self.updates += 1
        self.step = int(trainer.global_step)

    def state_dict(self) -> dict:
        if self.decay is None:
            return {}
        return {"decay": self.decay, "updates": self.updates, "step": self.step, "weights": self.weights}

    def load_state_dict(self, state_dict: dict) -> None:
        if self.decay is None or not state_dict:
            return
        if state_dict.get("decay") != self.decay:
            log.warning(
                "ema.decay %s -> %s: the average continues with the new decay",
                state_dict.get("decay"),
                self.decay,
            )
        self.updates, self.step, self.weights = (
            state_dict["updates"],
            state_dict["step"],
            state_dict["weights"],
        )


class CheckpointAverage(L.Callback):
    """`checkpoint.average_last=N`: the trainable weights of the last N saves (every `every_n_steps` optimiser
    steps, and the final step) kept in `dir` as `step-<step>.pt`, for `averaged_weights` to average at the end.
    `keep=None`: off. Only rank 0 writes; every rank keeps the same list (in each checkpoint)."""

    def __init__(self, dir: str | Path, keep: int | None = None, every_n_steps: int = 100):
        self.dir, self.keep, self.every_n_steps = Path(dir), keep, int(every_n_steps)
        # the cadence's saves, oldest first: at most `keep`, `keep - 1` beside `final`
        self.saved: list[int] = []
        self.final: int | None = None  # the final step, when not one of the cadence's

    def path(self, step: int) -> Path:
        return self.dir / f"step-{step}.pt"

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After a resume restored the list: files not on it (a run started over here, the final step of the run
        this one extends, a save the checkpoint did not record) are removed, so the directory is the list."""
        self.final = None
        if self.keep is None or not trainer.is_global_zero or not self.dir.is_dir():
            return
        for path in self.dir.glob("step-*.pt"):
            if path.name not in {self.path(s).name for s in self.saved}:
                path.unlink()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        step = int(trainer.global_step)
        if self.keep is None or step == 0 or step % self.every_n_steps or step in self.saved:
            return
        self._write(trainer, pl_module, step)
        self._trim(trainer, [*self.saved, step], self.keep)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = int(trainer.global_step)
        if self.keep is None or step == 0 or step in self.saved:
            return
        self._write(trainer, pl_module, step)
        self.final = step
        self._trim(trainer, self.saved, self.keep - 1)  # the final step takes the oldest save's place

    def _trim(self, trainer: L.Trainer, saved: list[int], keep: int) -> None:
        """Keep the last `keep` of `saved` (and their files)."""
        cut = max(0, len(saved) - keep)
        dropped, self.saved = saved[:cut], saved[cut:]
        for old in dropped:
            if trainer.is_global_zero:
                self.path(old).unlink(missing_ok=True)

    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        if trainer.is_global_zero:
            with atomic_file(self.path(step)) as tmp:
                torch.save(student_weights(trained_weights(pl_module)), tmp)

    def averaged_steps(self) -> list[int]:
        """The steps averaged: the last `keep` saves, the final step counting as one."""
        return self.saved + ([self.final] if self.final is not None else [])

    def state_dict(self) -> dict:
        return {} if self.keep is None else {"saved": list(self.saved), "final": self.final}

    def load_state_dict(self, state_dict: dict) -> None:
        if self.keep is not None and state_dict:
            # (a resume=force with a smaller average_last keeps the newest; files off the list go at train start)
            self.saved, self.final = list(state_dict["saved"]), state_dict.get("final")
            keep = self.keep - (self.final is not None)
            self.saved = self.saved[max(0, len(self.saved) - keep) :]
