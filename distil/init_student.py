"""Stage 2: build the student from the teacher (`python -m distil.init_student teacher=tiny_en student=2dec`).

The student directory lands at `${paths.students}/${teacher.name}-${student.name}` (see
conf/init_student.yaml), where `student.name` is derived from the layer settings, so
`student.decoder_layers=4` writes `.../tiny_en-dec4` and never overwrites the 2-layer student.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from distil.config.choices import known_choices
from distil.config.schema import validate
from distil.utils.errors import one_line_errors
from distil.utils.io import ensure_writable_parent, writable_home
from distil.utils.paths import CONF_DIR
from distil.utils.runinfo import write_run_info
from distil.whisper.student import init_student, is_complete_student


def init_student_from_config(cfg: DictConfig) -> Path:
    """Resolve the teacher, then build (or reuse) the student described by `cfg.student`."""
    from distil.whisper.models import resolve_model

    if not is_complete_student(cfg.out_dir):  # to be built: a read-only destination before the teacher loads
        ensure_writable_parent(cfg.out_dir, "out_dir")
    teacher_dir = resolve_model(cfg.teacher, models_root=cfg.paths.models)
    return init_student(
        teacher_dir,
        cfg.out_dir,
        encoder_layers=cfg.student.encoder_layers,
        decoder_layers=cfg.student.decoder_layers,
        overwrite=cfg.get("overwrite", False),
    )


def run_command(cfg: DictConfig) -> dict[str, str]:
    """What `distil-init-student` does with its composed config (also `distil.run("init_student", ...)`):
    {"student_dir": ...}."""
    validate(cfg, "init_student")  # every key's type and range, before any model or data loads
    write_run_info(cfg)
    return {"student_dir": str(init_student_from_config(cfg))}


@writable_home
@known_choices  # an unknown option of a config group (model=nope): one line before Hydra composes
@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="init_student")
@one_line_errors
def main(cfg: DictConfig) -> None:
    print(f"student written to {run_command(cfg)['student_dir']}")


if __name__ == "__main__":
    main()
