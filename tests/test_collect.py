"""The multirun collector: job directories -> one CSV table and one PNG plot."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from distil.collect import collect, main, swept_keys


def fake_job(root: Path, num: int, overrides: list[str], metrics: dict | None) -> None:
    job = root / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if metrics is not None:
        (job / "metrics.json").write_text(json.dumps(metrics))


def long_metrics(wer: float, ins: float) -> dict:
    return {
        "model": {"name": "m", "parameters": 10},
        "long_form": {"sets": {"longform": {"status": "ok", "chunked": {"wer": wer, "insertion_rate": ins}}}},
    }


def test_fake_multirun_becomes_a_sorted_table_and_a_plot(tmp_path, capsys):
    root = tmp_path / "multirun"
    # job order on disk differs from numeric order of the swept value
    fake_job(root, 0, ["model=tiny_en", "eval.long_form.chunk_length_s=30"], long_metrics(12.5, 1.0))
    fake_job(root, 1, ["model=tiny_en", "eval.long_form.chunk_length_s=10"], long_metrics(20.0, 3.0))
    fake_job(root, 2, ["model=tiny_en", "eval.long_form.chunk_length_s=20"], long_metrics(15.0, 2.0))
    fake_job(root, 10, ["model=tiny_en", "eval.long_form.chunk_length_s=25"], None)  # failed job
    (root / "multirun.yaml").write_text("hydra: {}\n")

    rows = collect(root)
    assert [r["job"] for r in rows] == ["0", "1", "2", "10"]
    assert swept_keys(rows) == ["eval.long_form.chunk_length_s"]  # model= is constant
    assert rows[1]["long_form.sets.longform.chunked.wer"] == 20.0
    assert rows[3]["status"].startswith("no metrics.json")

    assert main([str(root)]) == 0
    printed = capsys.readouterr().out
    assert "eval.long_form.chunk_length_s" in printed and "20.00" in printed
    with (root / "summary.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 4
    assert table[0]["eval.long_form.chunk_length_s"] == "30"
    assert table[0]["long_form.sets.longform.chunked.wer"] == "12.5"
    assert table[3]["long_form.sets.longform.chunked.wer"] == ""
    png = (root / "summary.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000


def test_over_a_seed_merges_each_rows_jobs_into_mean_and_standard_deviation(tmp_path, capsys):
    root = tmp_path / "multirun"
    wers = {("baseline", 1): 20.0, ("baseline", 2): 24.0, ("linear", 1): 15.0, ("linear", 2): 16.0}
    for num, ((row, seed), wer) in enumerate(wers.items()):
        fake_job(root, num, [f"train.seed={seed}", f"train.ablation={row}"], long_metrics(wer, 1.0))
    fake_job(root, 4, ["train.seed=3", "train.ablation=linear"], None)  # failed: not in the means

    assert main([str(root), "--over", "train.seed"]) == 0
    captured = capsys.readouterr()
    assert "jobs ['4'] have no metrics" in captured.err
    assert "22.00 ± 2.83" in captured.out  # mean of 20 and 24, sample standard deviation 2 * sqrt(2)
    with (root / "summary_over_train.seed.csv").open() as handle:
        table = {r["train.ablation"]: r for r in csv.DictReader(handle)}
    assert table["linear"]["n"] == "2" and table["linear"]["train.seed"] == "1,2"
    assert float(table["linear"]["long_form.sets.longform.chunked.wer"]) == 15.5
    assert abs(float(table["linear"]["long_form.sets.longform.chunked.wer.std"]) - 0.7071) < 1e-4
    assert "job" not in table["linear"] and (root / "summary_over_train.seed.png").stat().st_size > 5_000
    assert (root / "summary.csv").exists()  # the per-job table is still written

    assert main([str(root), "--over", "not.swept"]) == 2
    assert "not a key the jobs vary" in capsys.readouterr().err


def test_collector_errors_are_clear(tmp_path, capsys):
    assert main([str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    assert "no job directories" in capsys.readouterr().err
    fake_job(tmp_path / "one", 0, ["a=1"], {"x": {"wer": 1.0}})
    assert main([str(tmp_path / "one"), "--y", "not.a.column"]) == 2
    assert "unknown metric" in capsys.readouterr().err


def test_real_multirun_of_the_evaluate_stage(tiny_random_dir, tts_clips, tmp_path):
    """`python -m distil.evaluate -m ...` (two jobs on the tiny random model), then the collector."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from distil.data.audio import encode_flac

    home = tmp_path / "home"
    for corpus in ("espeak", "flite"):
        split = home / "corpora" / corpus / "test"
        split.mkdir(parents=True)
        rows = [
            {
                "audio": {"bytes": encode_flac(c["audio"], 16_000), "path": None},
                "text": c["text"],
                "id": f"{corpus}-{i}",
            }
            for i, c in enumerate(tts_clips[:2])
        ]
        pq.write_table(pa.Table.from_pylist(rows), split / "part-0.parquet")
    sweep_dir = tmp_path / "multirun"
    env = {**os.environ, "DISTIL_HOME": str(home)}
    cmd = [
        sys.executable, "-m", "distil.evaluate", "-m",
        "model=path", f"model.path={tiny_random_dir}", "eval=short",
        "eval.max_new_tokens=8", "eval.max_samples=1", "eval.batch_size=1,2",
        f"hydra.sweep.dir={sweep_dir}",
    ]  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for job in ("0", "1"):
        metrics = json.loads((sweep_dir / job / "metrics.json").read_text())
        assert metrics["short_form"]["sets"]["espeak"]["status"] == "ok"
        assert (sweep_dir / job / "config.yaml").exists()
    rows = collect(sweep_dir)
    assert swept_keys(rows) == ["eval.batch_size"]
    assert main([str(sweep_dir)]) == 0
    assert (sweep_dir / "summary.csv").exists() and (sweep_dir / "summary.png").exists()
