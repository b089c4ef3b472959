"""End-to-end smoke of the whole recipe on the CPU: every stage runs for real, on tiny settings."""

import json

import datasets
import pytest
from helpers import PROJECT_ROOT, TINY_CORPUS
from hydra import compose, initialize_config_dir
from transformers import AutoTokenizer

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


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, tiny_random_dir):
    """One whole pipeline run of the default recipe (packed, timestamped labels) on the tiny random teacher."""
    tmp_path = tmp_path_factory.mktemp("pipeline")
    run_dir = tmp_path / "run"
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        # Reuse the session's model cache (the tiny random teacher is built once per test session).
        cfg = _pipeline_cfg(tmp_path, [f"paths.models={tiny_random_dir.parent}"])
        results = run_pipeline(cfg, run_dir)
    return tmp_path, run_dir, results


def test_whole_pipeline_runs_every_stage(pipeline_run, tiny_random_dir):
    tmp_path, run_dir, results = pipeline_run
    assert set(results) >= {"corpus", "pseudo_label", "init_student", "train", "evaluate", "comparison"}
    labels = tmp_path / "pseudo_labels" / "whisper-tiny-random"
    assert (labels / "espeak" / "train" / "_SUCCESS").is_file()
    # The default recipe labels same-speaker clips packed into <= 30-s segments, with timestamps: flite's
    # train split has one voice here, so its 6 clips pack into fewer units, each with several clips.
    parts = sorted(str(p) for p in (labels / "flite" / "train").glob("*.parquet"))
    rows = datasets.load_dataset("parquet", data_files=parts, split="train")
    assert len(rows) < 6 and max(len(ids) for ids in rows["packed_ids"]) > 1
    assert sum(len(ids) for ids in rows["packed_ids"]) == 6
    notimestamps = AutoTokenizer.from_pretrained(str(tiny_random_dir)).convert_tokens_to_ids(
        "<|notimestamps|>"
    )
    assert all(notimestamps not in ids[:2] for ids in rows["token_ids"])  # labelled in timestamp mode
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
    # The decoder's own speed per token, against the teacher's and against the decoder-arithmetic bound.
    latency = metrics["latency"]["batch_sizes"]["2"]
    assert latency["decoder_ms_per_token"] > 0 and latency["encoder_seconds"] > 0
    assert (
        metrics["model"]["decoder_macs_per_token"]
        < results["evaluate"]["teacher"]["model"]["decoder_macs_per_token"]
    )


def test_pipeline_run_notebook_executes_against_the_run(pipeline_run, monkeypatch):
    """notebooks/pipeline_run.ipynb, headless, on this run: its cells carry their own assertions."""
    _, run_dir, _ = pipeline_run
    monkeypatch.setenv("DISTIL_RUN_DIR", str(run_dir))
    notebook = json.loads((PROJECT_ROOT / "notebooks" / "pipeline_run.ipynb").read_text())
    namespace: dict = {}
    for index, cell in enumerate(notebook["cells"]):
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), f"pipeline_run.ipynb[cell {index}]", "exec"), namespace)
    assert set(namespace["side_by_side"]) == {"teacher", "student"}
    assert namespace["live"]["identical_fraction"] == 1.0
