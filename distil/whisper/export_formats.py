"""The formats `distil-export format=<name>` writes, each a module imported only when that format is used.

Every format module provides the same four names:

- `QUANTIZATIONS: tuple[str, ...]`: the accepted `quantization=` values, the first the format's default;
- `check_quantization(quantization: str) -> None`: raises ExportInputError (one line naming `quantization` and
  the accepted values) for a quantization the format's runtime lacks;
- `check_model(source: Path) -> None`: raises ExportInputError when the format cannot hold this Hugging Face
  Whisper directory (before anything is written);
- `export(source: Path, out: Path, quantization: str, force: bool = False) -> Path`: converts `source` into
  `out` atomically (built in a temporary sibling, then renamed: an interrupted export leaves the previous one
  intact), a no-op when `out` already holds the same source and quantization unless `force`; `out` also
  carries what distil needs to evaluate it (tokenizer, preprocessor and generation config).

A module may accept more keyword arguments (`options`): CTranslate2's `device` (from the stage's config), and
`source_name`, what its record names as the source when that is a temporary directory (a checkpoint's).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from distil.whisper.ct2_export import ExportInputError


@dataclass(frozen=True)
class ExportFormat:
    name: str
    suffix: str  # the default output directory is <model>-<suffix>-<quantization>
    module_path: str
    title: str  # "<title> export" in messages
    options: tuple[str, ...] = ()  # extra keyword arguments its check_quantization/export take

    @property
    def module(self) -> ModuleType:
        """The format's module, imported now: a format's libraries load only when it is used."""
        return importlib.import_module(self.module_path)


FORMATS = {
    f.name: f
    for f in (
        ExportFormat(
            "ctranslate2",
            "ct2",
            "distil.whisper.ct2_export",
            "a CTranslate2",
            ("device", "source_name"),
        ),
        ExportFormat(
            "onnx",
            "onnx",
            "distil.whisper.onnx_export",
            "an ONNX",
            ("source_name",),
        ),
        ExportFormat("ggml", "ggml", "distil.whisper.ggml_export", "a ggml"),  # whisper.cpp
        ExportFormat(
            "openai", "openai", "distil.whisper.openai_export", "an OpenAI-format"
        ),  # openai-whisper
    )
}


def export_format(name: str) -> ExportFormat:
    """The registered format `name`; anything else is one ExportInputError line naming the known ones."""
    if name not in FORMATS:
        raise ExportInputError(f"format={name!r} is not an export format: use one of {list(FORMATS)}")
    return FORMATS[name]


def load_module(fmt: ExportFormat) -> ModuleType:
    """`fmt`'s module; a format whose module or libraries are not installed here is one line, not a traceback."""
    try:
        return fmt.module
    except ImportError as err:
        raise ExportInputError(
            f"format={fmt.name} is not available in this installation ({err}): install distil with the "
            f"libraries it needs (`make setup`), or choose another of {list(FORMATS)}"
        ) from err
