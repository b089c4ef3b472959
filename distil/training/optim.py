"""Optimiser and learning-rate schedule for distillation (Distil-Whisper recipe).

AdamW with no weight decay on biases and LayerNorm weights, and a warm-up followed by either a constant
or a linearly decaying learning rate (the reference's `constant_with_warmup` / `linear`).

Steps are optimiser steps everywhere (Lightning's `global_step`, `trainer.max_steps`, `optim.warmup_steps`,
the schedule's `total_steps`): one step consumes `effective_batch_size` samples, whatever the number of
processes and the gradient accumulation, so the schedule needs no rescaling when either changes.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from distil.utils.errors import ConfigError

SCHEDULES = ("constant", "linear")


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


def lr_lambda(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at optimiser step `step` (0-based)."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"optim.schedule must be one of {SCHEDULES}, got {schedule!r}")
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    remaining = max(1, total_steps - warmup_steps)
    return max(0.0, (total_steps - step) / remaining)


def build_scheduler(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, schedule: str = "constant"
) -> torch.optim.lr_scheduler.LambdaLR:
    if schedule not in SCHEDULES:
        raise ConfigError(f"optim.schedule must be one of {SCHEDULES}, got {schedule!r}")
    if schedule == "linear" and total_steps <= 0:
        raise ConfigError("the linear schedule decays to 0 at trainer.max_steps; set trainer.max_steps > 0")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_lambda(step, warmup_steps, total_steps, schedule)
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
