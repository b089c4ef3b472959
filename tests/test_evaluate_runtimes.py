"""`distil-evaluate` on the exports other runtimes load: a whisper.cpp (format=ggml) or openai-whisper
(format=openai) directory is found by its file and evaluated in its own runtime, with the sections and the
metrics.json schema of the PyTorch evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_evaluate import corpora, eval_cfg, long_form_cfg, read_jsonl  # noqa: F401 (corpora: a fixture)

from distil.evaluate import evaluate
from distil.evaluation.runtime_backends import detect_runtime_export
from distil.utils.errors import ConfigError

pytest.importorskip("pywhispercpp.model")
pytest.importorskip("whisper")


@pytest.fixture(scope="module")
def student(tiny_random_dir, tmp_path_factory) -> Path:
    """A distilled-shape student of the tiny random teacher (its encoder and 2 decoder layers)."""
    from distil.whisper.student import init_student

    return Path(init_student(tiny_random_dir, tmp_path_factory.mktemp("student") / "s", decoder_layers=2))


@pytest.fixture(scope="module")
def exports(student, tmp_path_factory) -> dict[str, Path]:
    from distil.whisper import ggml_export, openai_export

    root = tmp_path_factory.mktemp("exports")
    return {
        "ggml": ggml_export.export(student, root / "ggml-f16", "f16"),
        "openai": openai_export.export(student, root / "openai-float32", "float32"),
    }


def _run(model_path: Path, corpora: Path, out: Path) -> dict:  # noqa: F811
    cfg = eval_cfg(
        model_path,
        corpora,
        max_new_tokens=24,
        long_form=long_form_cfg(corpora, chunk_length_s=10, max_new_tokens=24, temperature=[0.0]),
        latency={"set": "flite", "batch_sizes": [1, 2], "samples": 2, "warmup": 1},
    )
    return evaluate(cfg, out)


def test_exports_are_found_by_their_files(exports, student):
    assert {kind: detect_runtime_export(path) for kind, path in exports.items()} == {
        "ggml": "ggml",
        "openai": "openai",
    }
    assert detect_runtime_export(student) is None and detect_runtime_export(None) is None


@pytest.mark.parametrize("kind", ["ggml", "openai"])
def test_an_export_is_evaluated_in_its_runtime_like_pytorch(kind, exports, student, corpora, tmp_path):  # noqa: F811
    reference = _run(student, corpora, tmp_path / "pytorch")
    metrics = _run(exports[kind], corpora, tmp_path / kind)
    assert metrics["backend"] == kind and metrics["model"]["kind"] == kind
    assert metrics["model"]["size_bytes"] > 0 and metrics["model"]["decoder_layers"] == 2
    # The same short-form transcripts as transformers' greedy decoding of the same student.
    for name in ("espeak", "flite"):
        ours = read_jsonl(tmp_path / kind / metrics["short_form"]["sets"][name]["predictions"])
        theirs = read_jsonl(tmp_path / "pytorch" / reference["short_form"]["sets"][name]["predictions"])
        assert [r["prediction"] for r in ours] == [r["prediction"] for r in theirs], name
        assert metrics["short_form"]["sets"][name]["wer"] == pytest.approx(
            reference["short_form"]["sets"][name]["wer"]
        )
    long_entry = metrics["long_form"]["sets"]["longform"]
    assert (
        long_entry["chunked"]["status"] == "skipped" and "sequential only" in long_entry["chunked"]["reason"]
    )
    assert long_entry["sequential"]["settings"]["runtime"] == kind and "wer" in long_entry["sequential"]
    latency = metrics["latency"]["batch_sizes"]
    assert latency["1"]["rtfx"] > 0 and latency["2"]["samples"] == 2
    assert json.loads((tmp_path / kind / "metrics.json").read_text())["backend"] == kind


def test_another_backend_on_an_export_is_refused_in_one_line(exports, corpora, tmp_path):  # noqa: F811
    cfg = eval_cfg(exports["ggml"], corpora)
    cfg.backend = "ctranslate2"
    with pytest.raises(ConfigError, match="backend=ctranslate2: .* is a ggml export"):
        evaluate(cfg, tmp_path)
