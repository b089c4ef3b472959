"""The evaluation sections: short-form sets, long-form (chunked / sequential), noise, latency, speculative
decoding. Each takes a loaded model and one set entry and returns its metrics; a failing set becomes an error
entry (unless `eval.fail_fast`) so the other sets still run.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from distil.data.audio import AudioDecodeError, add_noise
from distil.data.text import corpus_wer, get_normalizer
from distil.evaluation.ct2_backend import CT2Model
from distil.evaluation.data import EvalInputError, has_references, load_samples
from distil.evaluation.scoring import prediction_rows, score
from distil.utils.io import write_jsonl
from distil.whisper.generation import generation_kwargs, transcribe
from distil.whisper.loading import LoadedModel, load_model

log = logging.getLogger(__name__)


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


def evaluate_short_set(lm: LoadedModel | CT2Model, entry: dict, ecfg, out_dir: Path) -> dict:
    samples, problems = load_samples(entry, ecfg.get("max_samples"), ecfg.get("skip_bad_audio", False))
    predictions = lm.transcribe(  # a PyTorch LoadedModel or a CTranslate2 CT2Model
        [s.audio for s in samples],
        int(ecfg.batch_size),
        entry["language"],
        entry["task"],
        int(ecfg.max_new_tokens),
        int(ecfg.get("num_beams", 1)),
    )
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


def evaluate_long_set(lm: LoadedModel | CT2Model, entry: dict, lcfg, ecfg, out_dir: Path) -> dict:
    from distil.evaluation.longform import longform_metrics, repeated_ngrams

    samples, problems = load_samples(entry, None, ecfg.get("skip_bad_audio", False))
    waves = [s.audio for s in samples]
    normalizer = get_normalizer(entry["language"])
    result: dict[str, Any] = {
        "status": "ok" if has_references(samples) else "no references",
        "recordings": len(samples),
        "audio_seconds": sum(s.duration for s in samples),
        "skipped_bad_audio": problems,
    }
    for algorithm in lcfg.algorithms:
        if algorithm not in ("chunked", "sequential"):
            raise EvalInputError(f"unknown long-form algorithm {algorithm!r}: use chunked or sequential")
        if isinstance(lm, CT2Model):  # deployed: faster-whisper's own long-form algorithms
            predictions, settings = lm.transcribe_long(
                waves, algorithm, lcfg, entry["language"], entry["task"]
            )
        else:
            predictions, settings = _pytorch_long_form(lm, waves, algorithm, lcfg, entry)
        rel = Path("predictions") / "long_form" / f"{entry['name']}.{algorithm}.jsonl"
        write_jsonl(out_dir / rel, prediction_rows(samples, predictions, entry["language"]))
        entry_out: dict[str, Any] = {"settings": settings, "predictions": str(rel)}
        if has_references(samples):
            entry_out.update(longform_metrics([s.reference or "" for s in samples], predictions, normalizer))
        else:
            entry_out["repeated_5grams"] = sum(repeated_ngrams(p, 5, normalizer) for p in predictions)
        result[algorithm] = entry_out
    return result


def _pytorch_long_form(lm: LoadedModel, waves, algorithm: str, lcfg, entry: dict) -> tuple[list[str], dict]:
    from distil.evaluation.longform import (
        SequentialOptions,
        default_stride,
        transcribe_chunked,
        transcribe_sequential,
    )

    gen = generation_kwargs(lm.model, entry["language"], entry["task"], lcfg.get("max_new_tokens", 444), 1)
    if algorithm == "chunked":
        chunk = float(lcfg.chunk_length_s)
        stride = lcfg.get("stride_length_s")
        stride = default_stride(chunk) if stride is None else float(stride)
        predictions = transcribe_chunked(
            lm.model, lm.processor, waves, chunk, stride, int(lcfg.batch_size), gen
        )
        return predictions, {
            "chunk_length_s": chunk,
            "stride_length_s": stride,
            "batch_size": int(lcfg.batch_size),
        }
    seq = OmegaConf.to_container(lcfg.sequential, resolve=True)
    batch_size = int(seq.pop("batch_size", 1))
    gen_seq = {k: v for k, v in gen.items() if k != "max_new_tokens"}  # per-window limit is the model's
    options = SequentialOptions(temperature=tuple(seq.pop("temperature")), **seq)
    predictions = transcribe_sequential(lm.model, lm.processor, waves, options, batch_size, gen_seq)
    return predictions, OmegaConf.to_container(lcfg.sequential, resolve=True)


def evaluate_noise(lm: LoadedModel, entry: dict, ncfg, ecfg, out_dir: Path) -> dict:
    from distil.data.audio import make_noise

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


def evaluate_latency(lm: LoadedModel | CT2Model, entry: dict, lat, ecfg) -> dict:
    from distil.evaluation.latency import measure_latency

    samples, _ = load_samples(entry, lat.get("samples"), ecfg.get("skip_bad_audio", False))
    if isinstance(lm, CT2Model):
        result = lm.measure_latency(
            [s.audio for s in samples],
            list(lat.batch_sizes),
            int(lat.warmup),
            int(lat.get("repeats", 1)),
            entry["language"],
            entry["task"],
            int(ecfg.max_new_tokens),
        )
        return {"status": "ok", "set": entry["name"], **result}
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
