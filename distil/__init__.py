"""distil: Distil-Whisper style knowledge distillation of Whisper models."""

__version__ = "0.1.0"

# Registers the config resolvers for every entry point, launcher worker and test: `${student_name:...}` and
# the launcher sizing ones (`${slurm_tasks:...}`, `${slurm_gpus:...}`, conf/hydra/launcher/*.yaml).
from distil.utils import launch as _launch  # noqa: E402,F401
from distil.whisper import student as _student  # noqa: E402,F401
