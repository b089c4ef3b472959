"""Stage 5: export a Whisper model for a runtime: CTranslate2 (faster-whisper, the default), ONNX (ONNX Runtime,
transformers.js), ggml (whisper.cpp) or OpenAI's checkpoint format (`distil-export model=... format=onnx`).

    distil-export model=path model.path=<run dir>/best quantization=int8
    distil-export model=checkpoint model.path=<run dir>/checkpoints/last.ckpt model.base=<student dir>
    distil-export model=tiny_en quantization=float32 out_dir=/srv/models/tiny-en-ct2
    distil-export model=path model.path=<run dir>/best format=onnx quantization=int8

Reads top to bottom: check the format, the quantisation, the model and the output directory (before any
work), turn a training checkpoint into a Hugging Face directory, then convert with the format's module
(`distil.whisper.export_formats`). The output, `out_dir` or `<model>-<suffix>-<quantization>` beside the model
(suffix ct2, onnx, ggml, openai), loads in the format's runtime; exporting the same model and quantisation
again does nothing (but rewrite the model card, README.md, which a distilled student's export carries:
distil.whisper.model_card).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import hydra
from omegaconf import DictConfig

from distil.config.schema import validate
from distil.training.checkpoints import export_student
from distil.utils.errors import one_line_errors
from distil.utils.hub import push_from_config
from distil.utils.io import ensure_writable_parent, reporting_full_disk, writable_home
from distil.utils.paths import CONF_DIR
from distil.utils.runinfo import command_line, write_run_info
from distil.whisper.ct2_export import ExportInputError, check_output, check_whisper_dir
from distil.whisper.export_formats import export_format, load_module
from distil.whisper.loading import is_checkpoint
from distil.whisper.model_card import card_facts, write_card
from distil.whisper.models import resolve_model
from distil.whisper.student import is_complete_student


def export(cfg: DictConfig, command: str | None = None) -> Path:
    """Export `cfg.model` (a model config, a Whisper directory or a training checkpoint) to `cfg.out_dir`, with
    a model card (README.md) when it is a distilled student, and upload it to `cfg.push_to_hub` if set;
    `command`: the command line, for the card."""
    out = _export(cfg, command)
    push_from_config(cfg, out)
    return out


def _export(cfg: DictConfig, command: str | None) -> Path:
    fmt = export_format(str(cfg.format))
    module = load_module(fmt)
    # null: the format's default (CTranslate2's int8, ONNX's float32).
    quantization = str(cfg.quantization) if cfg.quantization is not None else module.QUANTIZATIONS[0]
    # The options a format takes beyond the shared interface (CTranslate2: the device it must run on).
    options = {k: v for k, v in {"device": str(cfg.device)}.items() if k in fmt.options}
    module.check_quantization(quantization, **options)
    model, force = cfg.model, bool(cfg.force)
    path = model.get("path")
    name = f"{fmt.suffix}-{quantization}"
    if cfg.out_dir:
        ensure_writable_parent(cfg.out_dir, "out_dir")  # a read-only destination: before any model loads
    if not is_checkpoint(model):
        if not cfg.out_dir and path and Path(str(path)).expanduser().is_dir():  # the export goes beside it
            ensure_writable_parent(f"{Path(str(path)).expanduser()}-{name}", "out_dir")
        source = Path(resolve_model(model, cfg.paths.models))  # imports a packaged teacher on first use
        if not source.is_dir():
            raise ExportInputError(f"model {source} is not a local directory: download it first")
        module.check_model(source)
        out = Path(cfg.out_dir or f"{source}-{name}")
        with reporting_full_disk(out):
            module.export(source, out, quantization, force, **options)
            return _with_card(out, source, fmt.name, quantization, None, command)

    ckpt = Path(str(path)).expanduser()
    if not ckpt.is_file() or not model.get("base"):
        raise ExportInputError(
            f"checkpoint {ckpt} must exist and model.base=<the student directory it was trained from> be set"
        )
    base = check_whisper_dir(model.base)
    module.check_model(base)  # the checkpoint's weights go into the base's architecture
    out = ensure_writable_parent(cfg.out_dir or ckpt.with_name(f"{ckpt.stem}-{name}"), "out_dir")
    check_output(out, fmt.name, fmt.title)  # before the checkpoint is turned into a Whisper directory
    if "source_name" in fmt.options:  # the export records the checkpoint, not the temporary directory
        options["source_name"] = str(ckpt)
    with tempfile.TemporaryDirectory(prefix="distil-export-") as tmp, reporting_full_disk(out):
        hf_dir = export_student(ckpt, str(base), Path(tmp) / "student")
        module.export(hf_dir, out, quantization, force, **options)
        # The checkpoint's run directory (<run>/checkpoints/<name>.ckpt) holds the records the card reads.
        return _with_card(out, hf_dir, fmt.name, quantization, ckpt.parent.parent, command)


def _with_card(
    out: Path, source: Path, fmt: str, quantization: str, run_dir: Path | None, command: str | None
) -> Path:
    """`out` with its README.md model card when it is a distilled student (distil_student.json); a teacher or
    another Whisper model gets none: distil knows nothing of how it was made."""
    if is_complete_student(source):
        runs = [d for d in (run_dir, source.parent) if d and (d / "run_config.json").is_file()]
        facts = card_facts(
            out,
            run_dir=runs[0] if runs else None,
            source_dir=source,
            quantization=quantization,
            export_format=fmt,
            export_command=command,
        )
        write_card(out, facts)
    return out


def run_command(cfg: DictConfig) -> dict[str, str]:
    """What `distil-export` does with its composed config (also `distil.run("export", ...)`): {"out_dir": ...}."""
    validate(cfg, "export")  # every key's type and range, before any model or data loads
    write_run_info(cfg)
    return {"out_dir": str(export(cfg, command_line("distil-export")))}


@writable_home
@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="export")
@one_line_errors
def main(cfg: DictConfig) -> None:
    print(run_command(cfg)["out_dir"])


if __name__ == "__main__":
    main()
