"""distil: Distil-Whisper style knowledge distillation of Whisper models."""

__version__ = "0.1.0"

# Registers the `${student_name:...}` config resolver for every entry point, launcher worker and test.
from distil.whisper import student as _student  # noqa: E402,F401
