"""Export a Hugging Face Whisper directory as ONNX graphs that ONNX Runtime (optimum's
`ORTModelForSpeechSeq2Seq`) and transformers.js load (`distil-export format=onnx`).

The layout of `out`, that of the Hub's ONNX Whisper models:

    config.json, generation_config.json, preprocessor_config.json, tokenizer files   (the source's own)
    onnx/encoder_model<suffix>.onnx, onnx/decoder_model_merged<suffix>.onnx         (+ *.onnx_data when large)
    distil_export.json                                                               (what was exported)

with <suffix> "" for float32, "_fp16" for float16 and "_int8" for int8 (transformers.js's `dtype` names them
so). The graphs are written by optimum-onnx's exporter (traced from transformers' Whisper and checked against
it); int8 is ONNX Runtime's dynamic quantization of the matrix products, float16 its float16 converter.

optimum-onnx pins transformers<4.58, distil runs transformers 5: the conversion runs in a child process whose
path puts the exporter's own packages first (`make setup` installs them into `<venv>/optimum-onnx`; see
exporter_env). As for CTranslate2, the export is built in a hidden sibling and renamed into place complete,
and exporting the same model and quantization again does nothing.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from distil.utils.io import write_json_atomic
from distil.whisper.ct2_export import (
    EXPORT_INFO,
    ExportInputError,
    check_output,
    check_whisper_dir,
    copy_evaluation_files,
    export_spec,
    write_export,
)

log = logging.getLogger(__name__)

EXPORT_FORMAT = "onnx"
QUANTIZATIONS = ("float32", "float16", "int8")  # the first, exact, is the default
# The exporter's packages, pinned together (optimum-onnx 0.1.0 needs transformers<4.58 and optimum 2.1).
EXPORTER_DIR = Path(sys.prefix) / "optimum-onnx"


def check_quantization(quantization: str) -> None:
    """One of QUANTIZATIONS, and the exporter installed (without it no quantization can be written)."""
    if quantization not in QUANTIZATIONS:
        raise ExportInputError(
            f"quantization={quantization!r} is not an ONNX export type: use one of {list(QUANTIZATIONS)}"
        )
    exporter_env()


def check_model(source: Path) -> None:
    """Any complete Whisper directory: optimum exports every Whisper size (large ones with external weights)."""
    check_whisper_dir(source)


def exporter_env() -> dict[str, str]:
    """The environment of the child process that runs optimum-onnx: its packages (`EXPORTER_DIR`) first on
    the path, unless optimum-onnx is installed in distil's own environment (a release for transformers 5)."""
    env = dict(os.environ)
    if EXPORTER_DIR.is_dir():
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(EXPORTER_DIR), env.get("PYTHONPATH")) if p)
        return env
    try:
        importlib.metadata.version("optimum-onnx")
    except importlib.metadata.PackageNotFoundError:
        raise ExportInputError(
            f"format=onnx needs optimum-onnx, installed by `make setup` into {EXPORTER_DIR} (it pins "
            "transformers<4.58, so it lives beside distil's environment): run `make setup`"
        ) from None
    return env


def run_worker(*args: str | Path) -> str:
    """`python -m distil.whisper.onnx_worker <args>` in the exporter's environment; the last line it prints
    (its result: the libraries may print before it). A failure carries the worker's last lines."""
    proc = subprocess.run(
        [sys.executable, "-m", "distil.whisper.onnx_worker", *map(str, args)],
        env=exporter_env(),
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"the ONNX exporter failed (exit {proc.returncode}):\n{tail}")
    return proc.stdout.strip().splitlines()[-1]


def export(
    source: Path, out: Path, quantization: str, force: bool = False, source_name: str | None = None
) -> Path:
    """Write `source` (a Hugging Face Whisper directory) into `out` as ONNX graphs of `quantization`; a
    complete export of the same weights and quantization is kept as it is, another one replaced only if `force`."""
    check_quantization(quantization)
    source = check_whisper_dir(source)
    out = Path(out).expanduser()
    check_output(out, EXPORT_FORMAT, "an ONNX")
    spec = {**export_spec(source, quantization), "format": EXPORT_FORMAT, "version": 1}
    info = {
        "source": str(source_name or source),
        "source_fingerprint": spec["source_fingerprint"],
        "quantization": quantization,
    }
    return write_export(
        out, spec, lambda tmp: _convert(source, tmp, quantization, info), force, source_name or source
    )


def _convert(source: Path, tmp: Path, quantization: str, info: dict) -> None:

    log.info("exporting %s to ONNX (%s) ...", source, quantization)
    copy_evaluation_files(source, tmp)  # what ORTModelForSpeechSeq2Seq, transformers.js and distil read
    versions = json.loads(run_worker("export", source, tmp, quantization))
    write_json_atomic(
        tmp / EXPORT_INFO,
        {**info, "files": sorted(p.name for p in (tmp / "onnx").iterdir()), **versions},
    )
