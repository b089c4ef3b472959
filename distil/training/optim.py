"""Optimiser and learning-rate schedule for distillation (Distil-Whisper recipe).

AdamW with no weight decay on biases and LayerNorm weights, and a linear warm-up followed by one of the
schedules in `SCHEDULES` (`optim.schedule`): constant, linear decay (the reference's `constant_with_warmup` /
`linear`), cosine decay, or warmup-stable-decay. Each schedule is one pure function of the step below, the
only place its formula is written; `lr_lambda` adds the warm-up and `build_scheduler` wraps it in a LambdaLR.

Steps are optimiser steps everywhere (Lightning's `global_step`, `trainer.max_steps`, `optim.warmup_steps`,
the schedule's `total_steps`): one step consumes `effective_batch_size` samples, whatever the number of
processes and the gradient accumulation, so the schedule needs no rescaling when either changes.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from distil.utils.errors import ConfigError


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups over the trainable parameters: decayed weights, and biases/norm weights without decay.

    Decay is skipped for every bias and for the parameters of normalisation layers (Whisper uses
    LayerNorm): shrinking them towards zero only fights the normalisation.
    """
    no_decay_ids = set()
    for module in model.modules():
        if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.RMSNorm)):
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    decay, no_decay, seen = [], [], set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:  # tied weights are listed once
            continue
        seen.add(id(param))
        if name.endswith("bias") or id(param) in no_decay_ids:
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def effective_batch_size(
    batch_size: int, devices: int, num_nodes: int = 1, accumulate_grad_batches: int = 1
) -> int:
    """Samples per optimiser step: `data.batch_size` per process x devices per node x nodes x accumulation.

    Under DDP each process draws its own batches (distil.datamodules.mixture.TrainStream) and gradients are
    averaged over processes, and Lightning steps the optimiser once per `accumulate_grad_batches` batches.
    """
    for name, value in (
        ("data.batch_size", batch_size),
        ("trainer.devices", devices),
        ("trainer.num_nodes", num_nodes),
        ("trainer.accumulate_grad_batches", accumulate_grad_batches),
    ):
        if int(value) < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return int(batch_size) * int(devices) * int(num_nodes) * int(accumulate_grad_batches)


def _progress(step: int, start: int, end: int) -> float:
    """How far `step` is from `start` (0) to `end` (1), clamped to [0, 1]."""
    return min(1.0, max(0.0, (step - start) / max(1, end - start)))


def _floored(shape: float, min_lr_ratio: float) -> float:
    """A decay `shape` going from 1 to 0, rescaled to go from 1 to `min_lr_ratio`."""
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


# The schedules after warm-up: the multiplier of `optim.lr` at optimiser step `step` (0-based), given
# `warmup_steps`, `total_steps` (trainer.max_steps), `min_lr_ratio` (where decays end, x optim.lr) and
# `decay_fraction` (wsd's share of total_steps). Each is called only for step >= warmup_steps.


def constant(
    step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float, decay_fraction: float
) -> float:
    """1: the peak rate throughout."""
    return 1.0


def linear(
    step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float, decay_fraction: float
) -> float:
    """Linear from 1 at the end of warm-up to `min_lr_ratio` at `total_steps`."""
    return _floored(1.0 - _progress(step, warmup_steps, total_steps), min_lr_ratio)


def cosine(
    step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float, decay_fraction: float
) -> float:
    """Half a cosine from 1 at the end of warm-up to `min_lr_ratio` at `total_steps`:
    min + (1 - min) * (1 + cos(pi * progress)) / 2."""
    return _floored(
        0.5 * (1.0 + math.cos(math.pi * _progress(step, warmup_steps, total_steps))), min_lr_ratio
    )


def wsd_decay_start(warmup_steps: int, total_steps: int, decay_fraction: float) -> int:
    """wsd's first decaying step: the last `round(decay_fraction * total_steps)` steps decay, never warm-up's."""
    return max(warmup_steps, total_steps - round(decay_fraction * total_steps))


def wsd(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float, decay_fraction: float) -> float:
    """Warmup-stable-decay: 1 (stable) until `wsd_decay_start`, then linear to `min_lr_ratio` at `total_steps`.
    decay_fraction=0 is `constant`; decay_fraction=1 is `linear`."""
    start = wsd_decay_start(warmup_steps, total_steps, decay_fraction)
    return 1.0 if step < start else _floored(1.0 - _progress(step, start, total_steps), min_lr_ratio)


SCHEDULES: dict[str, Callable[..., float]] = {
    "constant": constant,
    "linear": linear,
    "cosine": cosine,
    "wsd": wsd,
}
DECAYING = ("linear", "cosine", "wsd")  # they need trainer.max_steps


def _check_schedule(schedule: str) -> None:
    if schedule not in SCHEDULES:
        raise ConfigError(f"optim.schedule must be one of {list(SCHEDULES)}, got {schedule!r}")


def lr_lambda(
    step: int,
    warmup_steps: int,
    total_steps: int,
    schedule: str,
    min_lr_ratio: float = 0.0,
    decay_fraction: float = 0.1,
) -> float:
    """Multiplier of the peak learning rate at optimiser step `step` (0-based): linear warm-up from
    1/warmup_steps to 1 over the first `warmup_steps` steps, then the schedule's."""
    _check_schedule(schedule)
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    return SCHEDULES[schedule](step, warmup_steps, total_steps, min_lr_ratio, decay_fraction)


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    total_steps: int,
    schedule: str = "constant",
    min_lr_ratio: float = 0.0,
    decay_fraction: float = 0.1,
) -> torch.optim.lr_scheduler.LambdaLR:
    """`lr_lambda` as a LambdaLR, stepped every optimiser step.

    The multiplier is a closure on purpose: LambdaLR's checkpoint then holds only the step and base rates, so a
    resumed run computes its rates from this run's config (e.g. a longer trainer.max_steps), never from the
    settings a callable object would have carried in the checkpoint."""
    _check_schedule(schedule)
    if schedule in DECAYING and total_steps <= 0:
        raise ConfigError(
            f"the {schedule} schedule decays to its end at trainer.max_steps; set trainer.max_steps > 0"
        )
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_lambda(step, warmup_steps, total_steps, schedule, min_lr_ratio, decay_fraction),
    )


def build_optimizers(
    optimizer: Callable[..., torch.optim.Optimizer],
    scheduler: Callable[[torch.optim.Optimizer], Any] | None,
    model: nn.Module,
    fused: bool,
):
    """What `configure_optimizers` returns: `optimizer` (a partial) over `param_groups(model)`, fused when asked
    and the optimiser takes it, and `scheduler(optimizer)` stepped per optimiser step."""
    kwargs = {}
    if "fused" in inspect.signature(getattr(optimizer, "func", optimizer)).parameters:
        kwargs["fused"] = fused or None
    weight_decay = float(getattr(optimizer, "keywords", {}).get("weight_decay", 0.0))
    built = optimizer(param_groups(model, weight_decay), **kwargs)
    if scheduler is None:
        return built
    return {"optimizer": built, "lr_scheduler": {"scheduler": scheduler(built), "interval": "step"}}


def apply_schedule(optimizer: torch.optim.Optimizer, scheduler: Any) -> list[float]:
    """Set each parameter group's rate to what `scheduler` (a LambdaLR) gives at its current step, from the
    multipliers of this run's config; returns the rates. For a resume: Lightning restores the rates the old
    run last computed, which differ from this config's formula when e.g. trainer.max_steps changed."""
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        return [group["lr"] for group in optimizer.param_groups]
    for group, base, factor in zip(
        optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True
    ):
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    return list(scheduler._last_lr)
