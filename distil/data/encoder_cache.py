"""On-disk cache of encoder outputs for frozen-encoder, multi-epoch distillation.

With a frozen encoder that is an exact copy of the teacher's, the encoder output of a clip never changes,
and it is the most expensive part of a training step once labels are padded to the longest (not to
448). The first epoch computes it and stores it here (fp16, one `.npy` file per sample); later epochs
read it in the DataLoader workers and skip audio decoding, feature extraction and the encoder.

Keys are `<dataset>/<split>/<sample id>/<audio digest>` (`cache_key`) under a directory named by the encoder's
fingerprint (teacher fingerprint + feature settings), so a different teacher or feature extractor never reads
stale states, and neither does a corpus rebuilt with other audio under the same ids. Pseudo-labelling fills
the cache as it encodes (`encoder_cache.enabled` in conf/pseudo_label.yaml), so training's first epoch
can skip the encoder too.
Files are written to a temporary name and renamed: a file that exists is complete, and concurrent
writers (DDP ranks) cannot corrupt each other. Only valid without audio augmentation (the audio of a
sample must be the same every epoch).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch


def cache_key(source: str, sample_id: str, audio: Mapping[str, Any] | None) -> str:
    """The cache key of one sample: `<dataset>/<split>/<sample id>/<digest of its audio>`.

    `audio` is the undecoded column (`{"bytes", "path"}`): the digest is taken of the bytes, so the key names
    the sound itself and not only where it sits in a corpus. When only a path is stored, of the path with the
    file's size and modification time (a file replaced under the same name is another key).
    """
    audio = audio or {}
    content = audio.get("bytes")
    if not content:
        path = str(audio.get("path") or "")
        if path and os.path.isfile(path):
            stat = os.stat(path)
            path = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
        content = path.encode()
    return f"{source}/{sample_id}/{hashlib.blake2b(content, digest_size=8).hexdigest()}"


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
