"""Export a Hugging Face Whisper directory as a CTranslate2 model directory that faster-whisper loads.

The weights are written by ctranslate2's own `TransformersConverter` (model.bin, config.json with the
suppressed tokens, language ids and alignment heads taken from generation_config.json, vocabulary.json);
tokenizer.json is copied beside them and preprocessor_config.json written from the source's feature extractor,
as `faster_whisper.WhisperModel(dir)` reads both. Everything is checked before any work, and the export is built in a hidden temporary
sibling and moved into place complete (`distil.utils.io.build_directory`); its completeness marker records
the source's weight fingerprint and the quantisation, so exporting the same model again is a no-op.

It is the `ctranslate2` entry of `distil.whisper.export_formats` (QUANTIZATIONS, check_quantization,
check_model, export), and holds what every format shares: ExportInputError, the output checks.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from distil.utils.errors import InputError
from distil.utils.io import COMPLETE_MARKER, build_directory, is_complete, read_json, write_json_atomic
from distil.whisper.generation import is_multilingual_vocabulary
from distil.whisper.models import model_fingerprint

log = logging.getLogger(__name__)

EXPORT_FORMAT = "ctranslate2"
EXPORT_FORMAT_VERSION = 1
EXPORT_INFO = "distil_export.json"  # what was exported: source, fingerprint, quantisation, versions
FEATURE_FILES = ("preprocessor_config.json", "processor_config.json")  # either holds the feature extractor
# ctranslate2's ACCEPTED_MODEL_TYPES (a test keeps them equal), written out so that listing them imports
# nothing; the first, int8, is the default.
QUANTIZATIONS = (
    "int8",
    "int8_float32",
    "int8_float16",
    "int8_bfloat16",
    "int16",
    "float16",
    "bfloat16",
    "float32",
)


class ExportInputError(InputError):
    """A model, quantisation or output directory the export cannot use; the message names it and the fix."""


def quantizations() -> tuple[str, ...]:
    """Every weight type ctranslate2's converter writes (its own list)."""
    from ctranslate2.specs.model_spec import ACCEPTED_MODEL_TYPES

    return tuple(ACCEPTED_MODEL_TYPES)


def restore_float_mode() -> None:
    """Turn flush-to-zero off again: CTranslate2 enables it on the calling thread, which changes later PyTorch
    float results (a tiny random teacher built afterwards had other weights). Call after any CTranslate2 work."""
    import torch

    torch.set_flush_denormal(False)


def check_quantization(quantization: str, device: str = "cpu") -> str:
    """`quantization` must be one the converter writes and `device` on this machine runs."""
    import ctranslate2

    if quantization not in quantizations():
        raise ExportInputError(
            f"quantization={quantization!r} is not a CTranslate2 weight type: use one of {list(quantizations())}"
        )
    try:
        supported = set(ctranslate2.get_supported_compute_types(device))
    except (RuntimeError, ValueError) as err:
        raise ExportInputError(
            f"device={device!r}: CTranslate2 cannot run on it here ({err}); export with device=cpu"
        ) from err
    if quantization not in supported:
        raise ExportInputError(
            f"quantization={quantization} cannot run on this machine's {device} "
            f"(it supports {sorted(supported)}): choose one of those, or export on a machine that runs "
            f"{quantization} (float16 types need a GPU: device=cuda)"
        )
    return quantization


def check_whisper_dir(path: str | Path, target: str = "CTranslate2") -> Path:
    """A local Hugging Face Whisper directory with weights, tokenizer.json, preprocessor_config.json and
    generation settings the export keeps (language/task tokens, alignment heads that fit the decoder);
    `target` names the format in the messages (every export reads this same directory)."""
    d = Path(path).expanduser()
    if not (d / "config.json").is_file():
        raise ExportInputError(
            f"{d} is not a Hugging Face model directory (no config.json): export a directory written by "
            "save_pretrained (a distil student, `distil-import-model` teacher or `<run dir>/best`), or a "
            "training checkpoint with model=checkpoint model.path=<.ckpt> model.base=<student directory>"
        )
    config = read_json(d / "config.json")
    if config.get("model_type") != "whisper":
        raise ExportInputError(
            f"{d} holds a {config.get('model_type')!r} model, not Whisper (config.json model_type): "
            f"only Whisper models export to {target}"
        )
    missing = [] if (d / "tokenizer.json").is_file() else ["tokenizer.json"]
    if not any((d / f).is_file() for f in FEATURE_FILES):
        missing.append("preprocessor_config.json")
    if not any(d.glob("*.safetensors")) and not any(d.glob("pytorch_model*.bin")):
        missing.insert(0, "weights (*.safetensors)")
    if missing:
        raise ExportInputError(
            f"Whisper directory {d} lacks {', '.join(missing)}, which the {target} export needs: save the "
            "model and its WhisperProcessor into it (`model.save_pretrained(dir)`, "
            "`WhisperProcessor.from_pretrained(teacher).save_pretrained(dir)`)"
        )
    generation = read_json(d / "generation_config.json") if (d / "generation_config.json").is_file() else {}
    if is_multilingual_vocabulary(config["vocab_size"]) and not generation.get("lang_to_id"):
        raise ExportInputError(
            f"{d} is a multilingual Whisper (vocab_size {config['vocab_size']}) but its generation_config.json "
            "has no lang_to_id, so the export would lose its language tokens: copy generation_config.json "
            "from the teacher it was made from"
        )
    layers, heads = config["decoder_layers"], config["decoder_attention_heads"]
    bad = [
        h for h in generation.get("alignment_heads") or [] if not (0 <= h[0] < layers and 0 <= h[1] < heads)
    ]
    if bad:
        raise ExportInputError(
            f"{d}: generation_config.json alignment_heads {bad} do not exist in a decoder of {layers} layers x "
            f"{heads} heads (word timestamps would read the wrong attention): fix or remove alignment_heads"
        )
    return d


def export_spec(
    source_dir: str | Path,
    quantization: str,
    export_format: str = EXPORT_FORMAT,
    version: int = EXPORT_FORMAT_VERSION,
) -> dict:
    """What identifies an export: the format, the source's weights and the quantisation (the completeness
    marker's spec)."""
    return {
        "format": export_format,
        "version": version,
        "source_fingerprint": model_fingerprint(source_dir),
        "quantization": quantization,
    }


def is_export(directory: str | Path, fmt: str = EXPORT_FORMAT) -> bool:
    """Whether `directory` is a complete export of format `fmt` written by distil (of any model)."""
    marker = Path(directory) / COMPLETE_MARKER
    try:
        return read_json(marker)["spec"]["format"] == fmt
    except (OSError, ValueError, KeyError, TypeError):
        return False


def check_output(out: str | Path, fmt: str = EXPORT_FORMAT, title: str = "a CTranslate2") -> None:
    """An existing non-empty `out` must be a distil export of format `fmt` (`title` names it in the message):
    anything else is never overwritten."""
    out = Path(out)
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not is_export(out, fmt):
        raise ExportInputError(
            f"output directory {out} exists and is not {title} export written by distil: "
            "choose another out_dir=<directory> (nothing there is overwritten)"
        )


def is_done(out: Path, spec: dict, force: bool, source_name: str) -> bool:
    """Whether `out` already holds the export `spec` describes (then there is nothing to do); refuses, before
    any work, an export of another model or quantisation there unless `force` (it is then replaced)."""
    if is_complete(out, spec):
        log.info("%s is already the %s export of %s", out, spec["quantization"], source_name)
        return True
    if is_export(out, spec["format"]) and not force:
        previous = read_json(out / COMPLETE_MARKER)["spec"]
        raise ExportInputError(
            f"output directory {out} is the {previous.get('quantization')} export of another model "
            f"({previous.get('source_fingerprint')}): choose another out_dir=<directory> or pass force=true "
            "to replace it"
        )
    return False


def export_ct2(
    source_dir: str | Path,
    out: str | Path,
    quantization: str,
    device: str = "cpu",
    force: bool = False,
    source_name: str | None = None,
) -> Path:
    """Write `source_dir` (a Hugging Face Whisper directory) into `out` as a CTranslate2 model with
    `quantization` weights; a complete export of the same weights and quantisation is reused as it is.

    `force` replaces an existing distil export of another model or quantisation; `source_name` is what
    distil_export.json records as the source (default: `source_dir`).
    """
    check_quantization(quantization, device)
    source = check_whisper_dir(source_dir)
    out = Path(out).expanduser()
    check_output(out)
    spec = export_spec(source, quantization)
    info = {
        "source": str(source_name or source),
        "source_fingerprint": spec["source_fingerprint"],
        "quantization": quantization,
    }
    return write_export(
        out, spec, lambda tmp: _convert(source, tmp, quantization, device, info), force, source_name or source
    )


def write_export(out: Path, spec: dict, build, force: bool, source: str | Path) -> Path:
    """Build `out` with `build(tmp)` in a hidden sibling and move it into place complete (an interrupted export
    leaves the previous one intact), unless it already holds this export (`is_done`). Shared by every format."""
    if is_done(out, spec, force, str(source)):
        return out
    return build_directory(out, spec, build, replace=True)


# The interface of distil.whisper.export_formats: the stage calls these for format=ctranslate2.
check_model = check_whisper_dir


def export(
    source: Path,
    out: Path,
    quantization: str,
    force: bool = False,
    device: str = "cpu",
    source_name: str | None = None,
) -> Path:
    """`export_ct2` under the name every format module gives its export."""
    return export_ct2(source, out, quantization, device, force, source_name)


def _convert(source: Path, tmp: Path, quantization: str, device: str, info: dict) -> None:
    import ctranslate2
    import transformers
    from ctranslate2.converters import TransformersConverter

    log.info("converting %s to CTranslate2 (%s) ...", source, quantization)
    from transformers import WhisperFeatureExtractor

    converter = TransformersConverter(str(source), copy_files=["tokenizer.json"])
    converter.convert(str(tmp), quantization=quantization, force=True)
    # faster-whisper reads only preprocessor_config.json (transformers 5 may save processor_config.json).
    WhisperFeatureExtractor.from_pretrained(source).to_json_file(tmp / "preprocessor_config.json")
    # The converter takes alignment heads from generation_config.json, else the last half of the decoder's
    # heads: record which, since word timestamps depend on them.
    generation = source / "generation_config.json"
    own_heads = (read_json(generation).get("alignment_heads") if generation.is_file() else None) or None
    ct2_config = read_json(tmp / "config.json")
    # Load it once where it will run, so an export that does not load never appears complete.
    ctranslate2.models.Whisper(str(tmp), device=device, compute_type=quantization)
    restore_float_mode()
    write_json_atomic(
        tmp / EXPORT_INFO,
        {
            **info,
            "alignment_heads": ct2_config.get("alignment_heads"),
            "alignment_heads_from": "generation_config.json"
            if own_heads
            else "converter default (last half)",
            "languages": len(ct2_config.get("lang_ids") or []),
            "ctranslate2": ctranslate2.__version__,
            "transformers": transformers.__version__,
        },
    )


# What distil needs beside an export's weights to evaluate it (feature extractor, tokenizer, generation
# settings, the Hugging Face config the runtime's hyper-parameters came from): copied as they are.
EVALUATION_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "normalizer.json",
    "added_tokens.json",
    "special_tokens_map.json",
    *FEATURE_FILES,
)


def copy_evaluation_files(source: Path, out: Path) -> None:
    """Copy the source's config, tokenizer, feature extractor and generation files (those it has) into `out`,
    with preprocessor_config.json, the name every reader knows (transformers 5 may save processor_config.json)."""
    from transformers import WhisperFeatureExtractor

    for name in EVALUATION_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, out / name)
    if not (out / "preprocessor_config.json").is_file():
        WhisperFeatureExtractor.from_pretrained(source).to_json_file(out / "preprocessor_config.json")
