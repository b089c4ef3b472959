"""Where distil keeps its caches: one root, `$DISTIL_HOME` (default `~/.cache/distil`)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = REPO_ROOT / "conf"


def distil_home() -> Path:
    return Path(os.environ.get("DISTIL_HOME", "~/.cache/distil")).expanduser()


def models_dir() -> Path:
    return distil_home() / "models"


@contextmanager
def atomic_directory(out_dir: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `out_dir` to write into; on success it replaces `out_dir`.

    A writer that fails or is killed leaves only a hidden `.<name>.tmp-*` sibling (removed on failure),
    never a half-written `out_dir` that a later stage would take as complete.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
