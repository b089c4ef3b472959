"""The ONNX export (distil-export format=onnx): optimum's ORTModelForSpeechSeq2Seq transcribes the float32 and
float16 exports token for token as PyTorch's greedy decoding and the int8 one within a stated margin, in the
layout transformers.js loads; re-exports are no-ops, an interrupted export leaves the previous one intact, and
bad input is one line before any work."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import PROJECT_ROOT
from test_export import compose_export, features, pytorch_ids, texts, wer

from distil.utils.io import COMPLETE_MARKER
from distil.whisper import ct2_export, onnx_export
from distil.whisper.ct2_export import ExportInputError
from distil.whisper.export_formats import FORMATS, export_format

# What optimum and transformers.js read beside the graphs.
CARRIED = {"config.json", "generation_config.json", "preprocessor_config.json", "tokenizer.json"}
GRAPHS = {
    "float32": {"encoder_model.onnx", "decoder_model_merged.onnx"},
    "float16": {"encoder_model_fp16.onnx", "decoder_model_merged_fp16.onnx"},
    "int8": {"encoder_model_int8.onnx", "decoder_model_merged_int8.onnx"},
}
# The stated int8 gate: tiny.en's int8 export within this many WER points of float32 on the test clips, the
# CTranslate2 export's margin. Measured here: 13.6 % for both, the same transcripts of the 8 clips.
INT8_WER_MARGIN = 5.0


def ort_ids(export_dir: Path, feats: np.ndarray, max_new_tokens: int, tmp_path: Path) -> list[list[int]]:
    """Greedy token ids of optimum's ORTModelForSpeechSeq2Seq, run in the exporter's environment."""
    np.save(tmp_path / "features.npy", feats)
    return json.loads(
        onnx_export.run_worker("transcribe", export_dir, tmp_path / "features.npy", max_new_tokens)
    )


@pytest.fixture(scope="module")
def tiny_random_onnx(tiny_random_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("onnx")
    return {q: onnx_export.export(tiny_random_dir, root / f"onnx-{q}", q) for q in onnx_export.QUANTIZATIONS}


@pytest.fixture
def no_worker(monkeypatch):
    """Any conversion from here on fails the test: the checks must come before any work."""

    def worker(*args):
        raise AssertionError("the ONNX exporter ran")

    monkeypatch.setattr(onnx_export, "run_worker", worker)


# --------------------------------------------------------------------------------------------------
# correctness gates
# --------------------------------------------------------------------------------------------------


def test_tiny_random_exports_transcribe_as_pytorch(tiny_random_dir, tiny_random_onnx, tts_clips, tmp_path):
    feats = features(tiny_random_dir, tts_clips[:4])
    expected = pytorch_ids(tiny_random_dir, feats, 16)  # the random model's transcripts end by themselves
    assert all(0 < len(ids) <= 16 for ids in expected)
    for quantization in ("float32", "float16"):
        assert ort_ids(tiny_random_onnx[quantization], feats, 16, tmp_path) == expected, quantization
    # int8: the random model's logits leave room for a rounding to flip a token; measured: none flips.
    int8 = ort_ids(tiny_random_onnx["int8"], feats, 16, tmp_path)
    pairs = [
        (a, b) for got, want in zip(int8, expected, strict=True) for a, b in zip(got, want, strict=False)
    ]
    assert sum(a == b for a, b in pairs) >= 0.9 * sum(map(len, expected))


def test_layout_is_the_one_optimum_and_transformers_js_load(tiny_random_dir, tiny_random_onnx):
    for quantization, out in tiny_random_onnx.items():
        assert CARRIED <= {p.name for p in out.iterdir()}
        assert {p.name for p in (out / "onnx").iterdir()} == GRAPHS[quantization]  # no leftover graph
        info = json.loads((out / onnx_export.EXPORT_INFO).read_text())
        assert info["quantization"] == quantization and info["source"] == str(tiny_random_dir)
        assert info["optimum-onnx"] and info["transformers"].startswith("4.")
    assert not [p for p in tiny_random_onnx["float32"].parent.iterdir() if p.name.startswith(".")]


@pytest.mark.slow  # ~2 min on 2 cores: three exports of tiny.en and its transcription by each
def test_tiny_en_float_exports_equal_pytorch_and_int8_stays_close(tiny_en_dir, tts_clips, tmp_path):
    clips = tts_clips[:8]
    feats = features(tiny_en_dir, clips)
    expected = pytorch_ids(tiny_en_dir, feats, 48)
    fp32_wer = wer(clips, texts(tiny_en_dir, expected))
    assert fp32_wer < 40, fp32_wer  # real recognition, not agreement on empty output
    for quantization in ("float32", "float16"):
        out = onnx_export.export(tiny_en_dir, tmp_path / quantization, quantization)
        assert ort_ids(out, feats, 48, tmp_path) == expected, quantization
    int8 = ort_ids(onnx_export.export(tiny_en_dir, tmp_path / "int8", "int8"), feats, 48, tmp_path)
    int8_wer = wer(clips, texts(tiny_en_dir, int8))
    assert int8_wer <= fp32_wer + INT8_WER_MARGIN, (int8_wer, fp32_wer)


# --------------------------------------------------------------------------------------------------
# idempotence, atomicity, bad input
# --------------------------------------------------------------------------------------------------


def test_re_export_is_a_no_op_and_another_quantization_is_refused(
    tiny_random_dir, tiny_random_onnx, tmp_path, no_worker
):
    out = tmp_path / "model-onnx"
    shutil.copytree(tiny_random_onnx["float32"], out)
    marker = (out / COMPLETE_MARKER).stat().st_mtime_ns
    assert onnx_export.export(tiny_random_dir, out, "float32") == out
    assert (out / COMPLETE_MARKER).stat().st_mtime_ns == marker
    with pytest.raises(ExportInputError, match="float32 export of another model.*force=true"):
        onnx_export.export(tiny_random_dir, out, "int8")
    ct2 = tmp_path / "ct2"  # a CTranslate2 export is not overwritten by an ONNX one, force or not
    shutil.copytree(out, ct2)
    spec = json.loads((ct2 / COMPLETE_MARKER).read_text())
    (ct2 / COMPLETE_MARKER).write_text(json.dumps({"spec": {**spec["spec"], "format": "ctranslate2"}}))
    with pytest.raises(ExportInputError, match="is not an ONNX export written by distil"):
        onnx_export.export(tiny_random_dir, ct2, "float32", force=True)


def test_interrupted_export_leaves_the_previous_one_intact(
    tiny_random_dir, tiny_random_onnx, tmp_path, monkeypatch
):
    out = tmp_path / "model-onnx"
    shutil.copytree(tiny_random_onnx["float32"], out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def killed(command, source, tmp, quantization):
        (Path(tmp) / "onnx").mkdir()
        (Path(tmp) / "onnx" / "encoder_model_int8.onnx").write_bytes(b"partial")
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(onnx_export, "run_worker", killed)
    with pytest.raises(RuntimeError, match="killed"):
        onnx_export.export(tiny_random_dir, out, "int8", force=True)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert os.listdir(tmp_path) == ["model-onnx"]  # no temporary sibling left


def test_bad_input_is_refused_before_any_work(tiny_random_dir, tmp_path, no_worker, monkeypatch):
    with pytest.raises(
        ExportInputError, match=r"quantization='int4' is not an ONNX export type: use one of \["
    ):
        onnx_export.export(tiny_random_dir, tmp_path / "out", "int4")
    with pytest.raises(ExportInputError, match="no config.json"):
        onnx_export.export(tmp_path / "nothing", tmp_path / "out", "int8")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(ExportInputError, match="is not an ONNX export written by distil"):
        onnx_export.export(tiny_random_dir, taken, "int8", force=True)
    with pytest.raises(ExportInputError, match="format='tflite' is not an export format"):
        export_format("tflite")
    monkeypatch.setattr(onnx_export, "EXPORTER_DIR", tmp_path / "absent")  # distil installed without it
    with pytest.raises(ExportInputError, match="format=onnx needs optimum-onnx.*make setup"):
        onnx_export.check_quantization("int8")
    assert os.listdir(taken) == ["notes.txt"] and not (tmp_path / "out").exists()


def test_every_format_module_has_the_interface():
    """The registered modules that exist here (ggml and openai may be absent from this checkout)."""
    assert ct2_export.QUANTIZATIONS == ct2_export.quantizations()  # ctranslate2's own list, int8 first
    for fmt in FORMATS.values():
        try:
            module = fmt.module
        except ImportError:
            continue
        assert module.QUANTIZATIONS and all(isinstance(q, str) for q in module.QUANTIZATIONS)
        for name in ("check_quantization", "check_model", "export"):
            assert callable(getattr(module, name)), (fmt.name, name)


# --------------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------------


def test_command_defaults_the_quantization_and_names_the_directory(
    tiny_random_dir, tiny_random_onnx, tmp_path, no_worker
):
    from distil.export import export

    model = tmp_path / "model"
    shutil.copytree(tiny_random_dir, model)
    shutil.copytree(tiny_random_onnx["float32"], tmp_path / "model-onnx-float32")  # the same weights: a no-op
    cfg = compose_export(["model=path", f"model.path={model}", "format=onnx"])
    assert cfg.quantization is None and compose_export([]).format == "ctranslate2"
    assert export(cfg) == tmp_path / "model-onnx-float32"


@pytest.mark.slow  # about 15 s: a checkpoint to ONNX (the checkpoint path of the stage: test_export.py)
def test_command_exports_a_training_checkpoint(tiny_random_dir, tts_clips, tmp_path):
    import torch
    from transformers import WhisperForConditionalGeneration

    from distil.export import export

    model = WhisperForConditionalGeneration.from_pretrained(tiny_random_dir)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"state_dict": {f"student.{k}": v for k, v in model.state_dict().items()}}, ckpt)
    overrides = ["model=checkpoint", f"model.path={ckpt}", f"model.base={tiny_random_dir}", "format=onnx"]
    out = export(compose_export(overrides))
    assert out == ckpt.parent / "last-onnx-float32"
    assert json.loads((out / onnx_export.EXPORT_INFO).read_text())["source"] == str(ckpt)
    feats = features(tiny_random_dir, tts_clips[:2])
    assert ort_ids(out, feats, 16, tmp_path) == pytorch_ids(tiny_random_dir, feats, 16)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["format=onnx", "quantization=int4"], "quantization='int4' is not an ONNX export type"),
        (["format=tflite"], "format must be one of ['ctranslate2', 'onnx', 'ggml', 'openai']"),
    ],
)
def test_command_prints_bad_input_as_one_line(tmp_path, overrides, message):
    env = {**os.environ, "DISTIL_HOME": str(tmp_path), "PYTHONPATH": str(PROJECT_ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "distil.export", "model=path", f"model.path={tmp_path}", *overrides],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {message}") and "Traceback" not in proc.stderr, proc.stderr[-2000:]
