"""Bad input, stage by stage: each case fails before any work, with one message naming the file, column or
key and the fix, and leaves nothing on disk that looks complete."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from distil.whisper.models import ModelConfigError, check_model_path, load_whisper


@pytest.fixture
def model_copy(tiny_random_dir, tmp_path) -> Path:
    out = tmp_path / "model"
    shutil.copytree(tiny_random_dir, out)
    return out


def test_a_non_whisper_directory_is_refused_as_a_teacher(model_copy):
    config = json.loads((model_copy / "config.json").read_text())
    (model_copy / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    with pytest.raises(ModelConfigError, match=rf"{model_copy} is not a Whisper model.*model_type='bert'"):
        check_model_path(str(model_copy))


def test_weights_that_do_not_fit_the_config_are_refused(model_copy):
    check_model_path(str(model_copy))  # the intact copy is accepted
    weights = model_copy / "model.safetensors"
    state = load_file(weights)
    dropped = next(k for k in state if "decoder.layers.1." in k)
    save_file(
        {k: v for k, v in state.items() if k != dropped} | {"bert.pooler.weight": state[dropped]}, weights
    )
    with pytest.raises(ModelConfigError, match=r"do not fit.*missing keys.*unexpected keys"):
        load_whisper(str(model_copy))


def test_a_foreign_tokenizer_is_refused(model_copy, base_dir):
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "added_tokens.json"):
        if (Path(base_dir) / name).is_file():
            shutil.copy(Path(base_dir) / name, model_copy / name)  # the multilingual vocabulary
    with pytest.raises(ModelConfigError, match="tokenizer in .* does not belong to its model"):
        check_model_path(str(model_copy))


def test_no_generation_config_is_refused(model_copy):
    (model_copy / "generation_config.json").unlink()
    with pytest.raises(ModelConfigError, match="no generation_config.json"):
        check_model_path(str(model_copy))
    (model_copy / "model.safetensors").unlink()
    with pytest.raises(ModelConfigError, match="no weights"):
        check_model_path(str(model_copy))
