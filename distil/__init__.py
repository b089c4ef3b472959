"""distil: Distil-Whisper style knowledge distillation of Whisper models."""

__version__ = "0.1.0"
