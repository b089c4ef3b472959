"""End-to-end smoke of the whole recipe on the CPU: every stage runs for real, on tiny settings."""

import json
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import pytest
from helpers import PROJECT_ROOT, TINY_CORPUS
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from test_hub_upload import fake_hub_session, uploaded_card
from transformers import AutoTokenizer

import distil
from distil.config.schema import validate
from distil.evaluation.report import headline_table
from distil.evaluation.scoring import headline, primary_metric
from distil.pipeline import (
    STAGES,
    _trained_student_dir,
    compare,
    compose_stage,
    run_pipeline,
    stage_overrides,
    validate_stages,
)
from distil.utils.errors import ConfigError, InputError
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


def _pipeline_overrides(tmp_path, extra=()) -> list[str]:
    return [
        f"paths.root={tmp_path}",
        "recipe.teacher=tiny_random",
        "recipe.student=1dec",
        "recipe.experiment=tiny_random_smoke",
        "overrides.corpus=[" + ",".join(f"'{o}'" for o in TINY_CORPUS) + "]",
        "overrides.pseudo_label=['data=synthetic','batch_size=4','progress_bar=false']",
        "overrides.train=['encoder_cache.enabled=true']",
        "overrides.evaluate=[" + ",".join(f"'{o}'" for o in TINY_EVAL) + "]",
        *extra,
    ]


def _pipeline_cfg(tmp_path, extra=()):
    return compose(config_name="pipeline", overrides=_pipeline_overrides(tmp_path, extra))


def test_stage_overrides_forward_the_shared_choices(tmp_path):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        same = _pipeline_cfg(tmp_path, ["train.wer_threshold=15", "train.seed=3", "train.ablation=linear"])
        other_student = _pipeline_cfg(tmp_path, ["recipe.student=2dec"])
        assert stage_overrides(same, "pseudo_label")[0] == "teacher=tiny_random"
        # The experiment already picks tiny_random/1dec: the training run directory is the same as
        # `python -m distil.train experiment=tiny_random_smoke` (plus the WER threshold).
        # ... then the pipeline's own overrides.train (_pipeline_cfg trains on the labeller's encoder cache)
        assert stage_overrides(same, "train") == [
            "experiment=tiny_random_smoke",
            "ablation=linear",
            "seed=3",
            "data.wer_threshold=15",
            "encoder_cache.enabled=true",
        ]
        assert stage_overrides(other_student, "train") == [
            "experiment=tiny_random_smoke",
            "student=2dec",
            "encoder_cache.enabled=true",
        ]


RECIPES = sorted(p.stem for p in (CONF_DIR / "recipe").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_composes_every_stage(recipe, tmp_path):
    """Each recipe's choices and per-stage overrides make valid stage configs (what `dry_run` would print)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="pipeline", overrides=[f"recipe={recipe}", f"paths.root={tmp_path}"])
        stages = {stage: compose_stage(stage, stage_overrides(cfg, stage), cfg.paths) for stage in STAGES}
        default_corpus = compose_stage("corpus", [], cfg.paths)
    assert stages["train"].name == cfg.recipe.experiment
    assert stages["init_student"].teacher.name == stages["pseudo_label"].teacher.name
    scale = {"demo_long": 4, "demo_xl": 8}.get(recipe)  # times the demo's training clips, the same test sets
    if scale:
        for engine, spec in stages["corpus"].corpora.items():
            demo_sizes = default_corpus.corpora[engine].sizes
            assert spec.sizes.get("train", 0) == scale * demo_sizes.get("train", 0), engine
            assert spec.sizes.get("test") == demo_sizes.get("test"), engine


ABLATION_ROWS = sorted(p.stem for p in (CONF_DIR / "ablation").glob("*.yaml"))


def test_every_ablation_row_is_the_demo_with_its_own_changes(tmp_path):
    """sweep=ablate_v35: each row composes into a valid training config that differs from the baseline in
    exactly the knobs it names (the SpecAugment rows also leave the encoder-output cache off), and the sweep
    runs all rows for two seeds without evaluating the teacher."""
    knobs = ["optim.schedule", "augment.specaugment.enabled", "augment.specaugment.consistent"]
    knobs += ["augment.bpe_dropout", "checkpoint.average_last", "encoder_cache.enabled"]
    rows = {}
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        for row in ABLATION_ROWS:
            cfg = compose(
                config_name="pipeline", overrides=[f"paths.root={tmp_path}", f"train.ablation={row}"]
            )
            stage_cfg = compose_stage("train", stage_overrides(cfg, "train"), cfg.paths)
            validate(stage_cfg, "train")
            rows[row] = {k: OmegaConf.select(stage_cfg, k) for k in knobs}
        sweep = compose(config_name="pipeline", overrides=["sweep=ablate_v35"], return_hydra_config=True)
    changed = {row: {k for k in knobs if values[k] != rows["baseline"][k]} for row, values in rows.items()}
    specaugment = {"augment.specaugment.enabled", "encoder_cache.enabled"}
    assert changed == {
        "baseline": set(),
        "specaugment": specaugment,
        "specaugment_inconsistent": specaugment | {"augment.specaugment.consistent"},
        "bpe_dropout": {"augment.bpe_dropout"},
        "linear": {"optim.schedule"},
        "average": {"checkpoint.average_last"},
        "all": specaugment | {"augment.bpe_dropout", "optim.schedule", "checkpoint.average_last"},
    }
    assert rows["baseline"]["optim.schedule"] == "constant" and rows["baseline"]["encoder_cache.enabled"]
    params = sweep.hydra.sweeper.params
    assert sorted(params["train.ablation"].split(",")) == ABLATION_ROWS and params["train.seed"] == "1,2"
    assert sweep.evaluate_teacher is False


def test_the_evaluated_export_is_the_one_train_export_names(tmp_path):
    exports = {"best": "/r/best", "last": "/r/last", "averaged": "/r/averaged"}
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        pick = {
            choice: _trained_student_dir(
                _pipeline_cfg(tmp_path, [f"train.export={choice}"]), {"exports": exports}
            )
            for choice in ("auto", "best", "last", "averaged")
        }
        assert pick == {
            "auto": "/r/averaged",
            "best": "/r/best",
            "last": "/r/last",
            "averaged": "/r/averaged",
        }
        assert _trained_student_dir(_pipeline_cfg(tmp_path), {"exports": {"last": "/r/last"}}) == "/r/last"
        with pytest.raises(ConfigError, match="train.export=ema: the training run wrote no 'ema' export"):
            _trained_student_dir(_pipeline_cfg(tmp_path, ["train.export=ema"]), {"exports": exports})
        # Refused before any stage runs when the training stage would not write it.
        with pytest.raises(ConfigError, match="train.export=averaged: .* set checkpoint.average_last"):
            validate_stages(_pipeline_cfg(tmp_path, ["stages=[train]", "train.export=averaged"]))
        average = "overrides.train=['checkpoint.average_last=2']"
        validate_stages(_pipeline_cfg(tmp_path, ["stages=[train]", "train.export=averaged", average]))
        with pytest.raises(ConfigError, match="train.export"):
            validate_stages(_pipeline_cfg(tmp_path, ["stages=[train]", "train.export=newest"]))


@pytest.mark.unit
def test_comparison_reads_any_sections_headline_and_marks_what_a_model_lacks():
    """A section the pipeline and the report have never heard of shows up by its headline alone."""
    evals = {
        "teacher": {
            "model": {"parameters": 39e6, "decoder_layers": 4},
            "short_form": {"headline": headline(short_form_wer=("short-form WER %", 12.5, "lower"))},
            "accents": {"headline": headline(accent_gap=("accent WER gap %", 3.25, "lower"))},
        },
        "student": {
            "model": {"parameters": 30e6, "decoder_layers": 2},
            "latency": {"headline": headline(rtfx=("RTFx", 40.0, "higher"))},
            "accents": {"headline": headline(accent_gap=("accent WER gap %", 4.5, "lower"))},
        },
    }
    rows = compare(evals)
    assert rows["teacher"] == {"short_form_wer": 12.5, "accent_gap": 3.25, "rtfx": None}
    assert rows["student"] == {"short_form_wer": None, "accent_gap": 4.5, "rtfx": 40.0}
    table = headline_table(evals)
    assert "| model | parameters (M) | decoder layers | short-form WER % | accent WER gap % | RTFx |" in table
    assert "| student | 30.0 | 2 | - | 4.50 | 40.00 |" in table
    # the sweep objective: the first error rate (RTFx is better higher, so never the objective)
    assert primary_metric(evals["student"]) == 4.5
    assert primary_metric({"latency": evals["student"]["latency"]}) is None


@pytest.fixture(scope="module")
def fake_hub():
    """The Hub the pipeline uploads to (tests/test_hub_upload.py: the real client, a mocked HTTP transport)."""
    with fake_hub_session() as hub:
        yield hub


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, tiny_random_dir, fake_hub):
    """One whole pipeline run of the default recipe (packed, timestamped labels) on the tiny random teacher,
    uploading the student at the end."""
    tmp_path = tmp_path_factory.mktemp("pipeline")
    # Run as `distil-pipeline <overrides>` runs it (distil.run): its run directory, with its config.yaml, under
    # paths.root. The session's model cache is reused (the tiny random teacher is built once per test session).
    overrides = [f"paths.models={tiny_random_dir.parent}", "push_to_hub=me/tiny-student"]
    results = distil.run("pipeline", _pipeline_overrides(tmp_path, overrides))
    return tmp_path, Path(results["run_dir"]), results


def test_whole_pipeline_runs_every_stage(pipeline_run, tiny_random_dir, fake_hub):
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
    # The labeller filled the encoder cache under the key training computes: training found every segment
    # there (one fingerprint directory, one entry per labelled unit, none added by training).
    fingerprints = list((tmp_path / "encoder_cache").iterdir())
    units = sum(pq.read_metadata(p).num_rows for p in labels.glob("*/train/*.parquet"))
    entries = list(fingerprints[0].glob("*/*.npy"))
    assert len(fingerprints) == 1 and len(entries) == units
    labelled_by = max(p.stat().st_mtime_ns for p in labels.glob("*/train/_SUCCESS"))
    assert max(p.stat().st_mtime_ns for p in entries) <= labelled_by  # all written while labelling
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
    # The evaluated export's model card: Hub metadata the Hub client parses, the run's WERs in its model-index.
    from huggingface_hub import ModelCard

    exports = results["train"]["exports"]
    card = ModelCard.load(Path(exports["best"]) / "README.md", ignore_metadata_errors=False)
    wers = {
        r.dataset_name: r.metric_value for r in card.data.eval_results if r.metric_name.startswith("short")
    }
    assert wers == {f"{s} (short-form)": round(e["wer"], 2) for s, e in metrics["short_form"]["sets"].items()}
    assert card.data.pipeline_tag == "automatic-speech-recognition" and "distil-whisper" in card.data.tags
    assert "distil-train experiment=tiny_random_smoke" in card.text  # the command that made it
    last = ModelCard.load(Path(exports["last"]) / "README.md", ignore_metadata_errors=False)
    assert last.data.eval_results is None  # its weights were not evaluated
    # push_to_hub: the evaluated student was uploaded after the evaluation, its card holding the results.
    [commit] = fake_hub.commits
    assert fake_hub.created == {"name": "tiny-student", "organization": "me", "visibility": "private"}
    assert set(commit["files"]) == {
        p.name for p in Path(exports["best"]).iterdir() if not p.name.startswith(".")
    }
    assert uploaded_card(commit).data.eval_results == card.data.eval_results


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


def _file_times(*roots):
    return {str(p): p.stat().st_mtime_ns for root in roots for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow  # ~40 s: a second whole pipeline run (make test-slow)
def test_evaluate_stage_alone_can_skip_the_teacher_and_read_another_export(pipeline_run, tiny_random_dir):
    """What each job of an ablation sweep does at its end: only the student, from the export train.export names."""
    tmp_path, _, first = pipeline_run
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = _pipeline_cfg(
            tmp_path,
            [
                f"paths.models={tiny_random_dir.parent}",
                "stages=[evaluate]",
                "evaluate_teacher=false",
                "deploy_compute_type=null",
                "train.export=last",
            ],
        )
        results = run_pipeline(cfg, tmp_path / "run_student_only")
    assert set(results["evaluate"]) == {"student"}
    assert Path(results["evaluate"]["student"]["model"]["path"]) == Path(first["train"]["exports"]["last"])
    assert (tmp_path / "run_student_only" / "metrics.json").is_file()  # what the sweep collector reads


@pytest.mark.slow  # about a minute: four exports, four evaluations (the runtimes themselves: test_evaluate_runtimes)
def test_deploy_formats_export_both_models_and_evaluate_them_in_their_runtimes(pipeline_run, tiny_random_dir):
    pytest.importorskip("pywhispercpp.model")
    pytest.importorskip("whisper")
    tmp_path, _, _ = pipeline_run
    run_dir = tmp_path / "run_formats"
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        extra = [
            f"paths.models={tiny_random_dir.parent}",
            "stages=[evaluate]",
            "deploy_compute_type=null",
            "deploy_formats=[ggml:q8_0,openai]",  # openai alone: its default quantization, float32
            "overrides.evaluate=["
            + ",".join(f"'{o}'" for o in [*TINY_EVAL, "eval.latency.batch_sizes=[1]"])
            + "]",
        ]
        results = run_pipeline(_pipeline_cfg(tmp_path, extra), run_dir)
    roles = ["teacher-ggml-q8_0", "student-ggml-q8_0", "teacher-openai-float32", "student-openai-float32"]
    assert list(results["evaluate"]) == ["teacher", "student", *roles]
    for role in roles:
        metrics = results["evaluate"][role]
        assert metrics["backend"] == role.split("-")[1] and metrics["model"]["dtype"] == role.split("-")[2]
        assert Path(metrics["model"]["path"]) == run_dir / "exports" / role
        assert (run_dir / f"export_{role}" / "config.yaml").is_file()  # the export stage's record
    report = (run_dir / "report.md").read_text()
    table = report.split("### Deployed formats")[1].split("###")[0]
    assert "| student-ggml-q8_0 | ggml | q8_0 |" in table and "| teacher | pytorch | float32 |" in table
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        with pytest.raises(InputError, match="quantization"):
            validate_stages(_pipeline_cfg(tmp_path, ["stages=[evaluate]", "deploy_formats=[ggml:int3]"]))
        with pytest.raises(ConfigError, match="deploy_compute_type"):
            validate_stages(
                _pipeline_cfg(tmp_path, ["stages=[evaluate]", "deploy_formats=[ctranslate2:int8]"])
            )


def test_rerun_with_a_changed_evaluation_setting_redoes_only_the_evaluation(pipeline_run, tiny_random_dir):
    """The same pipeline again with one evaluation setting changed: corpus, labels, student and training
    checkpoints are reused untouched; only the evaluation (with the new setting) and the report are new."""
    tmp_path, first_run, first = pipeline_run
    students = tmp_path / "students"
    reused = [tmp_path / "corpora", tmp_path / "pseudo_labels", students]
    before = _file_times(*reused)
    checkpoints = {k: v for k, v in before.items() if k.endswith(".ckpt")}
    assert checkpoints  # the training run's checkpoints are among what must stay untouched
    second_run = tmp_path / "run_eval_changed"
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = _pipeline_cfg(
            tmp_path,
            [
                f"paths.models={tiny_random_dir.parent}",
                "overrides.evaluate=[" + ",".join(f"'{o}'" for o in [*TINY_EVAL, "eval.max_samples=2"]) + "]",
            ],
        )
        results = run_pipeline(cfg, second_run)
    after = _file_times(*reused)
    # Nothing reused was rewritten or deleted. The training stage resumed at its last step: it rewrote only its
    # run records (config, data filter, summary: .json/.yaml beside the checkpoints) and the exported models.
    run = students / "tiny_random_smoke"
    changed = [Path(p) for p in before if after.get(p) != before[p]]
    records = [p for p in changed if p.parent == run and p.suffix in (".json", ".yaml")]
    exports = [p for p in changed if p.is_relative_to(run / "last") or p.is_relative_to(run / "best")]
    assert sorted(set(changed) - set(records) - set(exports)) == []
    assert results["train"]["global_step"] == first["train"]["global_step"]
    for role in ("teacher", "student"):  # evaluated anew, with the new setting
        old = first["evaluate"][role]["short_form"]["sets"]["espeak"]["samples"]
        new = results["evaluate"][role]["short_form"]["sets"]["espeak"]["samples"]
        assert (old, new) == (3, 2), role
    assert (second_run / "report.md").is_file() and (first_run / "report.md").is_file()
