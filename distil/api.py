"""The Python API: `distil.run(stage, overrides)` runs a stage as its command line would and returns its result.

    import distil

    result = distil.run("evaluate", ["model=tiny_en", "eval=short", "eval.max_samples=8"])
    result["run_dir"], result["metrics"]["short_form"]["average"]

is `python -m distil.evaluate model=tiny_en eval=short eval.max_samples=8`: the same config (composed by Hydra
from conf/<stage>.yaml with the same overrides), the same checks (a bad value is one `ConfigError` line naming
the key), the same run directory (`${paths.runs}/<stage>/<time>-<run id>`, with config.yaml, run_info.json,
.hydra/ and the stage's log file) and the same outputs. The result is a dict: `run_dir` plus the stage's own
result (each stage module's `run_command`). Multirun sweeps (`-m`) and launchers stay with the command line.
"""

from __future__ import annotations

import copy
import importlib
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from distil.utils.errors import ConfigError

# The stage modules, each a command with a `run_command(cfg)` (pyproject.toml [project.scripts]).
STAGES = ("corpus", "import_model", "pseudo_label", "init_student", "train", "evaluate", "export", "pipeline")


def run(stage: str, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Run `stage` with the command-line `overrides` (`["teacher=tiny_en", "eval.max_samples=8"]`) and return
    its result: `run_dir` (the run's directory) and the stage's outputs and metrics. Bad input raises an
    `InputError` (a `ConfigError` for the config) whose message is the line the command line prints."""
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}: distil.run takes one of {', '.join(STAGES)}")
    if isinstance(overrides, str):  # one string would be split into characters
        raise ConfigError(f"overrides must be a list of strings, got the string {overrides!r}")
    flags = [o for o in overrides if str(o).startswith("-")]
    if flags:
        raise ConfigError(
            f"{flags[0]}: distil.run takes overrides only (key=value); multirun sweeps and other flags "
            f"are the command line's: python -m distil.{stage} {flags[0]} ..."
        )
    from distil.utils.io import ensure_writable_directory
    from distil.utils.paths import distil_home

    ensure_writable_directory(distil_home(), "DISTIL_HOME")  # as each command checks first (writable_home)
    command = importlib.import_module(f"distil.{stage}")
    with _hydra_job(stage, [str(o) for o in overrides]) as (cfg, run_dir):
        with _log_file(run_dir / f"{stage}.log"):
            return {"run_dir": str(run_dir), **command.run_command(cfg)}


@contextmanager
def _hydra_job(stage: str, overrides: list[str]) -> Iterator[tuple[DictConfig, Path]]:
    """The config and run directory `hydra.main` would give `python -m distil.<stage> <overrides>`, with the
    job's Hydra config set (the commands read the run directory and overrides from it) and restored after."""
    import hydra.core.utils  # noqa: F401 - registers the `now` resolver of the run directory
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import HydraException
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    from distil.utils.paths import CONF_DIR

    outer_hydra, outer_job = get_gh_backup(), HydraConfig.instance().cfg  # e.g. called from a Hydra app
    GlobalHydra.instance().clear()
    try:
        # The job name is the module's, as `python -m distil.<stage>` names it: runs/<stage>/...
        with initialize_config_dir(config_dir=str(CONF_DIR), job_name=stage, version_base=None):
            try:
                full = compose(config_name=stage, overrides=overrides, return_hydra_config=True)
            except HydraException as err:
                raise ConfigError(f"{stage}: {_one_line(err)}") from err
            HydraConfig.instance().set_config(full)  # resolves the run directory's interpolations
            run_dir = Path(str(OmegaConf.select(full, "hydra.run.dir"))).absolute()
            with read_write(full.hydra.runtime), open_dict(full.hydra.runtime):
                full.hydra.runtime.output_dir = str(run_dir)
            HydraConfig.instance().set_config(full)
            cfg = copy.deepcopy(full)  # the command's config: the composed one without its `hydra` node
            with read_write(cfg), open_dict(cfg):
                del cfg["hydra"]
            _save_hydra_files(full, cfg, run_dir)
            yield cfg, run_dir
    finally:
        HydraConfig.instance().cfg = outer_job
        restore_gh_from_backup(outer_hydra)


def _save_hydra_files(full: DictConfig, cfg: DictConfig, run_dir: Path) -> None:
    """`.hydra/{config,hydra,overrides}.yaml`, as Hydra writes them (distil.collect reads overrides.yaml)."""
    out = run_dir / str(full.hydra.output_subdir or ".hydra")
    out.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out / "config.yaml")
    OmegaConf.save(OmegaConf.masked_copy(full, "hydra"), out / "hydra.yaml")
    OmegaConf.save(full.hydra.overrides.task, out / "overrides.yaml")


@contextmanager
def _log_file(path: Path) -> Iterator[None]:
    """distil's log records also go to the run directory's `<stage>.log`, as under Hydra's job logging; the
    caller's own logging setup is left as it is."""
    logger = logging.getLogger("distil")
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    level, handlers = logger.level, [handler]
    if not logger.hasHandlers():  # the caller configured no logging: its warnings stay on stderr
        handlers.append(logging.StreamHandler())
        handlers[-1].setLevel(logging.WARNING)
    for h in handlers:
        logger.addHandler(h)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        for h in handlers:
            logger.removeHandler(h)
            h.close()
        logger.setLevel(level)


def _one_line(err: Exception) -> str:
    """Hydra's message (and the error beneath it) as one line, without the config search path it lists."""
    text = str(err).split("Config search path:")[0]
    if err.__cause__ is not None:
        text += f" ({str(err.__cause__).splitlines()[0]})"
    return " ".join(text.split())
