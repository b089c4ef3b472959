"""Training checkpoints and exports: resume paths, the final `last.ckpt`, student weights as HF directories."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from distil.utils.io import atomic_directory, atomic_file, reporting_full_disk
from distil.whisper.generation import Guards
from distil.whisper.loading import model_from_checkpoint
from distil.whisper.student import STUDENT_INFO_FILE

log = logging.getLogger(__name__)


CHECKPOINT_DIR = "checkpoints"


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


def export_student(
    checkpoint: str | Path, base_dir: str, out: Path, weights: dict[str, torch.Tensor] | None = None
) -> Path:
    """The student of a training checkpoint as a complete HF directory (weights, configs, processor), atomically;
    its generation_config.json carries the loop guards' thresholds (`distil.whisper.generation.Guards`).
    `weights` (HF keys, e.g. an average of the trained ones) replace the checkpoint's where given."""
    from transformers import WhisperProcessor

    model = model_from_checkpoint(checkpoint, base_dir)
    if weights:
        own = model.state_dict()
        unknown = sorted(k for k in weights if k not in own)
        if unknown:
            raise KeyError(f"weights not in the student: {unknown[:3]}")
        model.load_state_dict(weights, strict=False)
        model.tie_weights()
    Guards().write_into(model.generation_config)  # what openai-whisper and faster-whisper users decode with
    with reporting_full_disk(out), atomic_directory(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        WhisperProcessor.from_pretrained(base_dir).save_pretrained(tmp)
        info = Path(base_dir) / STUDENT_INFO_FILE
        if info.is_file():
            shutil.copy(info, tmp / info.name)
    return out


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary sibling and renamed into place (`utils.io.atomic_file`).

    Lightning's own save goes through an fsspec transaction that writes the whole file into the system temp
    directory first (a killed save leaves it there, and the move may cross file systems); here a killed save
    leaves at most a hidden `.<name>.tmp-<pid>` beside the checkpoint, removed by the next save of that file.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}")
        with reporting_full_disk(path), atomic_file(path) as tmp:
            torch.save(checkpoint, tmp)
