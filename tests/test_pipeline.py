"""End-to-end smoke of the whole recipe on the CPU: every stage runs for real, on tiny settings."""

import json

from helpers import TINY_CORPUS
from hydra import compose, initialize_config_dir

from distil.pipeline import compare, format_comparison, run_pipeline, stage_overrides
from distil.utils.paths import CONF_DIR

TINY_EVAL = [
    "eval=demo",
    "eval.max_samples=3",
    "eval.long_form.chunk_length_s=10",
    "eval.speculative.samples=2",
    "eval.latency.samples=2",
    "eval.latency.batch_sizes=[2]",
    "eval.noise.samples=2",
    "eval.noise.snr_db=[10]",
    "eval.max_new_tokens=16",
]


def _pipeline_cfg(tmp_path, extra=()):
    overrides = [
        f"paths.root={tmp_path}",
        "recipe.teacher=tiny_random",
        "recipe.student=1dec",
        "recipe.experiment=tiny_random_smoke",
        "overrides.corpus=[" + ",".join(f"'{o}'" for o in TINY_CORPUS) + "]",
        "overrides.pseudo_label=['data=synthetic','batch_size=4','progress_bar=false']",
        "overrides.evaluate=[" + ",".join(f"'{o}'" for o in TINY_EVAL) + "]",
        *extra,
    ]
    return compose(config_name="pipeline", overrides=overrides)


def test_stage_overrides_forward_the_shared_choices(tmp_path):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        same = _pipeline_cfg(tmp_path, ["train.wer_threshold=15"])
        other_student = _pipeline_cfg(tmp_path, ["recipe.student=2dec"])
        assert stage_overrides(same, "pseudo_label")[0] == "teacher=tiny_random"
        # The experiment already picks tiny_random/1dec: the training run directory is the same as
        # `python -m distil.train experiment=tiny_random_smoke` (plus the WER threshold).
        assert stage_overrides(same, "train") == ["experiment=tiny_random_smoke", "data.wer_threshold=15"]
        assert stage_overrides(other_student, "train") == ["experiment=tiny_random_smoke", "student=2dec"]


def test_comparison_table_formats_missing_values():
    rows = compare({"teacher": {"short_form": {"average": {"wer_sample_weighted": 12.5}}}})
    assert rows["teacher"]["short_form_wer"] == 12.5 and rows["teacher"]["rtfx"] is None
    table = format_comparison(rows)
    assert "| teacher | 12.50 | -" in table


def test_whole_pipeline_runs_every_stage(tmp_path, tiny_random_dir):
    run_dir = tmp_path / "run"
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        # Reuse the session's model cache (the tiny random teacher is built once per test session).
        cfg = _pipeline_cfg(tmp_path, [f"paths.models={tiny_random_dir.parent}"])
        results = run_pipeline(cfg, run_dir)
    assert set(results) >= {"corpus", "pseudo_label", "init_student", "train", "evaluate", "comparison"}
    assert (tmp_path / "pseudo_labels" / "whisper-tiny-random" / "espeak" / "train" / "_SUCCESS").is_file()
    assert results["train"]["global_step"] == 4
    comparison = results["comparison"]
    assert set(comparison) == {"teacher", "student", "student-ct2-int8"}
    assert comparison["teacher"]["short_form_wer"] is not None
    deployed = comparison["student-ct2-int8"]  # the student through CTranslate2 int8 (faster-whisper)
    assert deployed["short_form_wer"] is not None and deployed["rtfx"] > 0
    # Long-form through faster-whisper's own algorithms (the random student's WER is no measure of them).
    assert all(isinstance(deployed[f"long_form_wer_{a}"], float) for a in ("chunked", "sequential"))
    # The distilled student is the teacher's assistant: greedy outputs must be unchanged.
    assert comparison["teacher"]["speculative_identical"] == 1.0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["model"]["name"] == "student"
    stages = ("corpus", "pseudo_label", "init_student", "train", "evaluate_teacher", "evaluate_student")
    for stage in (*stages, "evaluate_student-ct2-int8"):
        assert (run_dir / stage / "config.yaml").is_file(), stage
    report = (run_dir / "report.md").read_text()  # the run ends in its report, with the run's own plots
    assert "| teacher |" in report and "| student |" in report and "| student-ct2-int8 |" in report
    for plot in ("wer_per_set", "training_curves", "latency", "pseudo_label_wer"):
        assert f"(plots/{plot}.png)" in report and (run_dir / "plots" / f"{plot}.png").is_file(), plot
