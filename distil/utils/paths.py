"""Where distil keeps its caches: one root, `$DISTIL_HOME` (default `~/.cache/distil`)."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = REPO_ROOT / "conf"


def distil_home() -> Path:
    return Path(os.environ.get("DISTIL_HOME", "~/.cache/distil")).expanduser()


def models_dir() -> Path:
    return distil_home() / "models"
