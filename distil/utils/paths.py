"""Where distil finds its configs and keeps its artifacts.

The configs ship inside the package (`distil/conf` is the repository's top-level `conf/`, linked into the
package and copied into the wheel), so console scripts find them whether distil is installed editable, from a
wheel, or run from a checkout. Artifacts live under one root, `paths.root` in `conf/paths/default.yaml`.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from pathlib import Path

from omegaconf import OmegaConf

PACKAGE_DIR = Path(__file__).resolve().parents[1]
CONF_DIR = PACKAGE_DIR / "conf"
# The source checkout (for the git revision in run_info.json); None when distil runs from a wheel.
REPO_ROOT: Path | None = PACKAGE_DIR.parent if (PACKAGE_DIR.parent / ".git").exists() else None

# Data shipped with the package (sentence banks, the real-speech test set): `${resources:real_speech}` in configs.
RESOURCES_DIR = PACKAGE_DIR / "data" / "resources"
OmegaConf.register_new_resolver("resources", lambda name: str(RESOURCES_DIR / name), replace=True)

MAX_DIRNAME = 200  # file systems allow 255 bytes

# One id per process, so two runs started in the same second (a SLURM array, `shard.index` jobs) never share a
# run directory: `${now:...}-${run_id:}` in conf/hydra/default.yaml. Constant within a process, so every read
# of the run directory agrees.
RUN_ID = f"{os.getpid():x}{secrets.token_hex(2)}"
# use_cache: Hydra copies resolver caches into sweep jobs (as for `now`), so a job in another process (submitit)
# resolves the sweep directory its launcher created.
OmegaConf.register_new_resolver("run_id", lambda: RUN_ID, replace=True, use_cache=True)


def safe_dirname(text: str) -> str:
    """`text` (e.g. Hydra's `job.override_dirname`) as one directory name: no separators, at most 200 chars.

    A path value (`data.datasets.0.path=/long/path/to/corpus`) is shortened to its last part plus a hash of the
    whole path, so the overrides after it in the name stay readable; a name still too long keeps a readable
    prefix plus a hash of the whole text. Either way different overrides give different names.
    """
    items = re.split(r",(?=[A-Za-z_+~][\w.@/+~-]*=)", text)  # `key=value` items (values may hold commas)
    short = []
    for item in items:
        key, sep, value = item.partition("=")
        if sep and "/" in value and len(value) > 24:
            tail = Path(value.strip("'\"").rstrip("/")).name
            value = f"{tail}-{hashlib.sha1(value.encode()).hexdigest()[:8]}"
        short.append(f"{key}{sep}{value}")
    name = re.sub(r"[^A-Za-z0-9._=,+-]", "_", ",".join(short))
    if len(name) > MAX_DIRNAME:
        name = name[: MAX_DIRNAME - 10] + "-" + hashlib.sha1(text.encode()).hexdigest()[:8]
    return name


def default_paths():
    """`conf/paths/default.yaml` resolved (its `${oc.env:DISTIL_HOME,...}` default is the only copy of it)."""
    from omegaconf import OmegaConf

    return OmegaConf.create({"paths": OmegaConf.load(CONF_DIR / "paths" / "default.yaml")}).paths


def distil_home() -> Path:
    return Path(default_paths().root).expanduser()


def models_dir() -> Path:
    return Path(default_paths().models).expanduser()
