"""Sizing a job offline: the shipped Whisper dimensions, the parameter counts, and dry_run's estimate checked
against a hand computation for recipe=distil_large_v3."""

from __future__ import annotations

import json

import pytest
import torch
from hydra import compose, initialize_config_dir
from transformers import WhisperConfig, WhisperForConditionalGeneration

from distil.pipeline import dry_run_plan
from distil.utils.paths import CONF_DIR
from distil.whisper.dimensions import WHISPER_DIMENSIONS, model_dimensions

pytestmark = pytest.mark.unit  # no model, no audio synthesis: `make test-unit`

GIB = 2**30


@pytest.mark.parametrize("hub_id", ["openai/whisper-tiny.en", "openai/whisper-large-v3-turbo"])
def test_parameter_counts_match_transformers(hub_id):
    d = WHISPER_DIMENSIONS[hub_id]
    config = WhisperConfig(
        d_model=d.d_model,
        encoder_layers=d.encoder_layers,
        decoder_layers=d.decoder_layers,
        encoder_attention_heads=d.attention_heads,
        decoder_attention_heads=d.attention_heads,
        encoder_ffn_dim=d.ffn_dim,
        decoder_ffn_dim=d.ffn_dim,
        vocab_size=d.vocab_size,
        num_mel_bins=d.num_mel_bins,
    )
    with torch.device("meta"):  # shapes only: no memory for large weights
        model = WhisperForConditionalGeneration(config)
    assert d.encoder_parameters() == sum(p.numel() for p in model.model.encoder.parameters())
    assert d.decoder_parameters() == sum(p.numel() for p in model.model.decoder.parameters())


def test_large_v3_has_its_published_parameter_count():
    d = WHISPER_DIMENSIONS["openai/whisper-large-v3"]
    assert d.encoder_parameters() + d.decoder_parameters() == 1_543_490_560


def test_dimensions_of_a_local_directory_and_of_unknown_models(tmp_path):
    config = {"d_model": 64, "encoder_layers": 2, "decoder_layers": 3, "encoder_attention_heads": 4}
    (tmp_path / "config.json").write_text(json.dumps({**config, "encoder_ffn_dim": 256, "vocab_size": 99}))
    local = model_dimensions({"path": str(tmp_path)})
    assert (local.d_model, local.decoder_layers, local.vocab_size) == (64, 3, 99)
    assert model_dimensions({"path": "someone/fine-tuned-whisper"}) is None
    assert model_dimensions({"checkpoint": "tiny.en"}) == WHISPER_DIMENSIONS["openai/whisper-tiny.en"]


def test_distil_large_v3_dry_run_estimate_matches_a_hand_computation(tmp_path):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="pipeline", overrides=["recipe=distil_large_v3", f"paths.root={tmp_path}"])
        plan = dry_run_plan(cfg, tmp_path / "run")
    train = plan["stages"]["train"]["estimate"]
    # By hand, for large-v3 (d = 1280, ffn = 5120, vocabulary 51,866) and a 2-layer decoder, batch 32 per GPU
    # x 8 GPUs, labels up to 448 positions, bf16 activations:
    layer = 2 * (4 * 1280**2 + 3 * 1280) + 2 * 1280 * 5120 + 5120 + 1280 + 3 * 2 * 1280  # 26,236,160
    student_decoder = 51866 * 1280 + 448 * 1280 + 2 * layer + 2 * 1280  # 119,436,800
    assert student_decoder == 119_436_800
    weights = (
        1_543_490_560 + student_decoder
    ) * 4  # the teacher whole (its encoder shared) + the student decoder
    trainable = student_decoder - 51866 * 1280 - 448 * 1280  # token and position embeddings frozen
    logits = 32 * 448 * 51866 * 16
    encoder = 32 * 1500 * 1280 * 4 + 32 * 1500 * 5120 * 2  # fp32 output + the widest activation
    decoder = 2 * (32 * 1500 * 2 * 1280 * 2 + 32 * 448 * (12 * 1280 + 2 * 5120) * 2)
    memory = train["gpu_memory_per_device_gib"]
    assert memory["weights"] == round(weights / GIB, 1) == 6.2
    assert memory["gradients_and_optimizer"] == round(trainable * 12 / GIB, 1) == 0.6
    assert memory["logits"] == round(logits / GIB, 1) == 11.1
    assert memory["encoder"] == round(encoder / GIB, 1) == 0.7
    assert memory["decoder"] == round(decoder / GIB, 1) == 1.8
    total = (weights + trainable * 12 + logits + encoder + decoder) / GIB + 1.0
    assert memory["total"] == round(total, 1) == 21.4
    assert train["parameters_millions"] == {"teacher": 1543.5, "student": 756.4, "trainable": 52.5}
    # 80,000 steps of 256 samples over 23,959 hours of 30-s units: 20.48 M samples, 7.12 passes.
    assert train["tokens"]["samples_seen"] == 20_480_000
    assert train["tokens"]["epochs"] == round(20_480_000 / (23_959 * 120), 2) == 7.12

    label = plan["stages"]["pseudo_label"]["estimate"]
    # bf16 teacher, batch 64, labels of 256 new tokens (+4 prompt), 32 decoder layers' self- and cross-attention.
    kv_cache = 64 * 32 * 2 * (260 + 1500) * 1280 * 2
    assert label["gpu_memory_per_device_gib"]["kv_cache"] == round(kv_cache / GIB, 1) == 17.2
    assert label["gpu_memory_per_device_gib"]["weights"] == round(1_543_490_560 * 2 / GIB, 1) == 2.9
    assert label["unit_seconds"] == 30.0
    # 120 units an hour, 90 label tokens each at 8 bytes + 200 bytes a row, over 23,959 hours.
    assert label["disk"]["gib_for_audio_hours"]["labels"] == round(120 * (90 * 8 + 200) * 23_959 / GIB, 1)
