"""On-disk cache of encoder outputs for frozen-encoder, multi-epoch distillation.

With a frozen encoder that is an exact copy of the teacher's, the encoder output of a clip never changes,
and it is the most expensive part of a training step once labels are padded to the longest (not to
448). The first epoch computes it and stores it here (fp16, one `.npy` file per sample); later epochs
read it in the DataLoader workers and skip audio decoding, feature extraction and the encoder.

Keys are `<dataset>/<split>/<sample id>` under a directory named by the encoder's fingerprint (teacher
fingerprint + feature settings), so a different teacher or feature extractor never reads stale states.
Files are written to a temporary name and renamed: a file that exists is complete, and concurrent
writers (DDP ranks) cannot corrupt each other. Only valid without audio augmentation (the audio of a
sample must be the same every epoch).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch


class EncoderCache:
    def __init__(self, root: str | Path, fingerprint: str):
        if not fingerprint:
            raise ValueError("EncoderCache needs a non-empty fingerprint (teacher/encoder identity)")
        self.root = Path(root)
        self.fingerprint = fingerprint
        self.dir = self.root / fingerprint

    def path(self, key: str) -> Path:
        digest = hashlib.blake2b(key.encode(), digest_size=16).hexdigest()
        return self.dir / digest[:2] / f"{digest}.npy"

    def has(self, key: str) -> bool:
        return self.path(key).is_file()

    def has_all(self, keys: Sequence[str]) -> bool:
        return all(self.has(k) for k in keys)

    def load(self, keys: Sequence[str]) -> np.ndarray | None:
        """Stacked fp16 states `[batch, frames, width]` for `keys`, or None if any is missing."""
        arrays = []
        for key in keys:
            p = self.path(key)
            try:
                arrays.append(np.load(p))
            except (FileNotFoundError, ValueError, EOFError):  # missing, or torn by a crash mid-write
                return None
        return np.stack(arrays) if arrays else None

    def save(self, keys: Sequence[str], states: torch.Tensor) -> int:
        """Store one `[frames, width]` state per key (fp16); existing entries are kept. Returns how many were written."""
        if states.shape[0] != len(keys):
            raise ValueError(f"{len(keys)} keys for {states.shape[0]} encoder states")
        data = states.detach().to("cpu", torch.float16).numpy()
        written = 0
        for key, arr in zip(keys, data, strict=True):
            p = self.path(key)
            if p.is_file():
                continue
            p.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npy", dir=p.parent)
            try:
                with os.fdopen(fd, "wb") as fh:
                    np.save(fh, arr)
                os.replace(tmp, p)
                written += 1
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        return written

    def __len__(self) -> int:
        return sum(1 for _ in self.dir.glob("*/*.npy")) if self.dir.is_dir() else 0


def cache_fingerprint(teacher_fingerprint: str, feature_extractor) -> str:
    """Identity of the encoder inputs and weights: the teacher plus the log-mel settings."""
    fe = feature_extractor
    settings = (
        f"{getattr(fe, 'feature_size', '')}:{getattr(fe, 'sampling_rate', '')}:{getattr(fe, 'n_samples', '')}"
    )
    h = hashlib.sha256(f"{teacher_fingerprint}|{settings}".encode()).hexdigest()[:16]
    return h
