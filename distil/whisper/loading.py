"""Loading a Whisper model to run: a Hugging Face directory or Hub id, or a distil training checkpoint on
top of its student directory; errors name the path and the fix.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from distil.utils.errors import InputError
from distil.whisper.generation import (
    Guards,
    Transcript,
    decoder_macs_per_token,
    generation_kwargs,
    is_multilingual,
    transcribe,
)
from distil.whisper.models import load_whisper

log = logging.getLogger(__name__)


class ModelLoadError(InputError):
    """A model, checkpoint or processor that cannot be loaded; the message names the path and the fix."""


@dataclass
class LoadedModel:
    model: Any
    processor: Any
    name: str
    path: str
    kind: str  # "hf" (a transformers directory or Hub id) or "checkpoint" (a training .ckpt)

    def info(self) -> dict:
        cfg = self.model.config
        return {
            "name": self.name,
            "path": self.path,
            "kind": self.kind,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "encoder_layers": cfg.encoder_layers,
            "decoder_layers": cfg.decoder_layers,
            "decoder_macs_per_token": decoder_macs_per_token(cfg),
            "multilingual": is_multilingual(self.model),
            "dtype": str(self.model.dtype).replace("torch.", ""),
            "size_bytes": weights_size_bytes(self.path) if self.kind == "hf" else None,
        }

    def transcribe(
        self,
        waves,
        batch_size: int,
        language: str | None,
        task: str | None,
        max_new_tokens: int,
        num_beams: int = 1,
        guards: Guards | None = None,
    ) -> list[Transcript]:
        """Short-form transcripts in input order, under `guards` (the interface every evaluation backend has)."""
        gen = generation_kwargs(self.model, language, task, max_new_tokens, num_beams)
        return transcribe(self.model, self.processor, waves, int(batch_size), gen, guards)


def pick_device(device: str | None = "auto") -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype in (None, "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def load_processor(path: str):
    from transformers import WhisperProcessor

    try:
        processor = WhisperProcessor.from_pretrained(path)
    except (OSError, ValueError, TypeError) as err:
        raise ModelLoadError(
            f"model directory {path} has no usable Whisper processor (tokenizer + feature extractor files): {err}. "
            "Save one next to the weights (`WhisperProcessor.from_pretrained(teacher).save_pretrained(dir)`) "
            "or re-create the student with `distil.init_student`, which copies it from the teacher."
        ) from err
    return processor


def _hf_path(model_cfg: DictConfig | dict, models_root: str | None = None) -> str:
    """Local directory or Hub id of an HF model config (imports/builds bundled teachers on first use)."""
    from distil.whisper.models import ModelConfigError, resolve_model

    try:
        return str(resolve_model(model_cfg, models_root))
    except ModelConfigError as err:
        raise ModelLoadError(str(err)) from err


def is_checkpoint(model_cfg: DictConfig | dict) -> bool:
    """A model config of a training checkpoint (model=checkpoint, or a `path` that is a .ckpt file)."""
    from distil.whisper.models import ModelConfigError
    from distil.whisper.sources import TrainingCheckpoint, model_source

    if str(model_cfg.get("path") or "").endswith(".ckpt"):
        return True
    try:
        return isinstance(model_source(model_cfg), TrainingCheckpoint)
    except ModelConfigError as err:
        raise ModelLoadError(str(err)) from err


def _read_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # Lightning stores hyper-parameters (OmegaConf objects) that weights_only rejects
        return torch.load(path, map_location="cpu", weights_only=False)


def student_state_from_checkpoint(checkpoint: dict, path: str, prefix: str = "student.") -> dict:
    """The student's weights from a Lightning checkpoint (keys `student.*`), prefix removed."""
    state = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state, dict):
        raise ModelLoadError(f"checkpoint {path} holds no state_dict")
    out = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not out:
        sample = ", ".join(list(state)[:3])
        raise ModelLoadError(
            f"checkpoint {path} has no '{prefix}*' weights (first keys: {sample}): it is not a distil "
            "training checkpoint; pass a Whisper model directory as model.path instead"
        )
    return out


def load_checkpoint_into(model, state: dict, path: str, base: str) -> None:
    """Load `state` into `model`, explaining an architecture mismatch instead of a tensor-size error."""
    own = model.state_dict()
    tied = {"proj_out.weight"}  # tied to the decoder token embedding, often not saved
    missing = [k for k in own if k not in state and k not in tied]
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in state
        if k in own and state[k].shape != own[k].shape
    ]
    if missing or unexpected or wrong:
        raise ModelLoadError(
            f"checkpoint {path} does not fit the architecture of model.base={base} "
            f"(missing {len(missing)} keys e.g. {missing[:3]}, unexpected {len(unexpected)} e.g. {unexpected[:3]}, "
            f"shape mismatches {wrong[:3]}). model.base must be the student directory this checkpoint was "
            "trained from (same layer counts and width)."
        )
    model.load_state_dict(state, strict=False)
    model.tie_weights()


def model_from_checkpoint(ckpt: str | Path, base: str):
    """The student trained in a distil Lightning checkpoint, built on its student directory `base` (fp32, CPU)."""
    from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration

    state = student_state_from_checkpoint(_read_checkpoint(Path(ckpt)), str(ckpt))
    model = WhisperForConditionalGeneration(WhisperConfig.from_pretrained(base))
    try:
        model.generation_config = GenerationConfig.from_pretrained(base)
    except OSError:
        log.warning("no generation_config.json in %s; using the default", base)
    load_checkpoint_into(model, state, str(ckpt), base)
    return model


WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.onnx", "*.onnx_data")


def weights_size_bytes(path: str | Path) -> int | None:
    """Bytes of the model files in directory `path` (weights, not tokenizer or configs); None for a Hub id."""
    folder = Path(str(path)).expanduser()
    if not folder.is_dir():
        return None
    return sum(f.stat().st_size for pattern in WEIGHT_FILES for f in folder.rglob(pattern) if f.is_file())


def load_model(
    model_cfg: DictConfig | dict,
    device: str | None = "auto",
    dtype: str | None = "auto",
    models_root: str | None = None,
) -> LoadedModel:
    """Load the model to evaluate: an HF Whisper directory / Hub id, or a training checkpoint.

    A checkpoint (`model.path=...ckpt`) needs `model.base`: the HF directory with the matching config and
    processor (the student directory the run started from).
    """

    model_cfg = (
        OmegaConf.create(OmegaConf.to_container(model_cfg, resolve=True))
        if isinstance(model_cfg, DictConfig)
        else OmegaConf.create(dict(model_cfg))
    )
    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    path = model_cfg.get("path")
    if is_checkpoint(model_cfg):  # model=checkpoint
        ckpt = Path(str(path)).expanduser()
        if not ckpt.is_file():
            raise ModelLoadError(f"checkpoint {ckpt} does not exist")
        base = model_cfg.get("base")
        if not base:
            raise ModelLoadError(
                f"checkpoint {ckpt} needs model.base=<student HF directory> for its config and processor"
            )
        base = _hf_path({"path": base}, models_root)
        processor = load_processor(base)
        model = model_from_checkpoint(ckpt, base)
        name, kind, where = model_cfg.get("name") or ckpt.stem, "checkpoint", str(ckpt)
    else:
        where = _hf_path(model_cfg, models_root)
        processor = load_processor(where)
        try:
            model = load_whisper(where)
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"cannot load a Whisper model from {where}: {err}") from err
        name, kind = model_cfg.get("name") or Path(where).name, "hf"
    model = model.to(dev, torch_dtype).eval()
    return LoadedModel(model, processor, str(name), where, kind)
