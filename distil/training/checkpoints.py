"""Training checkpoints and exports: resume paths, the final `last.ckpt`, student weights as HF directories."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import lightning as L
import torch

import distil.whisper.student  # noqa: F401  (registers the ${student_name:...} resolver used by conf/student)
from distil.utils.io import atomic_directory

log = logging.getLogger(__name__)


CHECKPOINT_DIR = "checkpoints"


EXPORTS = ("best", "last")


def resolve_ckpt_path(ckpt_path: str | None, out_dir: Path) -> str | None:
    """`last`: resume from `<out_dir>/checkpoints/last.ckpt` when it exists, else start; a path: that file."""
    if ckpt_path in (None, "", "none", "null"):
        return None
    if ckpt_path == "last":
        last = out_dir / CHECKPOINT_DIR / "last.ckpt"
        return str(last) if last.is_file() else None
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(
            f"ckpt_path={ckpt_path} does not exist (use ckpt_path=last to resume automatically)"
        )
    return str(ckpt_path)


def export_student(state: dict[str, torch.Tensor], base_dir: str, out: Path) -> Path:
    """Write a complete HF directory (weights, config, generation config, processor) atomically."""
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    model = WhisperForConditionalGeneration.from_pretrained(base_dir, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "proj_out.weight"]
    if missing or unexpected:
        raise RuntimeError(
            f"exported weights do not fit {base_dir}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.tie_weights()
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        WhisperProcessor.from_pretrained(base_dir).save_pretrained(tmp)
        info = Path(base_dir) / "distil_student.json"
        if info.is_file():
            shutil.copy(info, tmp / info.name)
    return out


def _student_state(checkpoint: dict) -> dict[str, torch.Tensor]:
    return {k[len("student.") :]: v for k, v in checkpoint["state_dict"].items() if k.startswith("student.")}


class FinalCheckpoint(L.Callback):
    """Write last.ckpt when training ends (max_steps need not be a multiple of the checkpoint interval).

    Runs inside the training processes (also under ddp_spawn) and not after an exception, so a failed
    run leaves the last good checkpoint as it was."""

    def __init__(self, path: Path):
        self.path = path

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.save_checkpoint(self.path)
