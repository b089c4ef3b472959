"""Student initialisation: a teacher with fewer layers, weights copied from "maximally spaced" layers.

The student keeps the teacher's width, heads, vocabulary, convolutions, embeddings, final layer norms
and (tied) output projection; only the number of encoder and/or decoder layers changes. Layer `i` of the
student is a copy of teacher layer `map[i]`, where `map` keeps the first and the last layer and spreads
the rest evenly between them (Distil-Whisper: 32 -> 2 keeps layers 0 and 31).

This module is cheap to import (numpy + omegaconf only) so that any Hydra entry point can use the
`${student_name:...}` resolver registered at the bottom; torch/transformers load lazily.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import ListConfig, OmegaConf

from distil.utils.errors import ConfigError
from distil.utils.io import atomic_directory

STUDENT_INFO_FILE = "distil_student.json"
# Bump when the saved layout or the copy rule changes, so stale students are not silently reused.
INIT_FORMAT_VERSION = 1

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

LayerSpec = int | Sequence[int] | None


def layer_map(n_teacher: int, n_student: int) -> list[int]:
    """Teacher layer index copied into each student layer: first and last kept, the rest evenly spaced.

    `numpy.linspace(0, n_teacher - 1, n_student, dtype=int)` with the last entry forced to
    `n_teacher - 1` (32 -> 2: [0, 31]; 32 -> 4: [0, 10, 20, 31]; n -> n: identity).
    """
    if isinstance(n_teacher, bool) or isinstance(n_student, bool):
        raise ConfigError("layer counts must be integers, not booleans")
    n_teacher, n_student = int(n_teacher), int(n_student)
    if n_teacher < 1:
        raise ConfigError(f"the teacher must have at least one layer, got n_teacher={n_teacher}")
    if n_student < 1:
        raise ConfigError(f"a student needs at least one layer, got n_student={n_student}")
    if n_student > n_teacher:
        raise ConfigError(
            f"cannot build a student with {n_student} layers from a teacher with {n_teacher}: "
            "students copy teacher layers, so use at most the teacher's layer count"
        )
    mapping = np.linspace(0, n_teacher - 1, n_student, dtype=int).tolist()
    # linspace's float rounding can land one short of the end; the last layer must always be kept.
    mapping[-1] = n_teacher - 1
    return mapping


def resolve_layers(spec: LayerSpec, n_teacher: int, what: str = "layers") -> list[int]:
    """Turn a layer setting into an explicit list of teacher layer indices.

    `None` keeps every teacher layer; an int `N` is a count (`layer_map(n_teacher, N)`); a list names
    the teacher layers to copy, in order, with negative indices counted from the end (`-1` = last).
    """
    if spec is None:
        return list(range(n_teacher))
    if isinstance(spec, ListConfig):
        spec = OmegaConf.to_container(spec)
    if isinstance(spec, bool):
        raise ConfigError(f"{what}: expected a layer count or a list of layer indices, got {spec!r}")
    if isinstance(spec, (int, np.integer)):
        return layer_map(n_teacher, int(spec))
    if isinstance(spec, str) or not isinstance(spec, Sequence):
        raise ConfigError(f"{what}: expected a layer count or a list of layer indices, got {spec!r}")
    if len(spec) == 0:
        raise ConfigError(f"{what}: the list of layers to copy is empty; a student needs at least one layer")
    out = []
    for raw in spec:
        if isinstance(raw, bool) or not isinstance(raw, (int, np.integer)):
            raise ConfigError(f"{what}: layer indices must be integers, got {raw!r} in {list(spec)}")
        idx = int(raw)
        if not -n_teacher <= idx < n_teacher:
            raise ConfigError(
                f"{what}: layer index {idx} is out of range for a teacher with {n_teacher} layers "
                f"(valid: 0..{n_teacher - 1} or -{n_teacher}..-1)"
            )
        out.append(idx % n_teacher)
    duplicates = sorted({i for i in out if out.count(i) > 1})
    if duplicates:
        raise ConfigError(
            f"{what}: teacher layer(s) {duplicates} are listed more than once in {list(spec)} "
            f"(after normalising negative indices: {out}); each teacher layer can be copied once"
        )
    return out


def student_name(encoder_layers: LayerSpec = None, decoder_layers: LayerSpec = 2) -> str:
    """Short, path-safe name derived from the layer settings, e.g. `dec2`, `enc2-dec2`, `dec_0_m1`.

    An int is a count (`dec2`), a list names explicit layers (`dec_0_31`; `m1` is -1); the full
    encoder (None) is left out of the name. Different settings therefore never share an output path.
    """

    def part(prefix: str, spec: LayerSpec) -> str:
        if isinstance(spec, ListConfig):
            spec = OmegaConf.to_container(spec)
        if isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
            return f"{prefix}{int(spec)}"
        if isinstance(spec, Sequence) and not isinstance(spec, str):
            return prefix + "".join(f"_m{-int(i)}" if int(i) < 0 else f"_{int(i)}" for i in spec)
        raise ConfigError(f"{prefix}oder_layers: expected a layer count or a list of indices, got {spec!r}")

    parts = [] if encoder_layers is None else [part("enc", encoder_layers)]
    if decoder_layers is None:
        parts.append("decfull")
    else:
        parts.append(part("dec", decoder_layers))
    return "-".join(parts)


OmegaConf.register_new_resolver("student_name", student_name, replace=True)


def _remap_alignment_heads(heads: Any, decoder_map: list[int]) -> list[list[int]] | None:
    """Alignment heads ([layer, head] pairs used for word timestamps) re-indexed for the student.

    Heads in teacher layers that were not copied are dropped; None if none survive.
    """
    if heads is None:
        return None
    where = {t: s for s, t in enumerate(decoder_map)}
    return [[where[layer], head] for layer, head in heads if layer in where] or None


def _local_teacher(teacher: str | Path) -> Path:
    """A local directory for the teacher; a Hub id (e.g. openai/whisper-large-v3) is downloaded once."""
    local = Path(teacher).expanduser()
    if local.exists() or not _HUB_ID.match(str(teacher)):
        return local
    try:
        from huggingface_hub import snapshot_download

        # Config, tokenizer, feature extractor and safetensors weights: not the Flax/TF/.bin copies.
        return Path(snapshot_download(str(teacher), allow_patterns=["*.json", "*.txt", "*.safetensors"]))
    except Exception as err:  # offline, unknown repo, ...: say what was tried
        raise FileNotFoundError(
            f"teacher {teacher!r} is neither a local directory nor a downloadable Hub model ({err})"
        ) from err


def _student_info(teacher_dir: Path, encoder_map: list[int], decoder_map: list[int], config) -> dict:
    # The same fingerprint the pseudo-labels record, so training can tell which teacher a student is from.
    from distil.whisper.models import model_fingerprint

    return {
        "format_version": INIT_FORMAT_VERSION,
        "teacher": str(teacher_dir),
        "teacher_fingerprint": model_fingerprint(teacher_dir),
        "teacher_encoder_layers": config.encoder_layers,
        "teacher_decoder_layers": config.decoder_layers,
        "encoder_layer_map": encoder_map,
        "decoder_layer_map": decoder_map,
    }


def _same_settings(info: dict, wanted: dict) -> bool:
    # The teacher path may legitimately differ (moved cache); identity is the fingerprint + maps.
    keys = [k for k in wanted if k != "teacher"]
    return all(info.get(k) == wanted[k] for k in keys)


def is_complete_student(out_dir: str | Path) -> bool:
    """True if `out_dir` is a finished student directory (the info file is written last)."""
    d = Path(out_dir)
    return (d / STUDENT_INFO_FILE).is_file() and (d / "config.json").is_file()


def build_student_state_dict(
    teacher_state: dict, encoder_map: list[int], decoder_map: list[int]
) -> dict[str, Any]:
    """The student's weights: non-layer tensors as-is, layer `i` taken from teacher layer `map[i]`."""
    prefixes = {"model.encoder.layers.": encoder_map, "model.decoder.layers.": decoder_map}
    out = {}
    for key, value in teacher_state.items():
        for prefix, mapping in prefixes.items():
            if key.startswith(prefix):
                teacher_idx, rest = key[len(prefix) :].split(".", 1)
                for student_idx, t in enumerate(mapping):
                    if t == int(teacher_idx):
                        out[f"{prefix}{student_idx}.{rest}"] = value
                break
        else:
            out[key] = value
    return out


def init_student(
    teacher_dir: str | Path,
    out_dir: str | Path,
    encoder_layers: LayerSpec = None,
    decoder_layers: LayerSpec = 2,
    overwrite: bool = False,
    require_processor: bool = True,
) -> Path:
    """Create a student Whisper model from `teacher_dir` and save a complete HF directory at `out_dir`.

    `teacher_dir` is a local Hugging Face directory (or a Hub id, downloaded once).
    `encoder_layers`/`decoder_layers`: None keeps all teacher layers, an int is a layer count (maximally
    spaced copy, see `layer_map`), a list names teacher layers (negative indices allowed). The directory
    holds safetensors weights, config, generation config, tokenizer + feature extractor (from the
    teacher) and `distil_student.json` (teacher fingerprint and layer maps). Written to a temporary
    directory and renamed, so a directory that exists is complete. If a complete student with the
    same teacher and maps already exists it is reused; one with other settings is only replaced when
    `overwrite=True`.
    """
    import torch
    from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration

    teacher_dir = _local_teacher(teacher_dir)
    out_dir = Path(out_dir)
    if not (teacher_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"teacher directory {teacher_dir} has no config.json; pass a local Hugging Face Whisper "
            "directory (e.g. from distil.whisper.models.resolve_model)"
        )
    config = WhisperConfig.from_pretrained(teacher_dir)
    if config.model_type != "whisper":
        raise ConfigError(f"{teacher_dir} holds a {config.model_type!r} model, not Whisper")
    encoder_map = resolve_layers(encoder_layers, config.encoder_layers, "encoder_layers")
    decoder_map = resolve_layers(decoder_layers, config.decoder_layers, "decoder_layers")
    info = _student_info(teacher_dir.resolve(), encoder_map, decoder_map, config)

    def built_alike() -> bool:
        """A complete student of these settings is at `out_dir` (built earlier, or meanwhile by another job)."""
        if not is_complete_student(out_dir):
            return False
        return _same_settings(json.loads((out_dir / STUDENT_INFO_FILE).read_text()), info)

    if out_dir.exists() and not overwrite:
        if built_alike():
            return out_dir
        raise FileExistsError(
            f"{out_dir} already exists but is not a student built from {teacher_dir} with encoder "
            f"layers {encoder_map} and decoder layers {decoder_map}; delete it or pass "
            "overwrite=true to replace it"
        )

    processor = None
    try:
        from transformers import WhisperProcessor

        processor = WhisperProcessor.from_pretrained(teacher_dir)
    except (OSError, ValueError, TypeError) as err:
        if require_processor:
            raise FileNotFoundError(
                f"teacher directory {teacher_dir} has no usable tokenizer/feature extractor ({err}); "
                "the student must be loadable by transformers.pipeline, so import the teacher with its "
                "processor (distil.import_model) or pass require_processor=False"
            ) from err

    teacher = WhisperForConditionalGeneration.from_pretrained(teacher_dir, dtype=torch.float32)
    student_config = WhisperConfig.from_pretrained(teacher_dir)
    student_config.encoder_layers = len(encoder_map)
    student_config.decoder_layers = len(decoder_map)
    # WhisperConfig keeps num_hidden_layers as an alias of encoder_layers; keep them in step.
    if hasattr(student_config, "num_hidden_layers"):
        student_config.num_hidden_layers = len(encoder_map)
    # Built on the meta device: every weight is about to be replaced, and randomly initialising a
    # large-v3 sized encoder first would cost seconds of CPU and a second copy of its memory.
    with torch.device("meta"):
        student = WhisperForConditionalGeneration(student_config)
    state = build_student_state_dict(teacher.state_dict(), encoder_map, decoder_map)
    # proj_out is tied to the token embedding; state_dict may or may not list it separately.
    missing, unexpected = student.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if k != "proj_out.weight"]
    if missing or unexpected:
        raise RuntimeError(
            f"student/teacher weights do not line up: missing {missing}, unexpected {unexpected}"
        )
    student.tie_weights()
    still_meta = [name for name, t in student.state_dict().items() if t.is_meta]
    if still_meta:
        raise RuntimeError(f"student weights not copied from the teacher: {still_meta}")

    try:
        generation_config = GenerationConfig.from_pretrained(teacher_dir)
    except OSError:
        generation_config = GenerationConfig.from_model_config(config)
    heads = _remap_alignment_heads(getattr(generation_config, "alignment_heads", None), decoder_map)
    if getattr(generation_config, "alignment_heads", None) is not None:
        n_dec, n_heads = len(decoder_map), student_config.decoder_attention_heads
        generation_config.alignment_heads = heads or [
            [layer, head] for layer in range(n_dec // 2, n_dec) for head in range(n_heads)
        ]
    student.generation_config = generation_config

    # Jobs of one sweep build the same student at once: the first to finish keeps its directory, which the
    # others may already be loading (replacing it would pull it from under them).
    with atomic_directory(out_dir, keep_existing=lambda: built_alike() and not overwrite) as tmp:
        student.save_pretrained(tmp, safe_serialization=True)
        if processor is not None:
            processor.save_pretrained(tmp)
        # Written last: its presence marks the directory as complete.
        (tmp / STUDENT_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return out_dir


def encoder_is_full_copy(student_dir: str) -> bool | None:
    """Whether an initialised student kept every teacher encoder layer (None: not a distil student)."""
    p = Path(student_dir) / STUDENT_INFO_FILE
    if not p.is_file():
        return None
    info = json.loads(p.read_text())
    return list(info["encoder_layer_map"]) == list(range(int(info["teacher_encoder_layers"])))
