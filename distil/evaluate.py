"""Stage 4: evaluate a Whisper model (teacher, student directory or training checkpoint).

`python -m distil.evaluate model=tiny_en eval=short` writes into the Hydra run directory:
  metrics.json                   everything measured (schema: see `evaluate`), written last, atomically
  predictions/<section>/<set>.jsonl   one line per sample: id, reference, prediction, wer
  tensorboard/                   every numeric metric as a TensorBoard scalar
Sections (each optional in the eval config): short-form WER per set, long-form (chunked and/or
sequential), speculative decoding, latency, noise robustness. A set that cannot be evaluated (missing
file, no references, bad audio) gets an error entry and the other sets still run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from distil.data.audio import AudioDecodeError, add_noise, decode_audio
from distil.data.text import corpus_cer, corpus_wer, get_normalizer, identity, sample_wer
from distil.utils.paths import CONF_DIR

log = logging.getLogger(__name__)

SAMPLING_RATE = 16_000
FRAME_S = 0.01  # Whisper's log-mel hop (160 samples): shorter audio has no frame at all
ENGLISH = (None, "en", "english")
SET_DEFAULTS = {
    "config": None,
    "split": "test",
    "audio_column": "audio",
    "text_column": "text",  # null: audio without references (predictions only)
    "id_column": "id",
    "speaker_column": None,
    "duration_column": None,
    "max_samples": None,  # cap on the number of samples (null = the whole split)
    "language": "en",
    "task": "transcribe",
    "metric": "wer",  # "cer" for languages written without spaces
    "section": "sets",  # where the set lives in the eval config (for error messages)
}


class EvalInputError(ValueError):
    """Input the evaluation cannot use (model, checkpoint, data set); the message names it and the fix."""


# =========================================================================== model loading


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
            "multilingual": is_multilingual(self.model),
            "dtype": str(self.model.dtype).replace("torch.", ""),
        }


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
        raise EvalInputError(
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
        raise EvalInputError(str(err)) from err


def _read_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # Lightning stores hyper-parameters (OmegaConf objects) that weights_only rejects
        return torch.load(path, map_location="cpu", weights_only=False)


def student_state_from_checkpoint(checkpoint: dict, path: str, prefix: str = "student.") -> dict:
    """The student's weights from a Lightning checkpoint (keys `student.*`), prefix removed."""
    state = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state, dict):
        raise EvalInputError(f"checkpoint {path} holds no state_dict")
    out = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not out:
        sample = ", ".join(list(state)[:3])
        raise EvalInputError(
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
        raise EvalInputError(
            f"checkpoint {path} does not fit the architecture of model.base={base} "
            f"(missing {len(missing)} keys e.g. {missing[:3]}, unexpected {len(unexpected)} e.g. {unexpected[:3]}, "
            f"shape mismatches {wrong[:3]}). model.base must be the student directory this checkpoint was "
            "trained from (same layer counts and width)."
        )
    model.load_state_dict(state, strict=False)
    model.tie_weights()


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
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    model_cfg = (
        OmegaConf.create(OmegaConf.to_container(model_cfg, resolve=True))
        if isinstance(model_cfg, DictConfig)
        else OmegaConf.create(dict(model_cfg))
    )
    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    path = model_cfg.get("path")
    if path and str(path).endswith(".ckpt"):
        ckpt = Path(str(path)).expanduser()
        if not ckpt.is_file():
            raise EvalInputError(f"checkpoint {ckpt} does not exist")
        base = model_cfg.get("base")
        if not base:
            raise EvalInputError(
                f"checkpoint {ckpt} needs model.base=<student HF directory> for its config and processor"
            )
        base = _hf_path({"path": base}, models_root)
        processor = load_processor(base)
        state = student_state_from_checkpoint(_read_checkpoint(ckpt), str(ckpt))
        model = WhisperForConditionalGeneration(WhisperConfig.from_pretrained(base))
        from transformers import GenerationConfig

        try:
            model.generation_config = GenerationConfig.from_pretrained(base)
        except OSError:
            log.warning("no generation_config.json in %s; using the default", base)
        load_checkpoint_into(model, state, str(ckpt), base)
        name, kind, where = model_cfg.get("name") or ckpt.stem, "checkpoint", str(ckpt)
    else:
        where = _hf_path(model_cfg, models_root)
        processor = load_processor(where)
        try:
            model = WhisperForConditionalGeneration.from_pretrained(where)
        except (OSError, ValueError) as err:
            raise EvalInputError(f"cannot load a Whisper model from {where}: {err}") from err
        name, kind = model_cfg.get("name") or Path(where).name, "hf"
    model = model.to(dev, torch_dtype).eval()
    return LoadedModel(model, processor, str(name), where, kind)


def is_multilingual(model) -> bool:
    gc = model.generation_config
    flag = getattr(gc, "is_multilingual", None)
    return bool(getattr(gc, "lang_to_id", None)) if flag is None else bool(flag)


# =========================================================================== data


@dataclass
class Sample:
    id: str
    audio: np.ndarray
    reference: str | None

    @property
    def duration(self) -> float:
        return len(self.audio) / SAMPLING_RATE


def set_entry(name: str, entry: DictConfig | dict, section: str = "sets") -> dict:
    raw = OmegaConf.to_container(entry, resolve=True) if isinstance(entry, DictConfig) else dict(entry)
    out = {**SET_DEFAULTS, "name": name, "section": section, **raw}
    if not out.get("path"):
        raise EvalInputError(
            f"eval.{section}.{name} has no path (a local corpus directory or a Hub dataset id)"
        )
    return out


def _dataset_entry(entry: dict):
    """The `distil.data.entries` view of an eval set, so loading and column checks are the shared ones."""
    from distil.data.entries import DatasetEntry

    class EvalSetEntry(DatasetEntry):
        @property
        def key(self) -> str:  # error messages name the eval config key to fix
            return f"eval.{entry['section']}.{entry['name']}"

    return EvalSetEntry(
        name=entry["name"],
        path=str(entry["path"]),
        config=entry.get("config"),
        splits=[entry["split"]],
        audio_column=entry["audio_column"],
        text_column=entry.get("text_column"),
        id_column=entry.get("id_column"),
        speaker_column=entry.get("speaker_column"),
        duration_column=entry.get("duration_column"),
        language=entry.get("language"),
    )


def load_samples(
    entry: dict, max_samples: int | None = None, skip_bad_audio: bool = False
) -> tuple[list[Sample], list[dict]]:
    """Decode one eval set. Returns (samples, problems); bad audio raises unless `skip_bad_audio`."""
    from distil.data.entries import load_split, stable_id, validate_columns

    data_entry = _dataset_entry(entry)
    try:
        ds = load_split(data_entry, entry["split"], streaming=False)
        validate_columns(data_entry, entry["split"], ds.column_names)
    except FileNotFoundError as err:
        raise EvalInputError(
            f"eval set {entry['name']!r} ({entry['path']}, split {entry['split']}): {err}"
        ) from err
    audio_col, text_col, id_col = entry["audio_column"], entry.get("text_column"), entry.get("id_column")
    caps = [n for n in (max_samples, entry.get("max_samples")) if n]
    limit = min([len(ds), *caps])
    samples, problems = [], []
    for i, row in enumerate(ds.select(range(limit))):
        sid = str(row[id_col]) if id_col else stable_id(entry["name"], entry["split"], i)
        try:
            wave = decode_audio(row[audio_col], SAMPLING_RATE)
            if len(wave) < FRAME_S * SAMPLING_RATE:
                raise AudioDecodeError(
                    f"audio of sample {sid} lasts {1000 * len(wave) / SAMPLING_RATE:.1f} ms, shorter than one "
                    f"{1000 * FRAME_S:.0f} ms frame: nothing to transcribe"
                )
        except AudioDecodeError as err:
            if not skip_bad_audio:
                raise EvalInputError(
                    f"eval set {entry['name']!r}, sample {sid}: {err}. Remove the sample or set eval.skip_bad_audio=true"
                ) from err
            problems.append({"id": sid, "error": str(err)})
            continue
        ref = row[text_col] if text_col else None
        samples.append(Sample(sid, wave, ref if ref is None else str(ref)))
    if not samples:
        raise EvalInputError(f"eval set {entry['name']!r} has no usable samples")
    return samples, problems


def has_references(samples: Sequence[Sample]) -> bool:
    return any(s.reference and s.reference.strip() for s in samples)


# =========================================================================== generation


def generation_kwargs(
    model, language: str | None, task: str | None, max_new_tokens: int, num_beams: int = 1
) -> dict:
    kwargs: dict[str, Any] = {"max_new_tokens": int(max_new_tokens), "num_beams": int(num_beams)}
    if is_multilingual(model):
        if language:
            kwargs["language"] = language
        if task:
            kwargs["task"] = task
    elif language not in ENGLISH or task not in (None, "transcribe"):
        raise EvalInputError(
            f"the model is English-only but the set asks for language={language!r}, task={task!r}: "
            "evaluate it on English sets (language: en) or use a multilingual model"
        )
    return kwargs


@torch.inference_mode()
def transcribe(
    model, processor, waves: Sequence[np.ndarray], batch_size: int, generate_kwargs: dict
) -> list[str]:
    """Short-form transcription, batched by duration (similar lengths decode to similar token counts)."""
    order = sorted(range(len(waves)), key=lambda i: len(waves[i]), reverse=True)
    texts: list[str] = [""] * len(waves)
    fe = processor.feature_extractor
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        feats = fe([waves[i] for i in idx], sampling_rate=SAMPLING_RATE, return_tensors="pt").input_features
        ids = model.generate(input_features=feats.to(model.device, model.dtype), **generate_kwargs)
        ids = ids if torch.is_tensor(ids) else ids["sequences"]
        for i, text in zip(idx, processor.batch_decode(ids, skip_special_tokens=True), strict=True):
            texts[i] = text.strip()
    return texts


# =========================================================================== scoring


def score(
    references: Sequence[str | None], predictions: Sequence[str], language: str | None, metric: str = "wer"
) -> dict:
    """Normalised and orthographic error rates of one set (CER too when the set's metric is `cer`)."""
    refs = [r or "" for r in references]
    normalizer = get_normalizer(language)
    normalised = corpus_wer(refs, predictions, normalizer)
    orthographic = corpus_wer(refs, predictions, identity)
    out = {
        "metric": metric,
        "wer": normalised.wer,
        "wer_orthographic": orthographic.wer,
        "samples": len(predictions),
        "scored": normalised.scored,
        "skipped_empty_reference": normalised.skipped_empty_reference,
        "details": normalised.to_dict(),
    }
    if metric == "cer":
        out["cer"] = corpus_cer(refs, predictions, normalizer)
        out["cer_orthographic"] = corpus_cer(refs, predictions, identity)
    elif metric != "wer":
        raise EvalInputError(f"unknown metric {metric!r}: use wer or cer")
    return out


def averages(set_metrics: dict[str, dict]) -> dict:
    """Macro (mean over sets) and sample-weighted (weights = scored samples) averages of each rate."""
    out: dict[str, Any] = {}
    for key in ("wer", "wer_orthographic", "cer", "cer_orthographic"):
        rows = [
            (m[key], m["scored"])
            for m in set_metrics.values()
            if m.get("status") == "ok" and m.get(key) is not None
        ]
        if not rows:
            continue
        total = sum(n for _, n in rows)
        out[f"{key}_macro"] = sum(v for v, _ in rows) / len(rows)
        out[f"{key}_sample_weighted"] = sum(v * n for v, n in rows) / total if total else None
        out[f"{key}_sets"] = len(rows)
    return out


def prediction_rows(
    samples: Sequence[Sample], predictions: Sequence[str], language: str | None
) -> list[dict]:
    normalizer = get_normalizer(language)
    return [
        {
            "id": s.id,
            "reference": s.reference,
            "prediction": p,
            "wer": sample_wer(s.reference, p, normalizer) if s.reference and s.reference.strip() else None,
        }
        for s, p in zip(samples, predictions, strict=True)
    ]


# =========================================================================== outputs


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file + rename, so a crashed run never leaves a complete-looking file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def numeric_leaves(tree: Any, prefix: str = "") -> dict[str, float]:
    """Flatten nested metrics into `a/b/c -> number` (booleans and non-finite values left out)."""
    out: dict[str, float] = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            out.update(numeric_leaves(value, f"{prefix}/{key}" if prefix else str(key)))
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool) and math.isfinite(tree):
        out[prefix] = float(tree)
    return out


def write_tensorboard(out_dir: Path, metrics: dict) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"))
    for tag, value in numeric_leaves({k: v for k, v in metrics.items() if k != "model"}).items():
        writer.add_scalar(tag, value, 0)
    writer.close()


# =========================================================================== sections


def _error_entry(err: Exception) -> dict:
    return {"status": "error", "error": f"{type(err).__name__}: {err}"}


def _run_guarded(what: str, fail_fast: bool, fn, *args, **kwargs) -> dict:
    """Run one set/section; on failure record the error (other sets still run) unless fail_fast."""
    try:
        return fn(*args, **kwargs)
    except Exception as err:
        if fail_fast:
            raise
        log.error(
            "%s failed: %s", what, err, exc_info=not isinstance(err, (EvalInputError, AudioDecodeError))
        )
        return _error_entry(err)


def evaluate_short_set(lm: LoadedModel, entry: dict, ecfg, out_dir: Path) -> dict:
    samples, problems = load_samples(entry, ecfg.get("max_samples"), ecfg.get("skip_bad_audio", False))
    gen = generation_kwargs(
        lm.model, entry["language"], entry["task"], ecfg.max_new_tokens, ecfg.get("num_beams", 1)
    )
    predictions = transcribe(lm.model, lm.processor, [s.audio for s in samples], int(ecfg.batch_size), gen)
    rel = Path("predictions") / "short_form" / f"{entry['name']}.jsonl"
    write_jsonl(out_dir / rel, prediction_rows(samples, predictions, entry["language"]))
    base = {
        "predictions": str(rel),
        "audio_seconds": sum(s.duration for s in samples),
        "skipped_bad_audio": problems,
        "truncated_over_30s": sum(s.duration > 30 for s in samples),
    }
    if not has_references(samples):
        return {"status": "no references", "samples": len(samples), **base}
    return {
        "status": "ok",
        **score([s.reference for s in samples], predictions, entry["language"], entry["metric"]),
        **base,
    }


def evaluate_long_set(lm: LoadedModel, entry: dict, lcfg, ecfg, out_dir: Path) -> dict:
    from distil.evaluation.longform import (
        SequentialOptions,
        default_stride,
        longform_metrics,
        transcribe_chunked,
        transcribe_sequential,
    )

    samples, problems = load_samples(entry, None, ecfg.get("skip_bad_audio", False))
    gen = generation_kwargs(lm.model, entry["language"], entry["task"], lcfg.get("max_new_tokens", 444), 1)
    waves = [s.audio for s in samples]
    normalizer = get_normalizer(entry["language"])
    result: dict[str, Any] = {
        "status": "ok" if has_references(samples) else "no references",
        "recordings": len(samples),
        "audio_seconds": sum(s.duration for s in samples),
        "skipped_bad_audio": problems,
    }
    for algorithm in lcfg.algorithms:
        if algorithm == "chunked":
            chunk = float(lcfg.chunk_length_s)
            stride = lcfg.get("stride_length_s")
            stride = default_stride(chunk) if stride is None else float(stride)
            predictions = transcribe_chunked(
                lm.model, lm.processor, waves, chunk, stride, int(lcfg.batch_size), gen
            )
            settings = {
                "chunk_length_s": chunk,
                "stride_length_s": stride,
                "batch_size": int(lcfg.batch_size),
            }
        elif algorithm == "sequential":
            seq = OmegaConf.to_container(lcfg.sequential, resolve=True)
            batch_size = int(seq.pop("batch_size", 1))
            gen_seq = {
                k: v for k, v in gen.items() if k != "max_new_tokens"
            }  # per-window limit is the model's
            options = SequentialOptions(temperature=tuple(seq.pop("temperature")), **seq)
            predictions = transcribe_sequential(lm.model, lm.processor, waves, options, batch_size, gen_seq)
            settings = {**OmegaConf.to_container(lcfg.sequential, resolve=True)}
        else:
            raise EvalInputError(f"unknown long-form algorithm {algorithm!r}: use chunked or sequential")
        rel = Path("predictions") / "long_form" / f"{entry['name']}.{algorithm}.jsonl"
        write_jsonl(out_dir / rel, prediction_rows(samples, predictions, entry["language"]))
        entry_out: dict[str, Any] = {"settings": settings, "predictions": str(rel)}
        if has_references(samples):
            entry_out.update(longform_metrics([s.reference or "" for s in samples], predictions, normalizer))
        else:
            from distil.evaluation.longform import repeated_ngrams

            entry_out["repeated_5grams"] = sum(repeated_ngrams(p, 5, normalizer) for p in predictions)
        result[algorithm] = entry_out
    return result


def evaluate_noise(lm: LoadedModel, entry: dict, ncfg, ecfg, out_dir: Path) -> dict:
    from distil.corpus import make_noise

    samples, _ = load_samples(entry, ncfg.get("samples"), ecfg.get("skip_bad_audio", False))
    if not has_references(samples):
        raise EvalInputError(f"noise robustness needs references; set {entry['name']!r} has none")
    gen = generation_kwargs(
        lm.model, entry["language"], entry["task"], ecfg.max_new_tokens, ecfg.get("num_beams", 1)
    )
    normalizer = get_normalizer(entry["language"])
    refs = [s.reference for s in samples]
    clean = transcribe(lm.model, lm.processor, [s.audio for s in samples], int(ecfg.batch_size), gen)
    out: dict[str, Any] = {
        "set": entry["name"],
        "samples": len(samples),
        "clean": corpus_wer(refs, clean, normalizer).wer,
    }
    for kind in ncfg.types:
        out[kind] = {}
        for snr in ncfg.snr_db:
            noisy = [
                add_noise(s.audio, make_noise(kind, len(s.audio), int(ncfg.get("seed", 0)) + i), float(snr))
                for i, s in enumerate(samples)
            ]
            predictions = transcribe(lm.model, lm.processor, noisy, int(ecfg.batch_size), gen)
            out[kind][f"{float(snr):g}"] = corpus_wer(refs, predictions, normalizer).wer
            rel = Path("predictions") / "noise" / f"{entry['name']}.{kind}.snr{float(snr):g}.jsonl"
            write_jsonl(out_dir / rel, prediction_rows(samples, predictions, entry["language"]))
    out["status"] = "ok"
    return out


def evaluate_latency(lm: LoadedModel, entry: dict, lat, ecfg) -> dict:
    from distil.evaluation.latency import measure_latency

    samples, _ = load_samples(entry, lat.get("samples"), ecfg.get("skip_bad_audio", False))
    gen = generation_kwargs(lm.model, entry["language"], entry["task"], ecfg.max_new_tokens, 1)
    result = measure_latency(
        lm.model,
        lm.processor,
        [s.audio for s in samples],
        list(lat.batch_sizes),
        int(lat.warmup),
        int(lat.get("repeats", 1)),
        gen,
    )
    return {"status": "ok", "set": entry["name"], **result}


def evaluate_speculative(
    lm: LoadedModel, entry: dict, spec, ecfg, device, dtype, out_dir: Path, models_root=None
) -> dict:
    from distil.evaluation.speculative import make_assistant, speculative_benchmark

    if not spec.get("assistant"):
        return {
            "status": "skipped",
            "reason": "no assistant: set eval.speculative.assistant=<student directory>",
        }
    assistant_cfg = spec.assistant if isinstance(spec.assistant, DictConfig) else {"path": spec.assistant}
    student = load_model(assistant_cfg, device, dtype, models_root)
    assistant, shares_encoder = make_assistant(lm.model, student.model)
    samples, _ = load_samples(entry, spec.get("samples"), ecfg.get("skip_bad_audio", False))
    gen = generation_kwargs(lm.model, entry["language"], entry["task"], ecfg.max_new_tokens, 1)
    result = speculative_benchmark(
        lm.model, assistant, lm.processor, [s.audio for s in samples], gen, int(spec.get("warmup", 1))
    )
    rel = Path("predictions") / "speculative" / f"{entry['name']}.jsonl"
    rows = [
        {"id": s.id, "reference": s.reference, "teacher": t, "speculative": p}
        for s, t, p in zip(samples, result.pop("teacher_texts"), result.pop("speculative_texts"), strict=True)
    ]
    write_jsonl(out_dir / rel, rows)
    return {
        "status": "ok",
        "set": entry["name"],
        "assistant": student.info(),
        "shares_encoder": shares_encoder,
        "predictions": str(rel),
        **result,
    }


# =========================================================================== entry points


def evaluate(cfg: DictConfig, out_dir: str | Path | None = None) -> dict:
    """Evaluate `cfg.model` on `cfg.eval`; write outputs into `out_dir` and return the metrics dict.

    metrics.json: {"model": {...}, "device": {...}, "short_form": {"sets": {name: {...}}, "average": {...}},
    "long_form": {"sets": {name: {"chunked": {...}, "sequential": {...}}}}, "speculative": {...},
    "latency": {...}, "noise": {...}}. Each set entry has "status": "ok" | "no references" | "error".
    """
    from distil.evaluation.latency import device_info
    from distil.utils.runinfo import hydra_output_dir

    out = Path(out_dir) if out_dir is not None else hydra_output_dir() or Path.cwd()
    out.mkdir(parents=True, exist_ok=True)
    ecfg = cfg.eval
    fail_fast = bool(ecfg.get("fail_fast", False))
    if ecfg.get("seed") is not None:
        torch.manual_seed(int(ecfg.seed))
    models_root = OmegaConf.select(cfg, "paths.models")
    lm = load_model(cfg.model, cfg.get("device", "auto"), cfg.get("dtype", "auto"), models_root)
    log.info("evaluating %s (%s)", lm.name, lm.path)
    metrics: dict[str, Any] = {"model": lm.info(), "device": device_info(lm.model.device)}

    short_sets = {name: set_entry(name, e) for name, e in (ecfg.get("sets") or {}).items()}
    if short_sets:
        results = {
            name: _run_guarded(f"set {name}", fail_fast, evaluate_short_set, lm, entry, ecfg, out)
            for name, entry in short_sets.items()
        }
        metrics["short_form"] = {"sets": results, "average": averages(results)}

    def named_set(section: str, name: str | None) -> dict:
        if not name or name not in short_sets:
            raise EvalInputError(
                f"eval.{section}.set={name!r} is not one of eval.sets ({sorted(short_sets)})"
            )
        return short_sets[name]

    if ecfg.get("long_form"):
        lcfg = ecfg.long_form
        long_sets = {
            name: set_entry(name, e, "long_form.sets") for name, e in (lcfg.get("sets") or {}).items()
        }
        metrics["long_form"] = {
            "sets": {
                name: _run_guarded(
                    f"long-form set {name}", fail_fast, evaluate_long_set, lm, entry, lcfg, ecfg, out
                )
                for name, entry in long_sets.items()
            }
        }
    if ecfg.get("speculative"):
        spec = ecfg.speculative
        metrics["speculative"] = _run_guarded(
            "speculative decoding",
            fail_fast,
            lambda: evaluate_speculative(
                lm,
                named_set("speculative", spec.get("set")),
                spec,
                ecfg,
                cfg.get("device", "auto"),
                cfg.get("dtype", "auto"),
                out,
                models_root,
            ),
        )
    if ecfg.get("latency"):
        lat = ecfg.latency
        metrics["latency"] = _run_guarded(
            "latency",
            fail_fast,
            lambda: evaluate_latency(lm, named_set("latency", lat.get("set")), lat, ecfg),
        )
    if ecfg.get("noise"):
        ncfg = ecfg.noise
        metrics["noise"] = _run_guarded(
            "noise",
            fail_fast,
            lambda: evaluate_noise(lm, named_set("noise", ncfg.get("set")), ncfg, ecfg, out),
        )

    write_tensorboard(out, metrics)
    write_atomic(out / "metrics.json", json.dumps(metrics, indent=2, default=str) + "\n")
    log.info("metrics written to %s", out / "metrics.json")
    return metrics


def primary_metric(metrics: dict) -> float | None:
    """The number a Hydra sweeper optimises: short-form macro WER, else the first long-form WER."""
    avg = (metrics.get("short_form") or {}).get("average") or {}
    if avg.get("wer_macro") is not None:
        return avg["wer_macro"]
    for entry in ((metrics.get("long_form") or {}).get("sets") or {}).values():
        for algo in ("chunked", "sequential"):
            if isinstance(entry.get(algo), dict) and entry[algo].get("wer") is not None:
                return entry[algo]["wer"]
    return None


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="evaluate")
def main(cfg: DictConfig) -> float | None:
    from distil.utils.runinfo import write_run_info

    out = write_run_info(cfg)
    metrics = evaluate(cfg, out)
    return primary_metric(metrics)


if __name__ == "__main__":
    main()
