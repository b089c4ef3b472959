"""distil: Distil-Whisper style knowledge distillation of Whisper models.

`distil.run(stage, overrides)` runs a stage from Python as its command line would (distil.api)."""

from collections.abc import Sequence
from typing import Any

__version__ = "0.1.0"

# Registers the config resolvers for every entry point, launcher worker and test: `${student_name:...}` and
# the launcher sizing ones (`${slurm_tasks:...}`, `${slurm_gpus:...}`, conf/hydra/launcher/*.yaml).
from distil.utils import launch as _launch  # noqa: E402,F401
from distil.whisper import student as _student  # noqa: E402,F401


def run(stage: str, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """`python -m distil.<stage> <overrides>` from Python; returns the run's result (see distil.api.run)."""
    from distil.api import run as run_stage  # here: the stages import torch, `import distil` stays cheap

    return run_stage(stage, overrides)
