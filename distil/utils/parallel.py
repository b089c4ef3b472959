"""How many processes and torch threads a CPU or GPU stage runs with (see `resolve_parallelism`)."""

from __future__ import annotations

import logging
import os

import torch
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)


def usable_cores() -> int:
    """The cores this process may use: its CPU affinity, capped by `OMP_NUM_THREADS` when that is set (the
    usual way a shared node or a SLURM job limits a process), so `auto` never oversubscribes them."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    limit = os.environ.get("OMP_NUM_THREADS", "").strip()
    if limit.isdigit() and int(limit) > 0:
        cores = min(cores, int(limit))
    return cores


def on_cpu(accelerator: str) -> bool:
    """Whether Lightning's accelerator choice lands on the CPU."""
    if accelerator == "cpu":
        return True
    if accelerator != "auto":
        return False
    from lightning.pytorch.accelerators import CUDAAccelerator, MPSAccelerator

    return not (CUDAAccelerator.is_available() or MPSAccelerator.is_available())


def resolve_parallelism(
    devices: int | str,
    strategy: str,
    threads_per_process: int | str | None,
    cpu: bool,
    cores: int,
    work_items: int | None = None,
    fork: bool = True,
) -> tuple[int | str, str, int | None]:
    """(devices, strategy, torch threads per process) for the Trainer.

    CPU: `devices: auto` means one process per `threads_per_process` cores (`auto` threads: 1), but never more
    processes than there are shards to label (`work_items`), since each shard is labelled by one process;
    `threads_per_process: auto` then shares the cores among the processes. Several small single-threaded
    processes beat one process with many threads: Whisper's decoder runs one small matrix product per token,
    where intra-op threading mostly synchronises. Processes are forked (`ddp_fork`: no re-import, works the
    same from the CLI, scripts and tests), or spawned where fork does not exist.
    GPU: devices and strategy go to Lightning unchanged (`auto`: one process per GPU); threads are left alone
    unless given as a number.
    """
    if not cpu:
        return devices, strategy, threads_per_process if isinstance(threads_per_process, int) else None
    threads = threads_per_process if isinstance(threads_per_process, int) else None
    if devices == "auto":
        devices = max(1, cores // (threads or 1))
        if work_items is not None:
            devices = max(1, min(devices, work_items))
    devices = int(devices)
    if threads is None:
        threads = max(1, cores // devices)
    if strategy == "auto" and devices > 1:
        strategy = "ddp_fork" if fork else "ddp_spawn"
    return devices, strategy, threads


class TorchThreads(Callback):
    """Sets torch's intra-op threads in each process that runs the stage (each rank), restored afterwards."""

    def __init__(self, threads: int):
        self.threads, self.saved = threads, None

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.saved = torch.get_num_threads()
        torch.set_num_threads(self.threads)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self.saved is not None:
            torch.set_num_threads(self.saved)
