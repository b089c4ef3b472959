"""Model resolution (teacher configs -> directories), the tiny random teacher, fingerprints, the import CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import PROJECT_ROOT
from omegaconf import OmegaConf

from distil.import_model import import_model
from distil.utils.io import is_complete
from distil.utils.paths import CONF_DIR
from distil.whisper import ct2_reader
from distil.whisper.models import ModelConfigError, build_tiny_random, model_fingerprint, resolve_model


def teacher_cfg(name: str):
    return OmegaConf.load(CONF_DIR / "teacher" / f"{name}.yaml")


# --------------------------------------------------------------------------------------------------
# resolve_model
# --------------------------------------------------------------------------------------------------


def test_teacher_configs_resolve_to_their_cached_directories(tiny_en_dir, tiny_random_dir, model_cache):
    assert tiny_en_dir == model_cache / "whisper-tiny.en"
    assert tiny_random_dir == model_cache / "whisper-tiny-random"
    # Resolving again reuses the caches (the default root is $DISTIL_HOME/models).
    assert resolve_model(teacher_cfg("tiny_en")) == str(tiny_en_dir)
    assert resolve_model(teacher_cfg("tiny_random")) == str(tiny_random_dir)


def test_path_wins_and_is_validated(tiny_random_dir, tmp_path):
    cfg = OmegaConf.merge(teacher_cfg("hub"), {"path": str(tiny_random_dir)})
    assert cfg.name == tiny_random_dir.name  # the directory's name, not its absolute path (issue 12)
    assert resolve_model(cfg) == str(tiny_random_dir)
    # `path` overrides an import source too.
    assert resolve_model(OmegaConf.merge(teacher_cfg("base"), {"path": str(tiny_random_dir)})) == str(
        tiny_random_dir
    )
    # A Hub id is handed to transformers as is (nothing is downloaded here).
    assert resolve_model({"name": "x", "path": "openai/whisper-tiny.en"}) == "openai/whisper-tiny.en"

    (tmp_path / "weights_only").mkdir()
    with pytest.raises(ModelConfigError, match=r"weights_only has no config\.json"):
        resolve_model({"name": "x", "path": str(tmp_path / "weights_only")})
    shutil.copy(tiny_random_dir / "config.json", tmp_path / "weights_only")
    with pytest.raises(ModelConfigError, match="no feature extractor"):
        resolve_model({"name": "x", "path": str(tmp_path / "weights_only")})
    with pytest.raises(ModelConfigError, match="does not exist"):
        resolve_model({"name": "x", "path": str(tmp_path / "missing")})
    with pytest.raises(ModelConfigError, match="does not exist"):
        resolve_model({"name": "x", "path": "./models/whisper"})


SOURCES = "distil.whisper.sources."


def test_bad_sources_are_named(tmp_path):
    with pytest.raises(
        ModelConfigError,
        match=r"unknown model source 'distil.whisper.sources.Onnx'.*PackagedCT2 \(ct2\), .*TinyRandom \(random\), "
        r".*PathModel \(hub\)",
    ):
        resolve_model({"name": "t", "_target_": SOURCES + "Onnx"}, tmp_path)
    with pytest.raises(ModelConfigError, match="source 'hub' but no `path`"):
        resolve_model({"name": "t", "_target_": SOURCES + "PathModel", "path": None}, tmp_path)
    with pytest.raises(ValueError, match=r"checkpoint 'large-v9'.*available"):
        resolve_model({"name": "t", "_target_": SOURCES + "PackagedCT2", "checkpoint": "large-v9"}, tmp_path)
    with pytest.raises(ModelConfigError, match="unknown tiny random model keys"):
        resolve_model({"name": "t", "_target_": SOURCES + "TinyRandom", "random": {"width": 3}}, tmp_path)
    with pytest.raises(ModelConfigError, match="plain directory name"):
        resolve_model({"name": "../escape", "_target_": SOURCES + "TinyRandom"}, tmp_path)
    assert not list(tmp_path.iterdir())  # nothing imported before the error


def test_misconfigured_sources_name_the_key_and_the_fix(tmp_path):
    """A model source is its config's `_target_`: a key the source does not take, a target that is not a source,
    or a config with neither a source nor a path is refused with the key and the fix, before any work."""
    from distil.whisper.sources import ModelSource, PackagedCT2, TinyRandom, model_source

    with pytest.raises(
        ModelConfigError, match=r"'t' \(distil.whisper.sources.PackagedCT2\) has keys \['source'\]"
    ):
        resolve_model({"name": "t", "_target_": SOURCES + "PackagedCT2", "source": "ct2"}, tmp_path)
    with pytest.raises(ModelConfigError, match=r"unknown model source 'collections.OrderedDict'.*TinyRandom"):
        resolve_model({"name": "t", "_target_": "collections.OrderedDict"}, tmp_path)
    with pytest.raises(ModelConfigError, match="neither a `_target_`.*nor a `path`.*teacher=tiny_en"):
        resolve_model({"name": "t", "checkpoint": "tiny.en"}, tmp_path)
    assert not list(tmp_path.iterdir())
    # Every teacher config instantiates to its source, with the stage keys as fields.
    source = model_source(teacher_cfg("tiny_random"))
    assert isinstance(source, TinyRandom) and source.random["d_model"] == 64 and source.multilingual is False
    assert isinstance(model_source(teacher_cfg("base")), PackagedCT2)
    for name in ("tiny_en", "base", "tiny_random", "hub"):  # large_v2 extends hub (composed in test_configs)
        assert isinstance(model_source(OmegaConf.merge(teacher_cfg(name), {"path": "a/b"})), ModelSource)


def test_unknown_teacher_config_lists_the_options():
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        with pytest.raises(ConfigCompositionException) as err:
            compose(config_name="import_model", overrides=["teacher=nope"])
    message = str(err.value)
    assert "nope" in message
    assert all(option in message for option in ("tiny_en", "base", "tiny_random", "hub"))


# --------------------------------------------------------------------------------------------------
# the tiny random teacher
# --------------------------------------------------------------------------------------------------


def test_tiny_random_teacher(tiny_random_dir, tiny_en_dir):
    from transformers import GenerationConfig, WhisperForConditionalGeneration, WhisperProcessor

    size = sum(f.stat().st_size for f in tiny_random_dir.glob("*.safetensors"))
    assert size < 20e6
    model = WhisperForConditionalGeneration.from_pretrained(tiny_random_dir).eval()
    c = model.config
    assert (c.d_model, c.encoder_layers, c.decoder_layers, c.decoder_attention_heads) == (64, 2, 2, 4)
    assert (c.vocab_size, c.num_mel_bins, c.max_source_positions) == (51864, 80, 1500)
    g = GenerationConfig.from_pretrained(tiny_random_dir)
    assert g.alignment_heads == [[1, h] for h in range(4)]
    assert g.no_timestamps_token_id == GenerationConfig.from_pretrained(tiny_en_dir).no_timestamps_token_id

    processor = WhisperProcessor.from_pretrained(tiny_random_dir)
    assert processor.tokenizer.normalize("colour") == "color"
    features = processor.feature_extractor(
        [torch.randn(16_000).numpy(), torch.randn(8_000).numpy()], sampling_rate=16_000, return_tensors="pt"
    ).input_features
    with torch.no_grad():
        out = model.generate(features)
    # Greedy output is a few random tokens and then ends (eot_after: <|endoftext|> at decoder position 12,
    # after the 2 prompt tokens), instead of running to 448 tokens.
    assert 1 < out.shape[1] <= 12
    with torch.no_grad():
        out = model.generate(features, return_timestamps=True, max_new_tokens=16)
    assert processor.tokenizer.decode(out[0], output_offsets=True)["offsets"]


def test_tiny_random_is_deterministic_and_cached(tiny_random_dir, model_cache, tmp_path):
    weights = tiny_random_dir / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    spec = OmegaConf.to_container(teacher_cfg("tiny_random").random)
    assert build_tiny_random("whisper-tiny-random", spec, model_cache) == tiny_random_dir
    assert weights.stat().st_mtime_ns == mtime

    # Rebuilt elsewhere (its tiny.en base imported there too would cost time: link it instead).
    os.symlink(model_cache / "whisper-tiny.en", tmp_path / "whisper-tiny.en")
    again = build_tiny_random("whisper-tiny-random", spec, tmp_path)
    assert model_fingerprint(again) == model_fingerprint(tiny_random_dir)
    other = build_tiny_random("other", {**spec, "seed": 1}, tmp_path)
    assert model_fingerprint(other) != model_fingerprint(tiny_random_dir)
    # A changed architecture is not served from a stale cache.
    wider = build_tiny_random("other", {**spec, "seed": 1, "d_model": 32}, tmp_path)
    from transformers import WhisperConfig

    assert WhisperConfig.from_pretrained(wider).d_model == 32


# --------------------------------------------------------------------------------------------------
# fingerprints
# --------------------------------------------------------------------------------------------------


def test_model_fingerprint(tiny_random_dir, tmp_path):
    import hashlib

    d = tmp_path / "m"
    shutil.copytree(tiny_random_dir, d)
    expected = hashlib.sha256(b"model.safetensors\0" + (d / "model.safetensors").read_bytes()).hexdigest()
    fp = model_fingerprint(d)
    assert fp == "sha256:" + expected
    assert (d / ".distil_fingerprint.json").is_file()
    assert model_fingerprint(d) == fp  # served from the cache

    data = bytearray((d / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (d / "model.safetensors").write_bytes(bytes(data))
    assert model_fingerprint(d) != fp  # rewritten weights are re-hashed

    assert model_fingerprint("openai/whisper-tiny.en") == "hub:openai/whisper-tiny.en"
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no weights"):
        model_fingerprint(tmp_path / "empty")


# --------------------------------------------------------------------------------------------------
# distil-import-model
# --------------------------------------------------------------------------------------------------


def test_import_model_function(tiny_en_dir, model_cache):
    assert import_model(teacher_cfg("tiny_en"), models_root=model_cache) == tiny_en_dir
    with pytest.raises(ValueError, match="`out_dir` applies to `ct2_dir`"):
        import_model(teacher_cfg("tiny_en"), out="/tmp/x")


def test_import_model_cli_converts_a_ct2_dir(tiny_en_dir, tmp_path):
    """`distil-import-model ct2_dir=... out_dir=...` on the bundled tiny.en gives the same weights as the teacher."""
    ct2_dir = ct2_reader.packaged_source("tiny.en").model_files[0].parent
    out = tmp_path / "converted"
    env = {**os.environ, "DISTIL_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "distil.import_model", f"ct2_dir={ct2_dir}", f"out_dir={out}"],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == str(out)
    assert is_complete(out)
    assert model_fingerprint(out) == model_fingerprint(tiny_en_dir)
    assert list((tmp_path / "home" / "runs" / "import_model").glob("*/config.yaml"))  # run info recorded
