"""Scoring transcripts: WER (normalised and orthographic) per set, averages over sets, prediction rows."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from distil.data.text import corpus_cer, corpus_wer, get_normalizer, identity, repeated_ngrams, sample_wer
from distil.evaluation.data import EvalInputError, Sample

log = logging.getLogger(__name__)


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


def decoding_counts(transcripts: Sequence, normalizer) -> dict:
    """How many outputs ran into the token limit (cut: most likely a loop the guards did not stop), came out
    empty (no speech found, or a guard dropped the clip), and how many of their 5-grams repeat (loops)."""
    return {
        "hit_token_limit": sum(t.hit_limit for t in transcripts),
        "empty_outputs": sum(not t.text.strip() for t in transcripts),
        "repeated_5grams": sum(repeated_ngrams(t.text, 5, normalizer) for t in transcripts),
    }


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


def validation_metrics(
    outputs: dict[int, dict[str, tuple[str, str]]], names: Sequence[str], languages: Sequence[str | None]
) -> dict[str, float]:
    """`val/<set>/wer`, `wer_orthographic`, `samples` per validation set and `val/wer_weighted` (by samples) and
    `val/wer_macro` over the sets, from {dataloader index: {sample id: (reference, prediction)}}."""
    metrics: dict[str, float] = {}
    weighted_num, weighted_den, macro = 0.0, 0, []
    for idx, rows in sorted(outputs.items()):
        name = names[idx] if idx < len(names) else f"set{idx}"
        refs = [r for r, _ in rows.values()]
        hyps = [h for _, h in rows.values()]
        result = score(refs, hyps, languages[idx] if idx < len(languages) else None)
        if result["wer"] is None:
            continue
        metrics[f"val/{name}/wer"] = result["wer"]
        metrics[f"val/{name}/wer_orthographic"] = result["wer_orthographic"]
        metrics[f"val/{name}/samples"] = result["scored"]  # under DDP too: the set, not a rank's share
        weighted_num += result["wer"] * result["scored"]
        weighted_den += result["scored"]
        macro.append(result["wer"])
    if weighted_den:
        metrics["val/wer_weighted"] = weighted_num / weighted_den
        metrics["val/wer_macro"] = sum(macro) / len(macro)
    return metrics


def headline(**numbers: tuple[str, float | None, str]) -> dict:
    """A section's headline numbers as metrics.json stores them: `key=(label, value, "lower" | "higher")`, the
    last saying which way is better. The report, the pipeline's comparison and the sweep objective read every
    section's headline without knowing the section."""
    return {
        key: {"label": label, "value": value, "better": better}
        for key, (label, value, better) in numbers.items()
    }


def headlines(metrics: dict) -> dict[str, dict]:
    """Every section's headline numbers in one metrics.json, in section order: {key: {label, value, better}}."""
    out: dict[str, dict] = {}
    for result in metrics.values():
        if isinstance(result, dict) and isinstance(result.get("headline"), dict):
            out.update(result["headline"])
    return out


def headline_columns(evals: dict[str, dict]) -> dict[str, str]:
    """{key: label} of every headline number any of the models' metrics.json has, in section order."""
    columns: dict[str, str] = {}
    for metrics in evals.values():
        columns.update({key: h["label"] for key, h in headlines(metrics).items() if key not in columns})
    return columns


def primary_metric(metrics: dict) -> float | None:
    """The number a Hydra sweeper minimises: the first error rate among the headlines (short-form WER when that
    section runs, else the long-form WER)."""
    return next(
        (
            h["value"]
            for h in headlines(metrics).values()
            if h["better"] == "lower" and h["value"] is not None
        ),
        None,
    )


def failed_sets(metrics: dict) -> dict[str, str]:
    """`{<section>.<set>: error}` of every set of any section that could not be evaluated."""
    return {
        f"{section}.{name}": entry.get("error", "")
        for section, result in metrics.items()
        if isinstance(result, dict) and isinstance(result.get("sets"), dict)
        for name, entry in result["sets"].items()
        if isinstance(entry, dict) and entry.get("status") == "error"
    }
