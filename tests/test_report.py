"""The pipeline report, built from a constructed run directory: every section, and a missing one."""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from distil.evaluation.report import write_report
from distil.evaluation.scoring import headline


def metrics(params: float, dec: int, short: dict[str, float], long_wer: float, rtfx: float) -> dict:
    long = {
        "wer": long_wer, "substitutions": 5, "insertions": 7, "deletions": 2, "substitution_rate": 5.0,
        "insertion_rate": 7.0, "deletion_rate": 2.0, "repeated_5grams": 3,
    }  # fmt: skip
    return {
        "model": {"parameters": params, "decoder_layers": dec, "decoder_macs_per_token": 8e6 * dec + 20e6},
        "short_form": {
            "sets": {name: {"status": "ok", "wer": wer} for name, wer in short.items()},
            "average": {"wer_sample_weighted": sum(short.values()) / len(short)},
            "headline": headline(short_form_wer=("short-form WER %", sum(short.values()) / len(short), "lower")),
        },
        "long_form": {
            "sets": {"longform": {"status": "ok", "chunked": long, "sequential": {**long, "wer": 9.5}}},
            "headline": headline(long_form_wer_chunked=("long-form WER % (chunked)", long_wer, "lower")),
        },
        "latency": {"headline": headline(rtfx=("RTFx", 2 * rtfx, "higher")), "batch_sizes": {
            "1": {"batch_size": 1, "rtfx": rtfx, "tokens_per_second": 40.0, "tokens": 120, "decoder_ms_per_token": 5 * dec},
            "4": {"batch_size": 4, "rtfx": 2 * rtfx, "tokens_per_second": 80.0, "tokens": 120},
        }},
    }  # fmt: skip


def constructed_run(tmp_path: Path) -> dict:
    from torch.utils.tensorboard import SummaryWriter

    train_dir = tmp_path / "students" / "demo"
    with SummaryWriter(str(train_dir / "tensorboard" / "version_0")) as tb:
        for step in range(5):
            tb.add_scalar("train/loss", 3.0 - 0.4 * step, step)
            tb.add_scalar("train/kl", 1.0 - 0.1 * step, step)
            tb.add_scalar("val/wer_weighted", 80.0 - 10 * step, step)
            tb.add_scalar("lr-AdamW/pg1", 1e-4, step)  # not a loss term: left out
    labels = tmp_path / "pseudo_labels" / "espeak" / "train"
    labels.mkdir(parents=True)
    pq.write_table(pa.table({"pl_wer": [0.0, 5.0, 12.5, None, 40.0]}), labels / "part-00000.parquet")
    teacher = metrics(37.8e6, 4, {"espeak": 20.3, "flite": 9.8}, 12.0, 11.0)
    student = metrics(33.0e6, 2, {"espeak": 25.1, "flite": 12.2}, 11.0, 14.0)
    teacher["speculative"] = {
        "speedup": 1.4,
        "identical_fraction": 1.0,
    }  # no headline: left out of the first table
    return {
        "pseudo_label": {"splits": {"espeak/train": {"out_dir": str(labels)}}},
        "train": {
            "out_dir": str(train_dir), "global_step": 400, "train_seconds": 720.0, "best_val_wer_weighted": 40.0,
            "data_filter": {"espeak/train": {"total": 5, "kept": 3, "dropped": {"wer": 1, "no_reference": 1}}},
        },
        "evaluate": {"teacher": teacher, "student": student},
    }  # fmt: skip


def test_report_has_every_section_from_the_runs_own_files(tmp_path):
    report = write_report(tmp_path, constructed_run(tmp_path), wer_threshold=10.0).read_text()
    # the headline table: size, then each section's headline numbers in section order
    assert (
        "| model | parameters (M) | decoder layers | short-form WER % | long-form WER % (chunked) | RTFx |"
        in report
    )
    assert "| teacher | 37.8 | 4 | 15.05 | 12.00 | 22.00 |" in report
    assert "| teacher | 20.30 | 9.80 |" in report  # short form, per set
    assert "| student | longform | sequential | 9.50 | 5.00 | 7.00 | 2.00 | 3 |" in report
    assert "| student | 4 | 28.00 | 80.0 | 120 | - | - | 1.44 |" in report  # no decoder timing at batch 4
    # the decoder's own speed per token: measured against the teacher's, and its bound (52 M / 36 M MACs)
    assert "| student | 1 | 14.00 | 40.0 | 120 | 10.00 | 2.00 | 1.44 |" in report
    assert "| teacher | 1 | 11.00 | 40.0 | 120 | 20.00 | 1.00 | 1.00 |" in report
    assert "| 1.40 | 1.00 |" in report and "| 400 | 12.0 | 40.00 |" in report
    images = re.findall(r"!\[[^\]]*\]\((plots/[^)]+)\)", report)
    assert len(images) == 5 and "Not available" not in report
    for image in images:
        assert (tmp_path / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_stages_are_named_not_skipped(tmp_path):
    results = constructed_run(tmp_path)
    del results["train"], results["pseudo_label"]
    results["evaluate"]["student"].pop("latency")
    report = write_report(tmp_path, results).read_text()
    assert "*Not available: training did not run in this pipeline run.*" in report
    assert "*Not available: training did not run here, or wrote no TensorBoard scalars.*" in report
    assert "*Not available: pseudo-labelling did not run here" in report
    assert "| teacher | 4 | 22.00 | 80.0 |" in report and "| student | 4 |" not in report
    empty = write_report(tmp_path / "failed", {}).read_text()  # the pipeline failed before evaluating
    assert "no model was evaluated" in empty and empty.count("Not available") == 6
