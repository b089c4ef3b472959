"""Record what produced a run: the resolved config and the git revision, written into its directory."""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from distil.utils.paths import REPO_ROOT


def git_revision() -> str:
    if REPO_ROOT is None:  # installed from a wheel: no checkout to ask
        return "unknown"
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def hydra_output_dir() -> Path | None:
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except (ImportError, ValueError):
        return None


def command_line(command: str, overrides: list[str] | None = None) -> str:
    """The command line that reproduces a run: `command` with `overrides` (default: this Hydra job's), quoted
    for a shell."""
    if overrides is None:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
    return shlex.join([command, *overrides])


def write_run_info(cfg: DictConfig, out_dir: str | Path | None = None) -> Path:
    """Write `config.yaml` (resolved) and `run_info.json` (git revision) into the run directory."""
    out = Path(out_dir) if out_dir is not None else hydra_output_dir() or Path.cwd()
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (out / "run_info.json").write_text(json.dumps({"git_revision": git_revision()}, indent=2) + "\n")
    return out
