"""The evaluation sections: short-form sets, long-form (chunked / sequential), speculative decoding, latency,
noise. Each section is one function `section(run, **settings)` that a `_target_` node of the eval config names
(conf/eval/*.yaml, `_partial_: true`; its other keys are the settings, checked against the signature):
`distil.evaluate` calls it with the `EvalRun` and stores what it returns under the node's key in metrics.json
(None: nothing to store). A section returns `headline` numbers (`scoring.headline`), which the report, the
pipeline's comparison and the sweep objective read without knowing the section. The model is a backend
(`PyTorchModel` or `CT2Model`) with one interface; a section never asks which. A failing set becomes an error
entry (unless `eval.fail_fast`) so the other sets still run.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from distil.data.audio import add_noise, make_noise
from distil.data.text import corpus_wer, get_normalizer
from distil.evaluation.ct2_backend import CT2Model
from distil.evaluation.data import EvalInputError, Sample, has_references, load_samples, set_entry
from distil.evaluation.longform import ALGORITHMS, LongFormSettings, longform_metrics, repeated_ngrams
from distil.evaluation.pytorch_backend import PyTorchModel
from distil.evaluation.scoring import averages, decoding_counts, headline, prediction_rows, score
from distil.utils.errors import InputError
from distil.utils.io import write_jsonl
from distil.whisper.generation import Guards, Transcript
from distil.whisper.loading import load_model

log = logging.getLogger(__name__)


@dataclass
class EvalRun:
    """What every section is called with: the model under test, the settings all sections share (`eval.*`:
    batch size, token limit, beams, sample caps), the short-form sets (`eval.sets`, which the other sections
    name by `set`), the output directory and how further models (an assistant) load."""

    model: PyTorchModel | CT2Model
    eval_cfg: DictConfig
    sets: dict[str, dict]
    out_dir: Path
    device: str = "auto"
    dtype: str = "auto"
    models_root: str | None = None
    guards: Guards | None = None  # eval.guards: the loop guards every short-form decode runs under

    def named_set(self, section: str, name: str | None) -> dict:
        """`eval.<section>.set`: a set of `eval.sets` by name; null is the first (so own sets need no rename)."""
        if name is None and self.sets:
            return next(iter(self.sets.values()))
        if not name or name not in self.sets:
            raise EvalInputError(f"eval.{section}.set={name!r} is not one of eval.sets ({sorted(self.sets)})")
        return self.sets[name]

    def samples(self, entry: dict, cap: int | None = None) -> tuple[list[Sample], list[dict]]:
        """One set decoded: at most `cap` (and eval.max_samples) samples, and the bad audio skipped."""
        caps = [n for n in (cap, self.eval_cfg.get("max_samples")) if n]
        return load_samples(entry, min(caps) if caps else None, self.eval_cfg.get("skip_bad_audio", False))

    def transcribe(self, waves: list, entry: dict) -> list[Transcript]:
        """Short-form transcripts with the shared decoding settings (eval.batch_size, max_new_tokens, num_beams,
        guards)."""
        cfg = self.eval_cfg
        return self.model.transcribe(
            waves,
            int(cfg.batch_size),
            entry["language"],
            entry["task"],
            int(cfg.max_new_tokens),
            int(cfg.get("num_beams", 1)),
            self.guards,
        )

    def write_predictions(self, section: str, stem: str, rows: list[dict]) -> str:
        rel = Path("predictions") / section / f"{stem}.jsonl"
        write_jsonl(self.out_dir / rel, rows)
        return str(rel)

    def guarded(self, what: str, fn, *args) -> dict:
        """`fn(*args)`; on failure the error as the entry (other sets still run) unless eval.fail_fast."""
        try:
            return fn(*args)
        except Exception as err:
            if self.eval_cfg.get("fail_fast", False):
                raise
            # input errors are one line; anything else is a bug worth its traceback
            log.error("%s failed: %s", what, err, exc_info=not isinstance(err, InputError))
            return {"status": "error", "error": f"{type(err).__name__}: {err}"}


def _mean(values) -> float | None:
    values = [v for v in values if isinstance(v, int | float)]
    return sum(values) / len(values) if values else None


# ----------------------------------------------------------------------------------------------- short form


def short_form(run: EvalRun) -> dict | None:
    """WER of every set of `eval.sets` (normalised and orthographic) and their averages; None without sets."""
    if not run.sets:
        return None
    results = {name: run.guarded(f"set {name}", _short_set, run, entry) for name, entry in run.sets.items()}
    average = averages(results)
    scored = [r for r in results.values() if r.get("status") != "error"]
    return {
        "sets": results,
        "average": average,
        "guards": asdict(run.guards) if run.guards else None,
        "headline": headline(
            short_form_wer=("short-form WER %", average.get("wer_sample_weighted"), "lower"),
            short_form_hit_limit=(
                "outputs cut at the token limit",
                sum(r["hit_token_limit"] for r in scored) if scored else None,
                "lower",
            ),
            short_form_repeated_5grams=(
                "repeated 5-grams",
                sum(r["repeated_5grams"] for r in scored) if scored else None,
                "lower",
            ),
        ),
    }


def _short_set(run: EvalRun, entry: dict) -> dict:
    # `eval.max_samples` caps each set: the shared cap, not a setting of this section
    samples, problems = run.samples(entry)
    transcripts = run.transcribe([s.audio for s in samples], entry)
    predictions = [t.text for t in transcripts]
    rows = [
        {**row, "tokens": t.tokens, "hit_limit": t.hit_limit}
        for row, t in zip(prediction_rows(samples, predictions, entry["language"]), transcripts, strict=True)
    ]
    base = {
        "predictions": run.write_predictions("short_form", entry["name"], rows),
        "audio_seconds": sum(s.duration for s in samples),
        "skipped_bad_audio": problems,
        "truncated_over_30s": sum(s.duration > 30 for s in samples),
        **decoding_counts(transcripts, get_normalizer(entry["language"])),
    }
    if not has_references(samples):
        return {"status": "no references", "samples": len(samples), **base}
    references = [s.reference for s in samples]
    return {"status": "ok", **score(references, predictions, entry["language"], entry["metric"]), **base}


# ------------------------------------------------------------------------------------------------ long form


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
    overlapping by `stride_length_s`, `batch_size` at a time; sequential: OpenAI's, with `sequential` settings).
    Recordings are never capped by eval.max_samples (a long-form set is a few whole recordings)."""
    unknown = sorted(set(algorithms) - set(ALGORITHMS))
    if unknown:
        raise EvalInputError(f"eval.long_form.algorithms has {unknown}: use {list(ALGORITHMS)}")
    settings = LongFormSettings.from_config(
        sequential,
        max_new_tokens=int(max_new_tokens),
        chunk_length_s=float(chunk_length_s),
        stride_length_s=stride_length_s,
        batch_size=int(batch_size),
    )
    entries = {name: set_entry(name, e, "long_form.sets") for name, e in (sets or {}).items()}
    results = {
        name: run.guarded(f"long-form set {name}", _long_set, run, entry, algorithms, settings)
        for name, entry in entries.items()
    }
    return {
        "sets": results,
        "headline": headline(
            **{
                f"long_form_wer_{algorithm}": (
                    f"long-form WER % ({algorithm})",
                    _mean(r.get(algorithm, {}).get("wer") for r in results.values()),
                    "lower",
                )
                for algorithm in algorithms
            }
        ),
    }


def _long_set(run: EvalRun, entry: dict, algorithms: list[str], settings: LongFormSettings) -> dict:
    samples, problems = load_samples(entry, None, run.eval_cfg.get("skip_bad_audio", False))
    waves, references = [s.audio for s in samples], [s.reference or "" for s in samples]
    normalizer = get_normalizer(entry["language"])
    result: dict[str, Any] = {
        "status": "ok" if has_references(samples) else "no references",
        "recordings": len(samples),
        "audio_seconds": sum(s.duration for s in samples),
        "skipped_bad_audio": problems,
    }
    for algorithm in algorithms:
        supported = run.model.long_form_algorithms
        if algorithm not in supported:  # whisper.cpp and openai-whisper have only the sequential algorithm
            result[algorithm] = {
                "status": "skipped",
                "reason": f"{run.model.kind} runs {', '.join(supported)} only",
            }
            continue
        predictions, used = run.model.transcribe_long(
            waves, algorithm, settings, entry["language"], entry["task"]
        )
        rows = prediction_rows(samples, predictions, entry["language"])
        out: dict[str, Any] = {
            "settings": used,
            "predictions": run.write_predictions("long_form", f"{entry['name']}.{algorithm}", rows),
        }
        if has_references(samples):
            out.update(longform_metrics(references, predictions, normalizer))
        else:
            out["repeated_5grams"] = sum(repeated_ngrams(p, 5, normalizer) for p in predictions)
        result[algorithm] = out
    return result


# ---------------------------------------------------------------------------------------------- speculative


def speculative(
    run: EvalRun,
    *,
    assistant: Any = None,
    set: str | None = None,
    samples: int | None = None,
    warmup: int = 1,
) -> dict:
    """The model's speed-up with `assistant` (a student directory or model config) drafting, on `samples` of `set`,
    and whether the output stays the model's own greedy output."""
    if not assistant:
        return {
            "status": "skipped",
            "reason": "no assistant: set eval.speculative.assistant=<student directory>",
        }
    if not run.model.supports_speculative:
        return {"status": "skipped", "reason": f"the {run.model.kind} backend has no assisted generation"}

    def measure() -> dict:
        entry = run.named_set("speculative", set)
        assistant_cfg = assistant if isinstance(assistant, DictConfig | dict) else {"path": assistant}
        drafter = load_model(assistant_cfg, run.device, run.dtype, run.models_root)
        chosen, _ = run.samples(entry, samples)
        result = run.model.speculative(
            drafter,
            [s.audio for s in chosen],
            entry["language"],
            entry["task"],
            int(run.eval_cfg.max_new_tokens),
            int(warmup),
        )
        rows = [
            {"id": s.id, "reference": s.reference, "teacher": t, "speculative": p}
            for s, t, p in zip(
                chosen, result.pop("teacher_texts"), result.pop("speculative_texts"), strict=True
            )
        ]
        return {
            "status": "ok",
            "set": entry["name"],
            "predictions": run.write_predictions("speculative", entry["name"], rows),
            **result,
            "headline": headline(
                speculative_speedup=("speculative speed-up", result.get("speedup"), "higher"),
                speculative_identical=("speculative = teacher", result.get("identical_fraction"), "higher"),
            ),
        }

    return run.guarded("speculative decoding", measure)


# -------------------------------------------------------------------------------------------------- latency


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

    def measure() -> dict:
        entry = run.named_set("latency", set)
        chosen, _ = run.samples(entry, samples)
        result = run.model.measure_latency(
            [s.audio for s in chosen],
            [int(b) for b in batch_sizes],
            int(warmup),
            int(repeats),
            entry["language"],
            entry["task"],
            int(run.eval_cfg.max_new_tokens),
        )
        measured = [b for b in result["batch_sizes"].values() if b.get("rtfx") is not None]
        largest = max(measured, key=lambda b: b["batch_size"]) if measured else {}
        return {
            "status": "ok",
            "set": entry["name"],
            **result,
            "headline": headline(rtfx=("RTFx", largest.get("rtfx"), "higher")),
        }

    return run.guarded("latency", measure)


# ---------------------------------------------------------------------------------------------------- noise


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

    def measure() -> dict:
        entry = run.named_set("noise", set)
        chosen, _ = run.samples(entry, samples)
        if not has_references(chosen):
            raise EvalInputError(f"noise robustness needs references; set {entry['name']!r} has none")
        normalizer = get_normalizer(entry["language"])
        references = [s.reference for s in chosen]
        clean = [t.text for t in run.transcribe([s.audio for s in chosen], entry)]
        out: dict[str, Any] = {
            "status": "ok",
            "set": entry["name"],
            "samples": len(chosen),
            "clean": corpus_wer(references, clean, normalizer).wer,
        }
        for kind in types:
            out[kind] = {}
            for snr in (float(s) for s in snr_db):
                noisy = [
                    add_noise(s.audio, make_noise(kind, len(s.audio), int(seed) + i), snr)
                    for i, s in enumerate(chosen)
                ]
                predictions = [t.text for t in run.transcribe(noisy, entry)]
                out[kind][f"{snr:g}"] = corpus_wer(references, predictions, normalizer).wer
                rows = prediction_rows(chosen, predictions, entry["language"])
                run.write_predictions("noise", f"{entry['name']}.{kind}.snr{snr:g}", rows)
        noisy_wers = [wer for kind in types for wer in out[kind].values()]
        out["headline"] = headline(
            noise_wer=("WER % under noise (mean of types x SNRs)", _mean(noisy_wers), "lower")
        )
        return out

    return run.guarded("noise", measure)
