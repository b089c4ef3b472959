"""The whole recipe in one command: corpus, pseudo-labelling, student initialisation, distillation, evaluation.

Each stage is composed from its own main config with the overrides its command line would take, so
`python -m distil.pipeline` and the stage-by-stage commands printed in the log do exactly the same work.
Every stage writes to deterministic paths and skips or resumes finished work, so re-running the
pipeline after an interruption continues where it stopped.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
from hydra import compose
from omegaconf import DictConfig, OmegaConf

from distil.config.choices import choice_error, known_choices
from distil.config.schema import STAGES, validate
from distil.evaluation.report import headline_table, write_report
from distil.evaluation.scoring import headline_columns, headlines, primary_metric
from distil.utils.errors import ConfigError, one_line_errors
from distil.utils.io import ensure_writable_directory, ensure_writable_parent, read_json, writable_home
from distil.utils.paths import CONF_DIR
from distil.utils.runinfo import command_line, hydra_output_dir, write_run_info

log = logging.getLogger(__name__)


def stage_overrides(cfg: DictConfig, stage: str) -> list[str]:
    """The command-line overrides of one stage: the pipeline's shared choices, then the stage's own."""
    shared = {
        "corpus": list(cfg.recipe.get("corpus") or []),
        "pseudo_label": [f"teacher={cfg.recipe.teacher}", *(cfg.recipe.get("pseudo_label") or [])],
        "init_student": [f"teacher={cfg.recipe.teacher}", f"student={cfg.recipe.student}"],
        "train": _train_choices(cfg) + list(cfg.recipe.get("train") or []),
        "evaluate": list(cfg.recipe.get("evaluate") or []),
    }[stage]
    if (
        stage == "train"
    ):  # the pipeline's sweepable training choices, forwarded as distil-train would take them
        forwarded = {"ablation": "ablation", "seed": "seed", "wer_threshold": "data.wer_threshold"}
        shared += [
            f"{key}={cfg.train[name]}" for name, key in forwarded.items() if cfg.train.get(name) is not None
        ]
    return shared + list(cfg.overrides.get(stage) or [])


def _train_choices(cfg: DictConfig) -> list[str]:
    """`experiment=...` plus the teacher/student only where they differ from the experiment's own.

    So the pipeline's training run uses the same run directory as `python -m distil.train experiment=X`
    (the directory is named after the overrides).
    """
    overrides = [f"experiment={cfg.recipe.experiment}"]
    choices = compose(
        config_name="train", overrides=overrides, return_hydra_config=True
    ).hydra.runtime.choices
    for group in ("teacher", "student"):
        if choices.get(group) != cfg.recipe[group]:
            overrides.append(f"{group}={cfg.recipe[group]}")
    return overrides


def compose_stage(stage: str, overrides: list[str], paths: DictConfig) -> DictConfig:
    from hydra.errors import MissingConfigException

    try:
        stage_cfg = compose(config_name=stage, overrides=overrides)
    except MissingConfigException as err:  # overrides.train=[logger=nope]: one line, not Hydra's listing
        group, _, value = str(err.missing_cfg_file).rpartition("/")
        if not group or not err.options:
            raise
        raise ConfigError(f"{stage} stage: {choice_error(group, value, err.options)}") from None
    OmegaConf.set_struct(stage_cfg, False)
    stage_cfg.paths = paths  # one root for the whole pipeline, whatever the environment says
    return stage_cfg


def validate_stages(cfg: DictConfig) -> None:
    """The pipeline's config and each stage's, composed as the stages will be, checked before any stage runs
    (a bad value in the recipe or `overrides.train` is refused up front, not after labelling)."""
    validate(cfg, "pipeline")
    deploy_formats(cfg)  # each format known and its quantization one its runtime has
    for stage in STAGES:
        if stage in cfg.stages:
            stage_cfg = compose_stage(stage, stage_overrides(cfg, stage), cfg.paths)
            validate(stage_cfg, stage, f"{stage} stage: ")
            if stage == "train":
                check_export_choice(cfg.train.get("export") or "auto", stage_cfg)


def check_export_choice(wanted: str, train_cfg: DictConfig) -> None:
    """`train.export=averaged|ema` needs the training run to write that export."""
    needs = {"averaged": "checkpoint.average_last", "ema": "ema.decay"}.get(wanted)
    if needs and OmegaConf.select(train_cfg, needs) is None:
        raise ConfigError(
            f"train.export={wanted}: the training stage writes no {wanted!r} export; set {needs} (or train.export=auto)"
        )


def check_outputs(cfg: DictConfig) -> None:
    """Where each stage will write, writable: a read-only location is named before the first stage runs (not
    after hours of labelling). Each stage checks its own again when it starts."""
    from distil.train import override_dirname, resolve_out_dir
    from distil.whisper.student import is_complete_student

    for stage in cfg.stages:
        overrides = stage_overrides(cfg, stage)
        stage_cfg = compose_stage(stage, overrides, cfg.paths)
        key = f"{stage} stage: out_dir"
        if stage in ("corpus", "pseudo_label"):
            ensure_writable_directory(stage_cfg.out_dir, key)
        elif stage == "init_student" and not is_complete_student(stage_cfg.out_dir):
            ensure_writable_parent(stage_cfg.out_dir, key)
        elif stage == "train":
            ensure_writable_parent(resolve_out_dir(stage_cfg, override_dirname(overrides)), key)


def run_pipeline(cfg: DictConfig, out_dir: str | Path) -> dict[str, Any]:
    """Run the configured stages in order; returns (and writes) the teacher/student comparison and report.md."""
    validate_stages(cfg)
    check_outputs(cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    try:
        _run_stages(cfg, out, results)
    finally:  # a failed stage still gets its summary and report, which say what is missing
        (out / "pipeline_summary.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
        report = write_report(out, results, wer_threshold=cfg.train.get("wer_threshold"))
        log.info("report: %s", report)
    return results


def _run_stages(cfg: DictConfig, out: Path, results: dict[str, Any]) -> None:
    from distil.whisper.models import resolve_model

    def run(stage: str, extra: list[str] | None = None, tag: str | None = None):
        overrides = stage_overrides(cfg, stage) + list(extra or [])
        log.info("stage %s: python -m distil.%s %s", tag or stage, stage, " ".join(overrides))
        stage_cfg = compose_stage(stage, overrides, cfg.paths)
        stage_dir = out / (tag or stage)
        write_run_info(stage_cfg, stage_dir)
        return stage_cfg, stage_dir, overrides

    if "corpus" in cfg.stages:
        from distil.data.synthetic_build import build_all

        stage_cfg, _, _ = run("corpus")
        results["corpus"] = {name: str(path) for name, path in build_all(stage_cfg).items()}
    if "pseudo_label" in cfg.stages:
        from distil.pseudo_label import pseudo_label

        stage_cfg, stage_dir, _ = run("pseudo_label")
        results["pseudo_label"] = pseudo_label(stage_cfg, run_dir=stage_dir)
    if "init_student" in cfg.stages:
        from distil.init_student import init_student_from_config

        stage_cfg, _, _ = run("init_student")
        results["init_student"] = str(init_student_from_config(stage_cfg))
    train_summary = None
    if "train" in cfg.stages:
        from distil.train import override_dirname, resolve_out_dir, train

        stage_cfg, _, overrides = run("train")
        # The directory `distil-train <overrides>` would use.
        stage_cfg.out_dir = resolve_out_dir(stage_cfg, override_dirname(overrides))
        train_summary = train(stage_cfg, command=command_line("distil-train", overrides))
        results["train"] = train_summary
    if "evaluate" in cfg.stages:
        from distil.evaluate import evaluate

        teacher_cfg = compose_stage("init_student", stage_overrides(cfg, "init_student"), cfg.paths).teacher
        teacher_dir = resolve_model(teacher_cfg, models_root=cfg.paths.models)
        student_dir = _trained_student_dir(cfg, train_summary)
        evals, set_paths = {}, {}
        for role, model_dir, extra in [
            (
                "teacher",
                teacher_dir if cfg.get("evaluate_teacher", True) else None,
                [f"++eval.speculative.assistant={_quoted(student_dir)}"] if student_dir else [],
            ),
            ("student", student_dir, ["++eval.speculative=null"]),  # a model is not its own assistant
            *deployment_role(cfg, student_dir),
            *format_roles(cfg, {"teacher": teacher_dir, "student": student_dir}, out),
        ]:
            if model_dir is None:
                continue
            model = ["model=path", f"model.path={_quoted(model_dir)}", f"model.name={role}"]
            stage_cfg, stage_dir, _ = run("evaluate", model + extra, tag=f"evaluate_{role}")
            evals[role] = evaluate(stage_cfg, stage_dir)
            set_paths = {
                **_set_paths(stage_cfg.eval.get("sets")),
                **_set_paths(OmegaConf.select(stage_cfg, "eval.long_form.sets")),
            }
        results["evaluate"] = evals
        results["comparison"] = compare(evals)
        update_cards(cfg, train_summary, student_dir, evals, set_paths)
        log_to_trackers(cfg, train_summary, evals)
        print(headline_table(evals))
        # The sweep collector reads `metrics.json` in each job directory: the student's evaluation.
        if "student" in evals:
            (out / "metrics.json").write_text(json.dumps(evals["student"], indent=2, default=str) + "\n")
    if cfg.get("push_to_hub"):  # the evaluated student, its card now holding the results
        from distil.utils.hub import HubUploadError, push_from_config

        student_dir = _trained_student_dir(cfg, train_summary)
        if not student_dir:
            raise HubUploadError(f"push_to_hub={cfg.push_to_hub}: this run has no trained student to upload")
        results["hub_commit"] = push_from_config(cfg, student_dir)


def update_cards(
    cfg: DictConfig, train_summary: dict | None, student_dir: str | None, evals: dict, set_paths: dict
) -> None:
    """The training run's exported students' model cards, rewritten with the evaluation's results: the
    evaluated export's card (and its CTranslate2 exports') gets the model-index, the others say they were not
    evaluated."""
    from distil.whisper.model_card import evaluation_summary, write_run_cards

    summary = train_record(cfg, train_summary)
    exports = (summary or {}).get("exports") or {}
    if "student" not in evals or not exports or not student_dir:
        return
    evaluated = Path(student_dir).name  # best (or last): the export the student's evaluation loaded
    evaluation = evaluation_summary(evals, set_paths)
    for card in write_run_cards(summary["out_dir"], exports, summary.get("command"), evaluation, evaluated):
        log.info("model card: %s", card)


def train_record(cfg: DictConfig, train_summary: dict | None) -> dict | None:
    """The training stage's summary: this run's, else the record of training in an earlier invocation."""
    if train_summary is not None:
        return train_summary
    record = earlier_train_dir(cfg) / "train_summary.json"
    return read_json(record) if record.is_file() else None


def log_to_trackers(cfg: DictConfig, train_summary: dict | None, evals: dict) -> None:
    """The student's evaluation (each role but the teacher's) in the training run's trackers (`logger=` of the
    train stage), the runs training logged to."""
    from distil.training.trackers import log_evaluation

    summary = train_record(cfg, train_summary)
    if summary is None:
        return
    train_cfg = compose_stage("train", stage_overrides(cfg, "train"), cfg.paths)
    # The trackers' paths (TensorBoard's, the MLflow file store) are in the training's run directory.
    train_cfg.out_dir = summary["out_dir"]
    for role, metrics in evals.items():
        if role != "teacher":
            log_evaluation(train_cfg, summary, role, metrics)


def _set_paths(sets: DictConfig | None) -> dict[str, str]:
    """Each evaluation set's dataset path (a Hub id names the set's dataset in the model-index)."""
    return {
        name: str(entry.get("path")) for name, entry in (sets or {}).items() if entry and entry.get("path")
    }


def deployment_role(cfg: DictConfig, student_dir: str | None) -> list[tuple[str, str, list[str]]]:
    """The student as deployed: evaluated through CTranslate2 at `deploy_compute_type` (none if null)."""
    q = cfg.get("deploy_compute_type")
    if not q or not student_dir:
        return []
    return [(f"student-ct2-{q}", student_dir, ["backend=ctranslate2", f"compute_type={q}"])]


def deploy_formats(cfg: DictConfig) -> list[tuple[str, str]]:
    """`deploy_formats` as (format, quantization) pairs, each checked against its format's quantizations before
    any stage runs (`ggml:q8_0`; `ggml` alone: the format's default quantization)."""
    from distil.whisper.export_formats import export_format, load_module

    pairs = []
    for spec in cfg.get("deploy_formats") or []:
        name, _, quantization = str(spec).partition(":")
        if name == "ctranslate2":
            raise ConfigError(
                f"deploy_formats={spec}: CTranslate2 is deploy_compute_type's (deploy_compute_type=int8)"
            )
        module = load_module(export_format(name))
        quantization = quantization or module.QUANTIZATIONS[0]
        module.check_quantization(quantization)
        pairs.append((name, quantization))
    return pairs


def format_roles(
    cfg: DictConfig, sources: dict[str, str | None], out: Path
) -> list[tuple[str, str, list[str]]]:
    """Each model exported to each of `deploy_formats` (as `distil-export format=... quantization=...` would,
    into <run>/exports/<role>-<format>-<quantization>), to be evaluated in that format's runtime."""
    from distil.export import export

    roles = []
    for name, quantization in deploy_formats(cfg):
        for role, source in sources.items():
            if source is None:
                continue
            tag = f"{role}-{name}-{quantization}"
            overrides = [
                "model=path",
                f"model.path={_quoted(source)}",
                f"format={name}",
                f"quantization={quantization}",
                f"out_dir={_quoted(out / 'exports' / tag)}",
            ]
            log.info("stage export_%s: python -m distil.export %s", tag, " ".join(overrides))
            stage_cfg = compose_stage("export", overrides, cfg.paths)
            write_run_info(stage_cfg, out / f"export_{tag}")
            roles.append((tag, str(export(stage_cfg, command_line("distil-export", overrides))), []))
    return roles


def _quoted(path: str | Path) -> str:
    """A path as a Hydra override value (training run directories contain `=` and `,`)."""
    return "'" + str(path).replace("\\", "\\\\").replace("'", "\\'") + "'"


def earlier_train_dir(cfg: DictConfig) -> Path:
    """The run directory of the training stage when it ran in an earlier invocation (the one
    `distil-train <the stage's overrides>` uses)."""
    from distil.train import override_dirname, resolve_out_dir

    overrides = stage_overrides(cfg, "train")
    return Path(resolve_out_dir(compose_stage("train", overrides, cfg.paths), override_dirname(overrides)))


# `train.export: auto` evaluates the first of these the training wrote: a run that averages checkpoints or keeps
# an EMA was asked for that model (the recipe of distil-large-v3.5 ships its averaged checkpoints).
AUTO_EXPORT_ORDER = ("averaged", "ema", "best", "last")


def _trained_student_dir(cfg: DictConfig, train_summary: dict | None) -> str | None:
    """The distilled student to evaluate: the training export `train.export` names (auto: AUTO_EXPORT_ORDER)."""
    if train_summary is None:
        out_dir = earlier_train_dir(cfg)
        exports = {k: out_dir / k for k in AUTO_EXPORT_ORDER}
        exports = {k: str(v) for k, v in exports.items() if (v / "config.json").is_file()}
    else:
        exports = train_summary.get("exports") or {}
    wanted = cfg.train.get("export") or "auto"
    if wanted == "auto":
        return next((exports[k] for k in AUTO_EXPORT_ORDER if k in exports), None)
    if wanted not in exports and exports:
        raise ConfigError(
            f"train.export={wanted}: the training run wrote no {wanted!r} export (it wrote {sorted(exports)}); "
            "set checkpoint.average_last / ema.decay for averaged / ema, or train.export=auto"
        )
    return exports.get(wanted)


def compare(evals: dict[str, dict]) -> dict[str, dict[str, Any]]:
    """Every model's headline numbers (its sections' `headline` in metrics.json), one row per model; a number
    another model has and this one lacks is None."""
    columns = headline_columns(evals)
    return {
        role: {key: headlines(m).get(key, {}).get("value") for key in columns} for role, m in evals.items()
    }


def dry_run_plan(cfg: DictConfig, out_dir: str | Path | None) -> dict[str, Any]:
    """The stages `distil-pipeline` would run: each one's command line and where it writes; training's run
    directory, devices and precision; labelling's and training's GPU memory, disk and tokens (estimated from the
    model dimensions: distil.training.sizing). Composes configs only (no model, no data, no network)."""
    from distil.train import override_dirname, resolve_out_dir
    from distil.training.sizing import estimate_labelling, estimate_training
    from distil.utils.launch import train_plan

    validate_stages(cfg)
    stages: dict[str, Any] = {}
    hours = cfg.get("audio_hours") or cfg.recipe.get("audio_hours")
    unit_seconds = None
    for stage in cfg.stages:
        overrides = stage_overrides(cfg, stage)
        entry: dict[str, Any] = {"command": " ".join([f"distil-{stage.replace('_', '-')}", *overrides])}
        stage_cfg = compose_stage(stage, overrides, cfg.paths)
        # The recipe's data size, and training samples as long as the labelled units.
        if "estimate" in stage_cfg:
            stage_cfg.estimate.audio_hours = hours
            if stage == "train" and unit_seconds:
                stage_cfg.estimate.unit_seconds = unit_seconds
        if stage == "pseudo_label":
            entry["out_dir"] = str(stage_cfg.out_dir)
            entry["estimate"] = estimate_labelling(stage_cfg)
            unit_seconds = entry["estimate"].get("unit_seconds")
        elif stage == "init_student":
            entry["student_dir"] = str(stage_cfg.student.init_dir)
        elif stage == "train":
            stage_cfg.out_dir = resolve_out_dir(stage_cfg, override_dirname(overrides))
            plan = train_plan(stage_cfg)
            entry.update({k: plan[k] for k in ("run_directory", "resume", "trainer", "model")})
            entry["estimate"] = estimate_training(stage_cfg)
        elif stage == "evaluate":
            roles = (
                ["teacher"] * bool(cfg.get("evaluate_teacher", True))
                + ["student"]
                + ([f"student-ct2-{cfg.deploy_compute_type}"] if cfg.get("deploy_compute_type") else [])
            )
            entry["models"] = roles + [
                f"{role}-{name}-{q}" for name, q in deploy_formats(cfg) for role in roles[:2]
            ]
        stages[stage] = entry
    return {"run_directory": str(out_dir), "stages": stages}


def run_command(cfg: DictConfig) -> dict[str, Any]:
    """What `distil-pipeline` does with its composed config (also `distil.run("pipeline", ...)`): each stage's
    result and the comparison (pipeline_summary.json), or {"plan": ...} with dry_run=true (printed too)."""
    validate_stages(cfg)  # every key's type and range (its own and its stages'), before anything runs
    if cfg.get("dry_run"):
        from distil.utils.launch import launcher_plan, print_dry_run

        plan = {**dry_run_plan(cfg, hydra_output_dir()), "launcher": launcher_plan(cfg, "distil-pipeline")}
        print_dry_run("distil-pipeline", plan)
        return {"plan": plan}
    out = write_run_info(cfg)
    return run_pipeline(cfg, hydra_output_dir() or out)


@writable_home
@known_choices  # recipe=nope: one line before Hydra composes
@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="pipeline")
@one_line_errors
def main(cfg: DictConfig) -> float | None:
    results = run_command(cfg)
    student = (results.get("evaluate") or {}).get("student")
    return primary_metric(student) if student else None


if __name__ == "__main__":
    main()
