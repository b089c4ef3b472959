"""The model card every exported student carries (distil.whisper.model_card): Hub metadata through
huggingface_hub's own ModelCardData/EvalResult, read back by `ModelCard.load` as the Hub would read it."""

from __future__ import annotations

import json
import shutil

import pytest
from huggingface_hub import ModelCard, ModelCardData
from hydra import compose, initialize_config_dir

from distil.utils.paths import CONF_DIR
from distil.whisper import ct2_export
from distil.whisper.model_card import (
    EVALUATION_FILE,
    build_card,
    card_facts,
    evaluation_summary,
    is_hub_id,
    write_run_cards,
)

SETTINGS = {  # run_config.json of a run on a Hub dataset and a local corpus, from a Hub teacher
    "teacher.name": "whisper-small.en",
    "teacher.path": "openai/whisper-small.en",
    "teacher.language": None,
    "student.name": "2dec",
    "data.datasets.0.name": "librispeech",
    "data.datasets.0.path": "openslr/librispeech_asr",
    "data.datasets.0.splits": ["train.clean.100"],
    "data.datasets.0.language": "en",
    "data.datasets.1.name": "mine",
    "data.datasets.1.path": "/nonexistent/corpora/mine",
    "data.datasets.1.language": "en",
    "loss.name": "kd",
    "loss.labels": "pseudo",
    "loss.kl_weight": 1.0,
    "optim.lr": 1e-4,
    "seed": 0,
}
SUMMARY = {
    "global_step": 40,
    "train_seconds": 90.0,
    "effective_batch_size": 8,
    "command": "distil-train experiment=demo",
    "data_filter": {"librispeech/train": {"total": 10, "kept": 9, "dropped": {"wer": 1}}},
}


def metrics(wer: float, long_wer: float, rtfx: float) -> dict:
    """A metrics.json (distil.evaluate) with one short-form set, one failed set and one long-form set."""
    return {
        "model": {"parameters": 1000},
        "short_form": {
            "sets": {
                "ls_clean": {"status": "ok", "metric": "wer", "wer": wer, "samples": 3},
                "broken": {"status": "error", "error": "missing file"},
            }
        },
        "long_form": {
            "sets": {"talks": {"status": "ok", "chunked": {"wer": long_wer}, "sequential": {"wer": 9.0}}}
        },
        "latency": {"headline": {"rtfx": {"label": "RTFx", "value": rtfx, "better": "higher"}}},
    }


EVALS = {"teacher": metrics(5.0, 7.0, 10.0), "student": metrics(6.25, 8.0, 30.0)}


@pytest.fixture
def run_dir(tmp_path, tiny_random_dir):
    """A finished training run's records and its `best` export (a real student of the tiny random teacher)."""
    from distil.whisper.student import init_student

    run = tmp_path / "run"
    init_student(tiny_random_dir, run / "best", decoder_layers=1)
    (run / "run_config.json").write_text(json.dumps(SETTINGS))
    (run / "train_summary.json").write_text(json.dumps({**SUMMARY, "exports": {"best": str(run / "best")}}))
    (run / "run_info.json").write_text(json.dumps({"git_revision": "abc123"}))
    return run


@pytest.mark.unit
def test_hub_ids_and_local_paths_are_told_apart(tmp_path):
    assert is_hub_id("openai/whisper-tiny") and is_hub_id("librispeech_asr")
    assert not is_hub_id(str(tmp_path)) and not is_hub_id("/data/x") and not is_hub_id("a/b/c")
    assert not is_hub_id(None) and not is_hub_id("")


def test_card_metadata_validates_and_holds_the_evaluated_wers(run_dir):
    evaluation = evaluation_summary(EVALS, {"ls_clean": "openslr/librispeech_asr", "talks": "/local/talks"})
    facts = card_facts(run_dir / "best", evaluation=evaluation)
    text = str(build_card(facts))
    card = ModelCard(text, ignore_metadata_errors=False)  # the Hub client's own parsing of the YAML header
    data = card.data
    assert data.base_model == "openai/whisper-small.en" and data.license == "apache-2.0"
    assert data.pipeline_tag == "automatic-speech-recognition" and data.library_name == "transformers"
    assert data.language == ["en"] and data.datasets == ["openslr/librispeech_asr"]  # the Hub one only
    assert "distil-whisper" in data.tags
    got = {(r.dataset_name, r.metric_name): (r.dataset_type, r.metric_value) for r in data.eval_results}
    assert got == {
        ("ls_clean (short-form)", "short-form WER %"): ("openslr/librispeech_asr", 6.25),
        ("talks (long-form)", "long-form WER % (chunked)"): ("talks", 8.0),
        ("talks (long-form)", "long-form WER % (sequential)"): ("talks", 9.0),
    }
    # The body: the teacher beside the student, the speed-up, what made it and what it was not evaluated on.
    assert "| ls_clean | short-form WER % | 6.25 | 5.00 |" in text
    assert "| talks | long-form WER % (chunked) | 8.00 | 7.00 |" in text
    assert "3.00x the teacher's throughput" in text
    assert "distil-train experiment=demo" in text and "abc123" in text
    assert "librispeech/train 9 of 10 samples (wer 1)" in text
    assert "evaluated only on: ls_clean, talks (long-form)" in text
    assert 'pipeline("automatic-speech-recognition"' in text


@pytest.mark.unit
def test_a_local_teacher_and_no_records_give_a_card_without_invented_facts(tmp_path):
    facts = card_facts(tmp_path / "student")
    card = ModelCard(str(build_card(facts)), ignore_metadata_errors=False)
    assert card.data.base_model is None and card.data.license is None and card.data.eval_results is None
    assert card.data.datasets is None and card.data.library_name == "transformers"
    assert "Not evaluated" in card.text and "licence" in card.text


def test_run_cards_put_the_results_on_the_evaluated_export_only(run_dir):
    shutil.copytree(run_dir / "best", run_dir / "last")
    evaluation = evaluation_summary(EVALS)
    cards = write_run_cards(
        run_dir, {"best": str(run_dir / "best"), "last": str(run_dir / "last")}, None, evaluation, "best"
    )
    best, last = (ModelCard.load(p, ignore_metadata_errors=False) for p in cards)
    assert [r.metric_value for r in best.data.eval_results][0] == 6.25
    assert last.data.eval_results is None and "this export was not evaluated" in last.text
    assert json.loads((run_dir / "best" / EVALUATION_FILE).read_text()) == evaluation  # for later exports
    assert not (run_dir / "last" / EVALUATION_FILE).exists()


def test_distil_export_of_a_run_export_carries_a_ctranslate2_card(run_dir):
    """`distil-export model=path model.path=<run>/best`: the CTranslate2 directory's card says how to load it
    with faster-whisper, and carries the pipeline's results of the student as CTranslate2 ran it."""
    from distil.export import export

    evaluation = evaluation_summary({**EVALS, "student-ct2-int8": metrics(6.5, 8.5, 40.0)})
    (run_dir / "best" / EVALUATION_FILE).write_text(json.dumps(evaluation))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(
            "export", overrides=["model=path", f"model.path={run_dir / 'best'}", "quantization=int8"]
        )
    try:
        out = export(cfg, command="distil-export model=path model.path=run/best")
    finally:
        ct2_export.restore_float_mode()
    assert out == run_dir / "best-ct2-int8"
    card = ModelCard.load(out / "README.md", ignore_metadata_errors=False)
    assert card.data.library_name == "ctranslate2" and card.data.base_model == "openai/whisper-small.en"
    assert {"ctranslate2", "int8"} <= set(card.data.tags)
    assert [r.metric_value for r in card.data.eval_results][0] == 6.5  # the int8 model's own WER
    assert "WhisperModel(" in card.text and 'compute_type="int8"' in card.text
    assert "distil-export model=path model.path=run/best" in card.text
    assert isinstance(ModelCardData(**card.data.to_dict()), ModelCardData)


def test_an_onnx_export_s_card_names_its_format_and_how_to_load_it(run_dir):
    """The card of a `format=onnx` export (written as distil-export writes it, without converting here)."""
    from distil.whisper.model_card import build_card

    evaluation = evaluation_summary({**EVALS, "student-onnx-int8": metrics(6.75, 8.5, 30.0)})
    facts = card_facts(
        run_dir / "best-onnx-int8",
        source_dir=run_dir / "best",
        quantization="int8",
        export_format="onnx",
        evaluation=evaluation,
    )
    card = ModelCard(str(build_card(facts)))
    assert card.data.library_name == "onnx" and card.data.model_name.endswith("-onnx-int8")
    assert {"onnx", "transformers.js", "int8"} <= set(card.data.tags)
    assert [r.metric_value for r in card.data.eval_results][0] == 6.75  # the int8 ONNX model's own WER
    assert "ORTModelForSpeechSeq2Seq.from_pretrained(" in card.text and 'dtype: "int8"' in card.text
    assert "ONNX graphs (int8 weights)" in card.text and "faster-whisper" not in card.text
