"""The evaluation sections: short-form sets, long-form (chunked / sequential), noise, latency, speculative
decoding. Each section is a function `section(run, **settings)` that a `_target_` node of the eval config names
(conf/eval/*.yaml, `_partial_: true`; its other keys are the settings): `distil.evaluate` builds it with Hydra,
calls it with the `EvalRun` and stores what it returns under the node's key in metrics.json (None: nothing to
store). A failing set becomes an error entry (unless `eval.fail_fast`) so the other sets still run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from distil.data.audio import add_noise
from distil.data.text import corpus_wer, get_normalizer
from distil.evaluation.ct2_backend import CT2Model
from distil.evaluation.data import EvalInputError, has_references, load_samples, set_entry
from distil.evaluation.scoring import averages, prediction_rows, score
from distil.utils.errors import InputError
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
            "%s failed: %s",
            what,
            err,
            exc_info=not isinstance(err, InputError),  # input: one line, no traceback
        )
        return _error_entry(err)


def evaluate_short_set(whisper: LoadedModel | CT2Model, entry: dict, eval_cfg, out_dir: Path) -> dict:
    samples, problems = load_samples(
        entry, eval_cfg.get("max_samples"), eval_cfg.get("skip_bad_audio", False)
    )
    predictions = whisper.transcribe(  # a PyTorch LoadedModel or a CTranslate2 CT2Model
        [s.audio for s in samples],
        int(eval_cfg.batch_size),
        entry["language"],
        entry["task"],
        int(eval_cfg.max_new_tokens),
        int(eval_cfg.get("num_beams", 1)),
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


def evaluate_long_set(
    whisper: LoadedModel | CT2Model, entry: dict, long_cfg, eval_cfg, out_dir: Path
) -> dict:
    from distil.evaluation.longform import longform_metrics, repeated_ngrams

    samples, problems = load_samples(entry, None, eval_cfg.get("skip_bad_audio", False))
    waves = [s.audio for s in samples]
    normalizer = get_normalizer(entry["language"])
    result: dict[str, Any] = {
        "status": "ok" if has_references(samples) else "no references",
        "recordings": len(samples),
        "audio_seconds": sum(s.duration for s in samples),
        "skipped_bad_audio": problems,
    }
    for algorithm in long_cfg.algorithms:
        if algorithm not in ("chunked", "sequential"):
            raise EvalInputError(f"unknown long-form algorithm {algorithm!r}: use chunked or sequential")
        if isinstance(whisper, CT2Model):  # deployed: faster-whisper's own long-form algorithms
            predictions, settings = whisper.transcribe_long(
                waves, algorithm, long_cfg, entry["language"], entry["task"]
            )
        else:
            predictions, settings = _pytorch_long_form(whisper, waves, algorithm, long_cfg, entry)
        rel = Path("predictions") / "long_form" / f"{entry['name']}.{algorithm}.jsonl"
        write_jsonl(out_dir / rel, prediction_rows(samples, predictions, entry["language"]))
        entry_out: dict[str, Any] = {"settings": settings, "predictions": str(rel)}
        if has_references(samples):
            entry_out.update(longform_metrics([s.reference or "" for s in samples], predictions, normalizer))
        else:
            entry_out["repeated_5grams"] = sum(repeated_ngrams(p, 5, normalizer) for p in predictions)
        result[algorithm] = entry_out
    return result


def _pytorch_long_form(
    whisper: LoadedModel, waves, algorithm: str, long_cfg, entry: dict
) -> tuple[list[str], dict]:
    from distil.evaluation.longform import (
        SequentialOptions,
        default_stride,
        transcribe_chunked,
        transcribe_sequential,
    )

    gen = generation_kwargs(
        whisper.model, entry["language"], entry["task"], long_cfg.get("max_new_tokens", 444), 1
    )
    if algorithm == "chunked":
        chunk = float(long_cfg.chunk_length_s)
        stride = long_cfg.get("stride_length_s")
        stride = default_stride(chunk) if stride is None else float(stride)
        predictions = transcribe_chunked(
            whisper.model, whisper.processor, waves, chunk, stride, int(long_cfg.batch_size), gen
        )
        return predictions, {
            "chunk_length_s": chunk,
            "stride_length_s": stride,
            "batch_size": int(long_cfg.batch_size),
        }
    seq = OmegaConf.to_container(long_cfg.sequential, resolve=True)
    batch_size = int(seq.pop("batch_size", 1))
    gen_seq = {k: v for k, v in gen.items() if k != "max_new_tokens"}  # per-window limit is the model's
    options = SequentialOptions(temperature=tuple(seq.pop("temperature")), **seq)
    predictions = transcribe_sequential(whisper.model, whisper.processor, waves, options, batch_size, gen_seq)
    return predictions, OmegaConf.to_container(long_cfg.sequential, resolve=True)


def evaluate_noise(whisper: LoadedModel, entry: dict, noise_cfg, eval_cfg, out_dir: Path) -> dict:
    from distil.data.audio import make_noise

    samples, _ = load_samples(entry, noise_cfg.get("samples"), eval_cfg.get("skip_bad_audio", False))
    if not has_references(samples):
        raise EvalInputError(f"noise robustness needs references; set {entry['name']!r} has none")
    gen = generation_kwargs(
        whisper.model, entry["language"], entry["task"], eval_cfg.max_new_tokens, eval_cfg.get("num_beams", 1)
    )
    normalizer = get_normalizer(entry["language"])
    refs = [s.reference for s in samples]
    clean = transcribe(
        whisper.model, whisper.processor, [s.audio for s in samples], int(eval_cfg.batch_size), gen
    )
    out: dict[str, Any] = {
        "set": entry["name"],
        "samples": len(samples),
        "clean": corpus_wer(refs, clean, normalizer).wer,
    }
    for kind in noise_cfg.types:
        out[kind] = {}
        for snr in noise_cfg.snr_db:
            noisy = [
                add_noise(
                    s.audio, make_noise(kind, len(s.audio), int(noise_cfg.get("seed", 0)) + i), float(snr)
                )
                for i, s in enumerate(samples)
            ]
            predictions = transcribe(whisper.model, whisper.processor, noisy, int(eval_cfg.batch_size), gen)
            out[kind][f"{float(snr):g}"] = corpus_wer(refs, predictions, normalizer).wer
            rel = Path("predictions") / "noise" / f"{entry['name']}.{kind}.snr{float(snr):g}.jsonl"
            write_jsonl(out_dir / rel, prediction_rows(samples, predictions, entry["language"]))
    out["status"] = "ok"
    return out


def evaluate_latency(whisper: LoadedModel | CT2Model, entry: dict, lat, eval_cfg) -> dict:
    from distil.evaluation.latency import measure_latency

    samples, _ = load_samples(entry, lat.get("samples"), eval_cfg.get("skip_bad_audio", False))
    if isinstance(whisper, CT2Model):
        result = whisper.measure_latency(
            [s.audio for s in samples],
            list(lat.batch_sizes),
            int(lat.warmup),
            int(lat.get("repeats", 1)),
            entry["language"],
            entry["task"],
            int(eval_cfg.max_new_tokens),
        )
        return {"status": "ok", "set": entry["name"], **result}
    gen = generation_kwargs(whisper.model, entry["language"], entry["task"], eval_cfg.max_new_tokens, 1)
    result = measure_latency(
        whisper.model,
        whisper.processor,
        [s.audio for s in samples],
        list(lat.batch_sizes),
        int(lat.warmup),
        int(lat.get("repeats", 1)),
        gen,
    )
    return {"status": "ok", "set": entry["name"], **result}


def evaluate_speculative(
    whisper: LoadedModel, entry: dict, spec, eval_cfg, device, dtype, out_dir: Path, models_root=None
) -> dict:
    from distil.evaluation.speculative import make_assistant, speculative_benchmark

    if not spec.get("assistant"):
        return {
            "status": "skipped",
            "reason": "no assistant: set eval.speculative.assistant=<student directory>",
        }
    assistant_cfg = spec.assistant if isinstance(spec.assistant, DictConfig) else {"path": spec.assistant}
    student = load_model(assistant_cfg, device, dtype, models_root)
    assistant, shares_encoder = make_assistant(whisper.model, student.model)
    samples, _ = load_samples(entry, spec.get("samples"), eval_cfg.get("skip_bad_audio", False))
    gen = generation_kwargs(whisper.model, entry["language"], entry["task"], eval_cfg.max_new_tokens, 1)
    result = speculative_benchmark(
        whisper.model,
        assistant,
        whisper.processor,
        [s.audio for s in samples],
        gen,
        int(spec.get("warmup", 1)),
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


# ---------------------------------------------------------------------------------------------------- sections


@dataclass
class EvalRun:
    """What every section is called with: the model under test, the eval config (`eval.*`), the short-form sets
    (`eval.sets`, which the other sections name by `set`), the output directory and how further models load."""

    whisper: LoadedModel | CT2Model
    eval_cfg: DictConfig
    sets: dict[str, dict]
    out_dir: Path
    device: str = "auto"
    dtype: str = "auto"
    models_root: str | None = None

    @property
    def fail_fast(self) -> bool:
        return bool(self.eval_cfg.get("fail_fast", False))

    def named_set(self, section: str, name: str | None) -> dict:
        """`eval.<section>.set`: a set of `eval.sets` by name; null is the first (so own sets need no rename)."""
        if name is None and self.sets:
            return next(iter(self.sets.values()))
        if not name or name not in self.sets:
            raise EvalInputError(f"eval.{section}.set={name!r} is not one of eval.sets ({sorted(self.sets)})")
        return self.sets[name]

    def guarded(self, what: str, fn, *args) -> dict:
        return _run_guarded(what, self.fail_fast, fn, *args)

    def pytorch_only(self) -> dict | None:
        """The entry of a section that needs the PyTorch model, when the backend is CTranslate2."""
        # faster-whisper has no assistant model; noise is a PyTorch probe
        if isinstance(self.whisper, CT2Model):
            return {
                "status": "skipped",
                "reason": "backend=ctranslate2 runs the short-form, long-form and latency",
            }
        return None


def _settings(values: dict) -> DictConfig:
    """A section's keyword arguments (its config node, less `_target_`) as one config, `run` left out."""
    return OmegaConf.create({k: v for k, v in values.items() if k != "run"})


def short_form(run: EvalRun) -> dict | None:
    """WER of every set of `eval.sets` (normalised and orthographic) and their averages; None without sets."""
    if not run.sets:
        return None
    results = {
        name: run.guarded(f"set {name}", evaluate_short_set, run.whisper, entry, run.eval_cfg, run.out_dir)
        for name, entry in run.sets.items()
    }
    return {"sets": results, "average": averages(results)}


def long_form(
    run: EvalRun,
    *,
    sets: dict | None,
    algorithms: list[str],
    max_new_tokens: int = 444,
    chunk_length_s: float = 30,
    stride_length_s: float | None = None,
    batch_size: int = 8,
    sequential: dict | None = None,
) -> dict:
    """Long-form WER of each recording set by each of `algorithms` (chunked: windows of `chunk_length_s`
    overlapping by `stride_length_s`, `batch_size` at a time; sequential: OpenAI's, with `sequential` settings)."""
    long_cfg = _settings(locals())
    long_sets = {name: set_entry(name, e, "long_form.sets") for name, e in (sets or {}).items()}
    return {
        "sets": {
            name: run.guarded(
                f"long-form set {name}",
                evaluate_long_set,
                run.whisper,
                entry,
                long_cfg,
                run.eval_cfg,
                run.out_dir,
            )
            for name, entry in long_sets.items()
        }
    }


def speculative(
    run: EvalRun,
    *,
    assistant: Any = None,
    set: str | None = None,
    samples: int | None = None,
    warmup: int = 1,
) -> dict:
    """The model's speed-up with `assistant` (a student directory or model config) drafting, on `samples` of `set`."""
    spec = _settings(locals())
    return run.pytorch_only() or run.guarded(
        "speculative decoding",
        lambda: evaluate_speculative(
            run.whisper,
            run.named_set("speculative", set),
            spec,
            run.eval_cfg,
            run.device,
            run.dtype,
            run.out_dir,
            run.models_root,
        ),
    )


def latency(
    run: EvalRun,
    *,
    set: str | None = None,
    batch_sizes: list[int],
    samples: int | None = None,
    warmup: int = 1,
    repeats: int = 1,
) -> dict:
    """RTFx and decoder tokens/s per batch size on `samples` of `set` (after `warmup` runs, `repeats` runs)."""
    lat = _settings(locals())
    return run.guarded(
        "latency", lambda: evaluate_latency(run.whisper, run.named_set("latency", set), lat, run.eval_cfg)
    )


def noise(
    run: EvalRun,
    *,
    set: str | None = None,
    types: list[str],
    snr_db: list[float],
    samples: int | None = None,
    seed: int = 0,
) -> dict:
    """WER on `samples` of `set` clean and with each noise type mixed in at each SNR (dB)."""
    noise_cfg = _settings(locals())
    return run.pytorch_only() or run.guarded(
        "noise",
        lambda: evaluate_noise(
            run.whisper, run.named_set("noise", set), noise_cfg, run.eval_cfg, run.out_dir
        ),
    )
