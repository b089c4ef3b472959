"""The benchmark scripts run end to end (tiny random teacher, a handful of clips): their numbers go in the
README, so they must keep working. The speed itself is never asserted here (see benchmarks/)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from distil.whisper.student import init_student

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def run_script(name: str, *args: str, cwd: Path) -> str:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / name), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


# Each benchmark configuration is a subprocess (~15 s here): the slow tier runs them.
@pytest.mark.slow
@pytest.mark.parametrize("dtypes", [["fp32"], ["fp32", "bf16"]])
def test_train_step_benchmark_measures_each_precision(tmp_path, tiny_random_dir, dtypes):
    student = init_student(tiny_random_dir, tmp_path / "student", decoder_layers=1)
    out = tmp_path / "results.json"
    stdout = run_script(
        "train_step.py",
        *("--teacher", str(tiny_random_dir), "--student", str(student)),
        *("--batch-size", "2", "--steps", "1", "--warmup", "0", "--threads", "1"),
        *("--configs", "reference-448,longest-cache-frozen-embed", "--dtypes", *dtypes, "--json", str(out)),
        cwd=tmp_path,
    )
    results = json.loads(out.read_text())
    assert sorted((r["dtype"], r["config"]) for r in results) == sorted(
        (dtype, config) for dtype in dtypes for config in ("longest-cache-frozen-embed", "reference-448")
    )
    for r in results:
        assert r["seconds_per_step"] > 0 and r["peak_memory_mib"] > 0
        if r["config"] == "reference-448":
            assert r["speedup_vs_reference"] == 1.0
    # Both configurations train on the same labels: the padding to 448 adds no label tokens.
    assert len({r["label_tokens_per_step"] for r in results}) == 1
    assert f"| {dtypes[-1]} | longest-cache-frozen-embed |" in stdout


@pytest.mark.slow  # ~20 s
def test_pseudo_label_benchmark_compares_stage_and_pipeline(tmp_path):
    stdout = run_script(
        "pseudo_label.py",
        *("--teacher", "tiny_random", "--clips", "4", "--batch-sizes", "2", "--pipeline-batch-sizes", "2"),
        *("--pipeline-threads", "1", "--stage-devices", "1", "--dtypes", "fp32", "--shard-size", "2"),
        *("--max-new-tokens", "8", "--out", str(tmp_path / "table.md")),
        cwd=tmp_path,
    )
    table = (tmp_path / "table.md").read_text()
    assert table in stdout
    rows = [
        line
        for line in table.splitlines()
        if line.startswith("| transformers") or line.startswith("| distil")
    ]
    assert len(rows) == 2
    bound = [line for line in table.splitlines() if line.startswith("| bound: the encoder pass alone, fp32")]
    assert len(bound) == 1 and float(bound[0].split("|")[3]) > 0
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[2]) > 0  # audio-s/s
        assert float(cells[5]) >= 0  # WER %
        done, total = cells[6].split("/")
        assert total == "4" and 0 <= int(done) <= 4


@pytest.mark.slow  # ~25 s; test_export checks the same CTranslate2 equality on the real tiny.en
def test_deploy_benchmark_compares_pytorch_and_ctranslate2(tmp_path, tiny_random_dir):
    stdout = run_script(
        "deploy.py",
        *("--teacher", "tiny_random", "--decoder-layers", "1", "--clips", "2", "--batch-sizes", "1", "2"),
        *("--repeats", "1", "--threads", "1", "--max-new-tokens", "8"),
        cwd=tmp_path,
    )
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in stdout.splitlines()[2:] if line]
    assert len(rows) == 2 * 3 * 2  # teacher/student x PyTorch/float32/int8 x batch 1/2
    for model, backend, batch, rtfx, tokens_per_s, _, wer, identical in rows:
        assert float(rtfx) > 0 and float(tokens_per_s) > 0 and float(wer) >= 0
        if backend in ("PyTorch fp32", "CTranslate2 float32"):  # float32 CTranslate2 = PyTorch, clip for clip
            assert identical == "2/2", (model, backend, batch)


def test_kd_loss_benchmark_compares_the_textbook_and_the_fused_loss(tmp_path):
    stdout = run_script("kd_loss.py", "--tokens", "12", "--vocab", "300", "--repeats", "2", cwd=tmp_path)
    assert "same loss and gradient: True" in stdout
    assert "| textbook |" in stdout and "| distil |" in stdout
