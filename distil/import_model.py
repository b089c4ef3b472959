"""Import a teacher once (CTranslate2 package -> Hugging Face directory) and print where it is.

python -m distil.import_model teacher=tiny_en          # or teacher=base, teacher=tiny_random
python -m distil.import_model ct2_dir=/path/to/ct2 out_dir=/path/to/hf_dir   # any CTranslate2 Whisper directory
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import hydra
from omegaconf import DictConfig

from distil.config.choices import known_choices
from distil.config.schema import validate
from distil.utils.errors import ConfigError, one_line_errors
from distil.utils.io import ensure_writable_directory, ensure_writable_parent, writable_home
from distil.utils.paths import CONF_DIR
from distil.utils.runinfo import write_run_info
from distil.whisper import ct2_import
from distil.whisper.models import resolve_model


def import_model(
    teacher: Mapping | None = None,
    ct2_dir: str | Path | None = None,
    out: str | Path | None = None,
    models_root: str | Path | None = None,
    force: bool = False,
) -> Path:
    """Import `ct2_dir` into `out` (default `<models_root>/<ct2_dir name>`) or, without `ct2_dir`, resolve `teacher`.

    Idempotent: a complete output is reused unless `force`.
    """
    if ct2_dir is not None:
        source = ct2_import.CT2Source.from_dir(ct2_dir)
        if out is None:
            if models_root is None:
                from distil.utils.paths import models_dir

                models_root = models_dir()
            out = Path(models_root).expanduser() / Path(ct2_dir).expanduser().resolve().name
        return ct2_import.import_ct2(source, out, force=force)
    if out is not None:
        raise ConfigError(
            "`out_dir` applies to `ct2_dir` imports; teachers are imported into ${paths.models}/<teacher.name>"
        )
    if teacher is None:
        raise ConfigError("nothing to import: give a teacher config (teacher=tiny_en) or ct2_dir=/path")
    return Path(resolve_model(teacher, models_root, force=force))


def run_command(cfg: DictConfig) -> dict[str, str]:
    """What `distil-import-model` does with its composed config (also `distil.run("import_model", ...)`):
    {"model_dir": the Hugging Face directory}."""
    validate(cfg, "import_model")  # every key's type and range, before any model or data loads
    if cfg.get("out_dir"):
        ensure_writable_parent(cfg.out_dir, "out_dir")
    elif cfg.get("ct2_dir") or not cfg.teacher.get("path"):  # imported into paths.models
        ensure_writable_directory(cfg.paths.models, "paths.models")
    write_run_info(cfg)
    path = import_model(
        cfg.teacher, cfg.get("ct2_dir"), cfg.get("out_dir"), cfg.paths.models, bool(cfg.get("force"))
    )
    return {"model_dir": str(path)}


@writable_home
@known_choices  # an unknown option of a config group (model=nope): one line before Hydra composes
@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="import_model")
@one_line_errors
def main(cfg: DictConfig) -> None:
    print(run_command(cfg)["model_dir"])


if __name__ == "__main__":
    main()
