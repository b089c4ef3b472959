"""The openai-whisper export: `whisper.load_model("<out>/model.pt")` loads it and openai-whisper's own greedy
decoding (temperature 0, no fallback, its own log-mel) transcribes real speech as transformers does, in
float32 and float16; bad input is one line before anything is written; a failed export leaves the previous one
intact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import pytorch_greedy_texts, real_speech_clips

from distil.utils.io import COMPLETE_MARKER
from distil.whisper import openai_export
from distil.whisper.ct2_export import ExportInputError

whisper = pytest.importorskip("whisper")


def openai_texts(checkpoint: Path, clips: list[dict]) -> list[str]:
    """openai-whisper's greedy transcripts, batched; only text tokens are decoded (a random model may emit
    <|notimestamps|>, which transformers' generation config suppresses and openai's does not)."""
    from transformers import WhisperTokenizerFast

    model = whisper.load_model(str(checkpoint), device="cpu")
    mel = torch.stack(
        [whisper.log_mel_spectrogram(whisper.pad_or_trim(c["audio"]), model.dims.n_mels) for c in clips]
    )
    options = whisper.DecodingOptions(temperature=0.0, without_timestamps=True, fp16=False, language="en")
    results = whisper.decode(model, mel, options)
    tokenizer = WhisperTokenizerFast.from_pretrained(checkpoint.parent)
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return [tokenizer.decode([t for t in r.tokens if t < eot]).strip() for r in results]


@pytest.fixture(scope="module")
def random_student(tiny_random_dir, tmp_path_factory) -> Path:
    """A distilled-shape student of the tiny random teacher: its encoder and 2 decoder layers."""
    from distil.whisper.student import init_student

    return Path(init_student(tiny_random_dir, tmp_path_factory.mktemp("student") / "s", decoder_layers=2))


def test_random_student_transcribes_in_openai_whisper_as_in_pytorch(random_student, tmp_path):
    clips = real_speech_clips(3)
    expected = pytorch_greedy_texts(random_student, clips)
    assert all(expected)
    for quantization in ("float32", "float16"):
        out = openai_export.export(random_student, tmp_path / quantization, quantization)
        checkpoint = torch.load(out / openai_export.CHECKPOINT, weights_only=True)
        assert checkpoint["dims"]["n_text_layer"] == 2
        assert {t.dtype for t in checkpoint["model_state_dict"].values()} == {getattr(torch, quantization)}
        assert {"config.json", "tokenizer.json", "preprocessor_config.json"} <= {
            p.name for p in out.iterdir()
        }
        assert openai_texts(out / openai_export.CHECKPOINT, clips) == expected, quantization


@pytest.mark.slow
def test_tiny_en_transcribes_in_openai_whisper_as_in_pytorch(tiny_en_dir, tmp_path):
    """float32 and float16 weights: the same transcripts as transformers (measured on 10 packaged clips too)."""
    clips = real_speech_clips(4)
    expected = pytorch_greedy_texts(tiny_en_dir, clips)
    for quantization in ("float32", "float16"):
        out = openai_export.export(tiny_en_dir, tmp_path / quantization, quantization)
        assert openai_texts(out / openai_export.CHECKPOINT, clips) == expected, quantization


def test_bad_input_is_one_line_before_anything_is_written(random_student, tmp_path):
    import shutil

    with pytest.raises(ExportInputError, match=r"quantization='int8'.*\['float32', 'float16'\]"):
        openai_export.check_quantization("int8")
    bad = tmp_path / "bad"
    shutil.copytree(random_student, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    with pytest.raises(ExportInputError, match="not tied to the token embedding") as err:
        openai_export.export(bad, tmp_path / "out", "float32")
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


def test_reexport_is_a_no_op_and_a_failed_export_leaves_the_previous_intact(
    random_student, tmp_path, monkeypatch
):
    out = openai_export.export(random_student, tmp_path / "out", "float32")
    before = (out / openai_export.CHECKPOINT).read_bytes()
    stamp = (out / COMPLETE_MARKER).stat().st_mtime_ns
    openai_export.export(random_student, out, "float32")
    assert (out / COMPLETE_MARKER).stat().st_mtime_ns == stamp

    def failing(obj, path):
        Path(path).write_bytes(b"half a checkpoint")
        raise OSError("disk gone")

    monkeypatch.setattr(torch, "save", failing)
    with pytest.raises(OSError, match="disk gone"):
        openai_export.export(random_student, out, "float16", force=True)
    assert (out / openai_export.CHECKPOINT).read_bytes() == before
    assert json.loads((out / COMPLETE_MARKER).read_text())["spec"]["quantization"] == "float32"
    assert not list(tmp_path.glob(".out.tmp-*"))
