"""The CTranslate2 export (distil-export): transcripts equal PyTorch's at float32, int8 close to float32,
faster-whisper loads and transcribes it (short and long form), language tokens and alignment heads carry over,
re-exports are no-ops, and bad input is refused before any work."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import ctranslate2
import numpy as np
import pytest
import torch
from helpers import PROJECT_ROOT
from hydra import compose, initialize_config_dir

from distil.data.text import corpus_wer, english_normalizer
from distil.utils.io import COMPLETE_MARKER
from distil.utils.paths import CONF_DIR
from distil.whisper import ct2_export
from distil.whisper.ct2_export import EXPORT_INFO, ExportInputError, export_ct2

SR = 16_000
CT2_FILES = {"model.bin", "config.json", "tokenizer.json", "preprocessor_config.json", "vocabulary.json"}
EN_PROMPT = ["<|startoftranscript|>", "<|notimestamps|>"]
# The stated quantisation gate: int8 tiny.en within this many WER points of float32 on the test clips.
INT8_WER_MARGIN = 5.0


@pytest.fixture(autouse=True)
def float_mode():
    """CTranslate2 (and faster-whisper) turn flush-to-zero on; later tests' PyTorch floats must not see it."""
    yield
    ct2_export.restore_float_mode()


def features(model_dir, clips) -> np.ndarray:
    """Log-mel features clip by clip (batched STFTs round differently in the last bits), float32 [n, 80, 3000]."""
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor.from_pretrained(model_dir)
    return np.concatenate(
        [fe(c["audio"], sampling_rate=SR, return_tensors="np").input_features for c in clips]
    ).astype(np.float32)


def pytorch_ids(model_dir, feats: np.ndarray, max_new_tokens: int, **generate_kwargs) -> list[list[int]]:
    from transformers import WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration.from_pretrained(model_dir).eval()
    eot = model.generation_config.eos_token_id
    with torch.inference_mode():
        out = model.generate(
            torch.from_numpy(feats), max_new_tokens=max_new_tokens, num_beams=1, **generate_kwargs
        )
    return [[int(t) for t in row if int(t) != eot] for row in out]  # generated tokens only, no end-of-text


def ct2_ids(ct2_dir, feats: np.ndarray, prompt: list[str], max_new_tokens: int, compute_type="float32"):
    model = ctranslate2.models.Whisper(
        str(ct2_dir), device="cpu", compute_type=compute_type, intra_threads=torch.get_num_threads()
    )
    vocab = json.loads((Path(ct2_dir) / "vocabulary.json").read_text())
    prompt_ids = [vocab.index(t) for t in prompt]
    # CTranslate2's Whisper generates at most max_length // 2 tokens (OpenAI's sample_len = n_text_ctx // 2).
    results = model.generate(
        ctranslate2.StorageView.from_array(feats),
        [prompt_ids] * len(feats),
        beam_size=1,
        max_length=2 * max_new_tokens,
    )
    return [r.sequences_ids[0] for r in results]


def texts(model_dir, ids) -> list[str]:
    from transformers import WhisperTokenizerFast

    return [t.strip() for t in WhisperTokenizerFast.from_pretrained(model_dir).batch_decode(ids)]


def wer(clips, hypotheses) -> float:
    return corpus_wer([c["text"] for c in clips], hypotheses, english_normalizer()).wer


@pytest.fixture(scope="module")
def tiny_en_exports(tiny_en_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("exports")
    return {q: export_ct2(tiny_en_dir, root / f"tiny-en-{q}", q) for q in ("float32", "int8")}


# --------------------------------------------------------------------------------------------------
# correctness gates
# --------------------------------------------------------------------------------------------------


def test_tiny_random_float32_export_equals_pytorch_token_for_token(tiny_random_dir, tts_clips, tmp_path):
    out = export_ct2(tiny_random_dir, tmp_path / "ct2", "float32")
    assert CT2_FILES <= set(os.listdir(out))
    feats = features(tiny_random_dir, tts_clips[:4])
    # 16 tokens: the random model's transcripts end by themselves (see conf/teacher/tiny_random.yaml);
    # 6 tokens: both cut them at the same length.
    for max_new_tokens in (16, 6):
        expected = pytorch_ids(tiny_random_dir, feats, max_new_tokens)
        assert ct2_ids(out, feats, EN_PROMPT, max_new_tokens) == expected
        assert all(0 < len(ids) <= max_new_tokens for ids in expected)


def test_tiny_en_float32_export_equals_pytorch_and_int8_stays_close(tiny_en_dir, tiny_en_exports, tts_clips):
    clips = tts_clips[:8]
    feats = features(tiny_en_dir, clips)
    expected = pytorch_ids(tiny_en_dir, feats, 48)
    fp32 = ct2_ids(tiny_en_exports["float32"], feats, EN_PROMPT, 48)
    assert fp32 == expected
    fp32_wer = wer(clips, texts(tiny_en_dir, fp32))
    assert fp32_wer < 40, fp32_wer  # real recognition, not agreement on empty output

    int8 = ct2_ids(tiny_en_exports["int8"], feats, EN_PROMPT, 48, compute_type="int8")
    int8_wer = wer(clips, texts(tiny_en_dir, int8))
    assert int8_wer <= fp32_wer + INT8_WER_MARGIN, (int8_wer, fp32_wer)


def test_faster_whisper_transcribes_the_export_short_and_long_form(tiny_en_exports, tts_clips):
    from faster_whisper import WhisperModel

    model = WhisperModel(str(tiny_en_exports["int8"]), device="cpu", compute_type="int8", cpu_threads=1)
    short = [list(model.transcribe(c["audio"], beam_size=1, word_timestamps=True)[0]) for c in tts_clips[:4]]
    assert wer(tts_clips[:4], [" ".join(s.text for s in segments) for segments in short]) < 40
    words = [w for s in short[0] for w in s.words]  # word timestamps read the carried alignment heads
    assert len(words) >= 8 and all(a.start <= b.start for a, b in zip(words, words[1:], strict=False))

    # Long form, faster-whisper's own sequential algorithm without VAD: 30-s windows moved by timestamps.
    clips = tts_clips[:8]
    silence = np.zeros(SR, np.float32)
    audio = np.concatenate([part for c in clips for part in (c["audio"], silence)])
    assert len(audio) / SR > 30
    segments, info = model.transcribe(
        audio, beam_size=1, vad_filter=False, condition_on_previous_text=True, language="en"
    )
    segments = list(segments)
    assert info.duration == pytest.approx(len(audio) / SR)
    assert segments[-1].end > 30  # past the first window
    assert wer([{"text": " ".join(c["text"] for c in clips)}], [" ".join(s.text for s in segments)]) < 40


@pytest.fixture(scope="module")
def base_export(base_dir, tmp_path_factory) -> Path:
    return export_ct2(base_dir, tmp_path_factory.mktemp("base") / "base-ct2", "float32")


@pytest.mark.parametrize(
    "prompts, clips, max_new_tokens",
    [
        ([("fr", "translate")], 1, 12),
        pytest.param([("en", "transcribe"), ("fr", "translate")], 3, 48, marks=pytest.mark.slow),
    ],
)
def test_multilingual_export_keeps_language_and_task_tokens(
    base_dir, base_export, tts_clips, prompts, clips, max_new_tokens
):
    from transformers import GenerationConfig

    generation = GenerationConfig.from_pretrained(base_dir)
    config = json.loads((base_export / "config.json").read_text())
    assert config["lang_ids"] == sorted(generation.lang_to_id.values())
    assert config["alignment_heads"] == generation.alignment_heads
    assert ctranslate2.models.Whisper(str(base_export)).is_multilingual

    feats = features(base_dir, tts_clips[:clips])
    for language, task in prompts:
        prompt = ["<|startoftranscript|>", f"<|{language}|>", f"<|{task}|>", "<|notimestamps|>"]
        expected = pytorch_ids(base_dir, feats, max_new_tokens, language=language, task=task)
        assert ct2_ids(base_export, feats, prompt, max_new_tokens) == expected, (language, task)


def test_student_alignment_heads_carry_over(tiny_en_dir, tmp_path):
    from transformers import GenerationConfig

    from distil.whisper.student import init_student

    student = init_student(tiny_en_dir, tmp_path / "student", decoder_layers=2)
    heads = GenerationConfig.from_pretrained(student).alignment_heads
    assert heads and all(layer < 2 for layer, _ in heads)
    out = export_ct2(student, tmp_path / "student-ct2", "int8")
    assert json.loads((out / "config.json").read_text())["alignment_heads"] == heads
    info = json.loads((out / EXPORT_INFO).read_text())
    assert info["alignment_heads_from"] == "generation_config.json" and info["quantization"] == "int8"


# --------------------------------------------------------------------------------------------------
# idempotence, atomicity, bad input
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def no_conversion(monkeypatch):
    """Any conversion from here on fails the test: the checks must come before any work."""

    def convert(*args, **kwargs):
        raise AssertionError("the converter ran")

    monkeypatch.setattr(ctranslate2.converters.TransformersConverter, "convert", convert)


def test_re_export_is_a_no_op_and_another_model_is_refused(
    tiny_random_dir, tiny_en_dir, tmp_path, monkeypatch
):
    out = export_ct2(tiny_random_dir, tmp_path / "ct2", "int8")
    stamp = (out / "model.bin").stat().st_mtime_ns
    with monkeypatch.context() as m:
        m.setattr(ctranslate2.converters.TransformersConverter, "convert", lambda *a, **k: 1 / 0)
        assert export_ct2(tiny_random_dir, out, "int8") == out
        with pytest.raises(ExportInputError, match="int8 export of another model.*force=true"):
            export_ct2(tiny_random_dir, out, "float32")  # same model, other quantisation
        with pytest.raises(ExportInputError, match="another model"):
            export_ct2(tiny_en_dir, out, "int8")
    assert (out / "model.bin").stat().st_mtime_ns == stamp
    export_ct2(tiny_random_dir, out, "float32", force=True)
    assert json.loads((out / EXPORT_INFO).read_text())["quantization"] == "float32"


def test_failed_conversion_leaves_nothing_that_looks_complete(tiny_random_dir, tmp_path, monkeypatch):
    def half_written(self, output_dir, **kwargs):
        Path(output_dir, "model.bin").write_bytes(b"partial")
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(ctranslate2.converters.TransformersConverter, "convert", half_written)
    with pytest.raises(RuntimeError, match="killed"):
        export_ct2(tiny_random_dir, tmp_path / "ct2", "int8")
    assert os.listdir(tmp_path) == []  # neither the export nor its temporary sibling


def test_bad_models_are_refused_before_any_work(tiny_random_dir, tmp_path, no_conversion):
    with pytest.raises(ExportInputError, match="no config.json"):
        export_ct2(tmp_path / "nothing", tmp_path / "out", "int8")
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ExportInputError, match="'bert' model, not Whisper"):
        export_ct2(bert, tmp_path / "out", "int8")
    partial = tmp_path / "partial"
    shutil.copytree(tiny_random_dir, partial)
    (partial / "tokenizer.json").unlink()
    with pytest.raises(ExportInputError, match="lacks tokenizer.json"):
        export_ct2(partial, tmp_path / "out", "int8")
    generation = json.loads((partial / "generation_config.json").read_text())
    shutil.copy(tiny_random_dir / "tokenizer.json", partial / "tokenizer.json")
    (partial / "generation_config.json").write_text(json.dumps({**generation, "alignment_heads": [[5, 0]]}))
    with pytest.raises(ExportInputError, match=r"alignment_heads \[\[5, 0\]\] do not exist"):
        export_ct2(partial, tmp_path / "out", "int8")
    assert not (tmp_path / "out").exists()


def test_bad_quantisations_and_outputs_are_refused_before_any_work(tiny_random_dir, tmp_path, no_conversion):
    with pytest.raises(ExportInputError, match="not a CTranslate2 weight type"):
        export_ct2(tiny_random_dir, tmp_path / "out", "int3")
    unsupported = sorted(set(ct2_export.quantizations()) - ctranslate2.get_supported_compute_types("cpu"))
    if unsupported:  # e.g. float16 on a CPU
        with pytest.raises(ExportInputError, match=f"{unsupported[0]} cannot run on this machine's cpu"):
            export_ct2(tiny_random_dir, tmp_path / "out", unsupported[0])
    with pytest.raises(ExportInputError, match="device='tpu'"):
        export_ct2(tiny_random_dir, tmp_path / "out", "int8", device="tpu")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    for force in (False, True):
        with pytest.raises(ExportInputError, match="is not a CTranslate2 export written by distil"):
            export_ct2(tiny_random_dir, taken, "int8", force=force)
    assert os.listdir(taken) == ["notes.txt"]
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------------


def compose_export(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose("export", overrides=overrides)


def test_command_exports_a_training_checkpoint(tiny_random_dir, tts_clips, tmp_path):
    from transformers import WhisperForConditionalGeneration

    from distil.export import export

    model = WhisperForConditionalGeneration.from_pretrained(tiny_random_dir)
    state = {f"student.{k}": v for k, v in model.state_dict().items()}
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"state_dict": {**state, "teacher.x": torch.zeros(1)}, "global_step": 3}, ckpt)
    overrides = ["model=checkpoint", f"model.path={ckpt}", f"model.base={tiny_random_dir}"]
    out = export(compose_export([*overrides, "quantization=float32"]))
    assert out == ckpt.parent / "last-ct2-float32"
    assert json.loads((out / EXPORT_INFO).read_text())["source"] == str(ckpt)
    assert not (out / "README.md").exists()  # not a distilled student (no distil_student.json): no model card
    feats = features(tiny_random_dir, tts_clips[:2])
    assert ct2_ids(out, feats, EN_PROMPT, 16) == pytorch_ids(tiny_random_dir, feats, 16)
    marker = (out / COMPLETE_MARKER).stat().st_mtime_ns
    assert export(compose_export([*overrides, "quantization=float32"])) == out  # same weights: a no-op
    assert (out / COMPLETE_MARKER).stat().st_mtime_ns == marker

    with pytest.raises(ExportInputError, match="model.base"):
        export(compose_export(["model=checkpoint", f"model.path={ckpt}", "model.base=null"]))


def test_command_prints_bad_input_as_one_line(tmp_path):
    env = {**os.environ, "DISTIL_HOME": str(tmp_path), "PYTHONPATH": str(PROJECT_ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "distil.export", "model=path", f"model.path={tmp_path}", "quantization=int3"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: quantization='int3' is not a CTranslate2")
