"""Every numeric leaf of a metrics tree as a TensorBoard scalar."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def numeric_leaves(tree: Any, prefix: str = "") -> dict[str, float]:
    """Flatten nested metrics into `a/b/c -> number` (booleans and non-finite values left out)."""
    out: dict[str, float] = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            out.update(numeric_leaves(value, f"{prefix}/{key}" if prefix else str(key)))
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool) and math.isfinite(tree):
        out[prefix] = float(tree)
    return out


def write_tensorboard(out_dir: Path, metrics: dict) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"))
    for tag, value in numeric_leaves({k: v for k, v in metrics.items() if k != "model"}).items():
        writer.add_scalar(tag, value, 0)
    writer.close()
