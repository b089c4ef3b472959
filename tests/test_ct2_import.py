"""CTranslate2 -> Hugging Face import: file format, directory contents, and transcripts equal to ctranslate2's."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
import torch

from distil.utils.io import COMPLETE_MARKER, build_directory, is_complete
from distil.whisper import ct2_import
from distil.whisper.ct2_reader import CT2FormatError, CT2Source, packaged_source, read_ct2_model

ctranslate2 = pytest.importorskip("ctranslate2")


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _string(s: str) -> bytes:
    data = s.encode() + b"\0"
    return struct.pack("<H", len(data)) + data


def write_ct2_bin(path, spec="WhisperSpec", variables=(), aliases=(), version=6):
    """A model.bin in CTranslate2's layout (float32 variables), for format edge cases."""
    out = struct.pack("<I", version) + _string(spec) + struct.pack("<II", 3, len(variables))
    for name, array in variables:
        array = np.asarray(array, dtype=np.float32)
        out += _string(name) + struct.pack("<B", array.ndim) + struct.pack(f"<{array.ndim}I", *array.shape)
        out += struct.pack("<BI", 0, array.nbytes) + array.tobytes()
    out += struct.pack("<I", len(aliases)) + b"".join(_string(a) + _string(b) for a, b in aliases)
    path.write_bytes(out)


def ct2_model_dir(source: CT2Source, tmp_path):
    """A directory ctranslate2 can load (the split base checkpoint is concatenated, test-only)."""
    if len(source.model_files) == 1:
        return str(source.model_files[0].parent)
    d = tmp_path / "ct2"
    d.mkdir()
    with open(d / "model.bin", "wb") as out:
        for part in source.model_files:
            with open(part, "rb") as f:
                while chunk := f.read(1 << 24):
                    out.write(chunk)
    for f in (source.config_json, source.vocabulary_txt, source.tokenizer_json):
        os.symlink(f, d / f.name)
    return str(d)


def ct2_transcribe(model_dir: str, features: np.ndarray, prompt: list[int]) -> list[list[int]]:
    threads = torch.get_num_threads()  # as many as torch uses in tests (see conftest.py)
    model = ctranslate2.models.Whisper(model_dir, device="cpu", compute_type="float32", intra_threads=threads)
    results = model.generate(
        ctranslate2.StorageView.from_array(features), [prompt] * len(features), beam_size=1
    )
    return [r.sequences_ids[0] for r in results]


def hf_transcribe(model_dir, features: np.ndarray, **generate_kwargs) -> list[list[int]]:
    from transformers import WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration.from_pretrained(model_dir).eval()
    eot = model.generation_config.eos_token_id
    with torch.no_grad():
        out = model.generate(torch.from_numpy(features), **generate_kwargs)
    # transformers 5 returns the generated tokens only (no prompt); drop the end-of-text and its padding.
    return [[int(t) for t in row if int(t) != eot] for row in out]


def compare_with_ctranslate2(hf_dir, source, clips, tmp_path, prompt_tokens, generate_kwargs, pipeline_clips):
    from transformers import WhisperProcessor, pipeline

    processor = WhisperProcessor.from_pretrained(hf_dir)
    tokenizer = processor.tokenizer
    # One clip at a time, as the pipeline does: batched STFTs round differently in the last bits, enough to
    # flip a borderline token of tiny.en; the comparison needs identical inputs on every path.
    features = np.concatenate(
        [
            processor.feature_extractor(c["audio"], sampling_rate=16_000, return_tensors="np").input_features
            for c in clips
        ]
    )
    prompt = tokenizer.convert_tokens_to_ids(prompt_tokens)

    ct2_ids = ct2_transcribe(ct2_model_dir(source, tmp_path), features, prompt)
    hf_ids = hf_transcribe(hf_dir, features, **generate_kwargs)
    ct2_texts = [tokenizer.decode(ids) for ids in ct2_ids]
    hf_texts = tokenizer.batch_decode(hf_ids, skip_special_tokens=True)
    assert hf_ids == ct2_ids
    assert hf_texts == ct2_texts
    # The transcripts are real speech recognition, not a degenerate agreement on empty output.
    from distil.data.text import corpus_wer, english_normalizer

    wer = corpus_wer([c["text"] for c in clips], hf_texts, english_normalizer()).wer
    assert wer is not None and wer < 40, (wer, hf_texts)

    asr = pipeline("automatic-speech-recognition", model=str(hf_dir), device="cpu")
    outputs = asr(
        [{"raw": clips[i]["audio"], "sampling_rate": 16_000} for i in pipeline_clips],
        batch_size=len(pipeline_clips),
        # The pipeline defaults to 5 beams unless generation_config.json sets num_beams (Hub configs do not).
        generate_kwargs={**generate_kwargs, "num_beams": 1},
    )
    assert [o["text"] for o in outputs] == [ct2_texts[i] for i in pipeline_clips]


# --------------------------------------------------------------------------------------------------
# model.bin format
# --------------------------------------------------------------------------------------------------


def test_read_packaged_tiny_en_layout():
    ckpt = read_ct2_model(packaged_source("tiny.en").model_files)
    assert ckpt.spec == "WhisperSpec"
    assert ckpt.scalars["encoder/num_heads"] == 6 and ckpt.scalars["decoder/num_heads"] == 6
    assert ckpt.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    assert ckpt.tensors["decoder/embeddings/weight"].shape == (51864, 384)
    assert ckpt.tensors["encoder/conv1/weight"].shape == (384, 80, 3)
    assert all(t.dtype == torch.float32 for t in ckpt.tensors.values())
    # float16 values upcast exactly: casting back loses nothing.
    w = ckpt.tensors["encoder/layer_0/self_attention/linear_0/weight"]
    assert torch.equal(w.half().float(), w)


def test_split_model_reads_like_one_file(tmp_path):
    """Parts are streamed as one file wherever the split falls (here inside the header and mid-variable)."""
    whole = packaged_source("tiny.en").model_files[0]
    data = whole.read_bytes()
    cuts = [7, 1_000_003, len(data) - 30]
    parts = []
    for i, (a, b) in enumerate(zip([0, *cuts], [*cuts, len(data)], strict=True)):
        parts.append(tmp_path / f"model.bin.part{i + 1}")
        parts[-1].write_bytes(data[a:b])
    del data
    one, split = read_ct2_model([whole]), read_ct2_model(parts)
    assert one.spec == split.spec and one.scalars == split.scalars and one.aliases == split.aliases
    assert one.tensors.keys() == split.tensors.keys()
    assert all(torch.equal(one.tensors[k], split.tensors[k]) for k in one.tensors)


def test_truncated_model_bin_is_named(tmp_path):
    data = packaged_source("tiny.en").model_files[0].read_bytes()[:5_000_000]
    (tmp_path / "model.bin").write_bytes(data)
    with pytest.raises(CT2FormatError, match="model.bin: file ends early"):
        read_ct2_model([tmp_path / "model.bin"])


def test_non_whisper_ct2_dir_is_rejected(tmp_path):
    src = packaged_source("tiny.en")
    for f in (src.config_json, src.tokenizer_json, src.vocabulary_txt):
        os.symlink(f, tmp_path / f.name)
    write_ct2_bin(tmp_path / "model.bin", spec="TransformerSpec", variables=[("encoder/x", np.zeros(2))])
    with pytest.raises(CT2FormatError, match=r"model\.bin.*'TransformerSpec', not 'WhisperSpec'"):
        ct2_import.import_ct2(CT2Source.from_dir(tmp_path), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".*.tmp-*"))  # the failed import left nothing behind

    # A Whisper spec whose variables are not Whisper's: named, not silently half-imported.
    write_ct2_bin(tmp_path / "model.bin", variables=[("encoder/conv1/weight", np.zeros((4, 2, 3)))])
    with pytest.raises(CT2FormatError, match="not a Whisper checkpoint"):
        ct2_import.import_ct2(CT2Source.from_dir(tmp_path), tmp_path / "out")


def test_ct2_dir_missing_files_says_what_to_do(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"")
    with pytest.raises(CT2FormatError, match=r"missing .*config\.json.*ct2-transformers-converter"):
        CT2Source.from_dir(tmp_path)
    with pytest.raises(CT2FormatError, match="does not exist"):
        CT2Source.from_dir(tmp_path / "nope")


def test_unknown_packaged_checkpoint():
    with pytest.raises(ValueError, match=r"'large'.*available: \['base', 'tiny.en'\]"):
        packaged_source("large")


# --------------------------------------------------------------------------------------------------
# the imported directory
# --------------------------------------------------------------------------------------------------


def test_tiny_en_directory_is_a_hub_like_whisper(tiny_en_dir):
    from transformers import GenerationConfig, WhisperForConditionalGeneration, WhisperProcessor

    files = {p.name for p in tiny_en_dir.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "vocab.json", "merges.txt", "normalizer.json", "preprocessor_config.json"} <= files  # fmt: skip
    assert is_complete(tiny_en_dir)

    model = WhisperForConditionalGeneration.from_pretrained(tiny_en_dir)
    c = model.config
    assert (c.d_model, c.encoder_layers, c.decoder_layers, c.encoder_attention_heads) == (384, 4, 4, 6)
    assert (c.vocab_size, c.num_mel_bins, c.max_source_positions, c.max_target_positions) == (
        51864,
        80,
        1500,
        448,
    )
    assert (c.decoder_start_token_id, c.eos_token_id, c.pad_token_id) == (50257, 50256, 50256)
    assert model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()
    assert model.dtype == torch.float32

    g = GenerationConfig.from_pretrained(tiny_en_dir)
    assert g.is_multilingual is False and not hasattr(g, "lang_to_id")
    assert (g.no_timestamps_token_id, g.prev_sot_token_id, g.decoder_start_token_id) == (50362, 50360, 50257)
    assert (
        g.begin_suppress_tokens == [220, 50256] and 50257 in g.suppress_tokens and 50361 in g.suppress_tokens
    )
    assert g.alignment_heads == [[1, 0], [2, 0], [2, 5], [3, 0], [3, 1], [3, 2], [3, 3], [3, 4]]
    assert g.forced_decoder_ids is None and g.max_initial_timestamp_index == 50 and g.max_length == 448

    processor = WhisperProcessor.from_pretrained(tiny_en_dir)
    assert processor.feature_extractor.feature_size == 80
    tok = processor.tokenizer
    vocab = ct2_import.read_vocabulary(packaged_source("tiny.en").vocabulary_txt)
    assert len(tok) == len(vocab) == 51864
    assert tok.convert_ids_to_tokens(list(range(len(vocab)))) == vocab
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|translate|>",
                                      "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>",
                                      "<|notimestamps|>", "<|0.00|>", "<|30.00|>"]) == [
        50256, 50257, 50258, 50357, 50358, 50359, 50360, 50361, 50362, 50363, 51863]  # fmt: skip
    assert tok.pad_token == tok.eos_token == "<|endoftext|>"
    assert "<|startofprev|>" in tok.all_special_tokens and "<|0.00|>" not in tok.all_special_tokens
    assert tok.prefix_tokens == [50257, 50362]
    assert tok("Hello").input_ids == [50257, 50362, 15496, 50256]
    assert tok.normalize("Mr. Smith's colour") == "mister smith is color"  # needs normalizer.json

    # Timestamp decoding as the Hub tokenizers do it (offsets relative to the timestamp tokens).
    hello = tok(" Hello world.", add_special_tokens=False).input_ids
    ids = [50257, 50363, *hello, 50363 + 50, 50363 + 60, *hello, 50363 + 120, 50256]
    out = tok.decode(ids, output_offsets=True)
    assert out["offsets"] == [
        {"text": " Hello world.", "timestamp": (0.0, 1.0)},
        {"text": " Hello world.", "timestamp": (1.2, 2.4)},
    ]
    assert tok.decode(ids, skip_special_tokens=True) == " Hello world. Hello world."
    # A previous-context prompt is stripped by skip_special_tokens.
    prompt = [50360, *tok(" earlier", add_special_tokens=False).input_ids]
    assert tok.decode([*prompt, 50257, 50362, *hello, 50256], skip_special_tokens=True) == " Hello world."


def test_import_is_reused_and_atomic(tiny_en_dir, tmp_path):
    weights = tiny_en_dir / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert (
        ct2_import.import_ct2(packaged_source("tiny.en"), tiny_en_dir, name=tiny_en_dir.name) == tiny_en_dir
    )
    assert weights.stat().st_mtime_ns == mtime  # reused, not re-imported

    # A build that dies leaves neither the output nor a temp dir; an incomplete output is replaced.
    target = tmp_path / "m"

    def dies(d):
        (d / "config.json").write_text("{}")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_directory(target, {"v": 1}, dies)
    assert not target.exists() and not list(tmp_path.iterdir())

    target.mkdir()
    (target / "config.json").write_text("{} half written")
    build_directory(target, {"v": 1}, lambda d: (d / "config.json").write_text("{}"))
    assert (target / "config.json").read_text() == "{}"
    assert is_complete(target, {"v": 1}) and not is_complete(target, {"v": 2})
    assert json.loads((target / COMPLETE_MARKER).read_text())["spec"] == {"v": 1}


def test_base_directory_multilingual_settings(base_dir):
    from transformers import GenerationConfig, WhisperProcessor

    g = GenerationConfig.from_pretrained(base_dir)
    assert g.is_multilingual is True
    assert len(g.lang_to_id) == 99 and g.lang_to_id["<|en|>"] == 50259 and g.lang_to_id["<|fr|>"] == 50265
    assert g.task_to_id == {"translate": 50358, "transcribe": 50359}
    assert (g.no_timestamps_token_id, g.prev_sot_token_id, g.decoder_start_token_id) == (50363, 50361, 50258)
    assert g.begin_suppress_tokens == [220, 50257]
    assert g.alignment_heads == [[3, 1], [4, 2], [4, 3], [4, 7], [5, 1], [5, 2], [5, 4], [5, 6]]

    processor = WhisperProcessor.from_pretrained(base_dir)
    assert processor.get_decoder_prompt_ids(language="en", task="transcribe") == [
        (1, 50259),
        (2, 50359),
        (3, 50363),
    ]
    assert processor.get_decoder_prompt_ids(language="french", task="translate") == [
        (1, 50265),
        (2, 50358),
        (3, 50363),
    ]
    tok = processor.tokenizer
    assert len(tok) == 51865 and tok.convert_tokens_to_ids("<|startofprev|>") == 50361
    assert tok.convert_tokens_to_ids("<|30.00|>") == 51864 and tok.all_special_ids[-1] == 50363


# --------------------------------------------------------------------------------------------------
# the correctness bar: same transcripts as ctranslate2
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow  # about 15 s: tiny.en through both runtimes (the import itself: the tiny random tests)
def test_tiny_en_transcripts_equal_ctranslate2(tiny_en_dir, tts_clips, tmp_path):
    compare_with_ctranslate2(
        tiny_en_dir,
        packaged_source("tiny.en"),
        tts_clips[:10],
        tmp_path,
        prompt_tokens=["<|startoftranscript|>", "<|notimestamps|>"],
        generate_kwargs={},
        pipeline_clips=[0, 1],
    )


BASE_PROMPT = ["<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"]


def test_base_transcripts_equal_ctranslate2_quick(base_dir, tts_clips, tmp_path):
    compare_with_ctranslate2(
        base_dir,
        packaged_source("base"),
        tts_clips[:3],
        tmp_path,
        prompt_tokens=BASE_PROMPT,
        generate_kwargs={"language": "en", "task": "transcribe"},
        pipeline_clips=[0],
    )


@pytest.mark.slow
def test_base_transcripts_equal_ctranslate2(base_dir, tts_clips, tmp_path):
    compare_with_ctranslate2(
        base_dir,
        packaged_source("base"),
        tts_clips,
        tmp_path,
        prompt_tokens=BASE_PROMPT,
        generate_kwargs={"language": "en", "task": "transcribe"},
        pipeline_clips=[0, 1, 2, 3],
    )
