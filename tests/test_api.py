"""The Python API (distil.api): `distil.run(stage, overrides)` does what `python -m distil.<stage> <overrides>`
does, and refuses bad input with one line naming it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import distil
from distil.utils.errors import ConfigError

# The tiny random teacher on three clips of the packaged real-speech set: seconds on a CPU.
EVALUATE = [
    "model=tiny_random",
    "~eval.default_sets.espeak",
    "~eval.default_sets.flite",
    "eval.max_samples=3",
    "eval.batch_size=3",
    "eval.guards=null",
    "device=cpu",
]


@pytest.fixture
def home(tmp_path, tiny_random_dir, monkeypatch) -> Path:
    """A DISTIL_HOME with the tiny random teacher (and the tiny.en processor it borrows) already built."""
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    for name in ("whisper-tiny-random", "whisper-tiny.en"):
        (home / "models" / name).symlink_to(Path(tiny_random_dir).parent / name)
    monkeypatch.setenv("DISTIL_HOME", str(home))
    return home


def _cli(home: Path, stage: str, *overrides: str) -> Path:
    """`python -m distil.<stage> <overrides>`; returns its run directory (the only one under runs/<stage>)."""
    before = set((home / "runs" / stage).glob("*"))
    env = {**os.environ, "DISTIL_HOME": str(home), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", f"distil.{stage}", *overrides],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=home,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = set((home / "runs" / stage).glob("*")) - before
    return run_dir


def _predictions(run_dir: Path) -> dict[str, str]:
    files = sorted(run_dir.glob("predictions/**/*.jsonl"))
    return {str(p.relative_to(run_dir)): p.read_text() for p in files}


def _scores(metrics: dict) -> dict:
    """The short-form results without timings (which differ between any two runs)."""
    return {
        name: {k: v for k, v in entry.items() if "time" not in k and "per_second" not in k}
        for name, entry in metrics["short_form"]["sets"].items()
    }


def test_evaluate_from_python_equals_the_command_line(home):
    result = distil.run("evaluate", EVALUATE)
    cli_dir = _cli(home, "evaluate", *EVALUATE)

    run_dir = Path(result["run_dir"])
    assert run_dir.parent == cli_dir.parent == home / "runs" / "evaluate"  # the same run-directory rule
    assert result["metrics"] == json.loads((run_dir / "metrics.json").read_text())
    cli_metrics = json.loads((cli_dir / "metrics.json").read_text())
    assert _scores(result["metrics"]) == _scores(cli_metrics)
    assert result["metrics"]["short_form"]["sets"]["real"]["samples"] == 3
    assert _predictions(run_dir) == _predictions(cli_dir) and _predictions(run_dir)
    # The same records: the resolved config, Hydra's own files and the stage's log.
    for record in ("config.yaml", ".hydra/config.yaml", ".hydra/overrides.yaml"):
        assert (run_dir / record).read_text() == (cli_dir / record).read_text(), record
    assert (run_dir / "run_info.json").is_file()
    assert "metrics written" in (run_dir / "evaluate.log").read_text()


def test_the_run_directory_and_overrides_are_the_commands(home):
    """train names its run directory after the overrides, as `distil-train <overrides>` does (dry run: the plan)."""
    overrides = ["teacher=tiny_random", "student=1dec", "trainer=debug", "dry_run=true"]
    result = distil.run("train", overrides)
    name = "dry_run=true,student=1dec,teacher=tiny_random,trainer=debug"
    assert name not in result["plan"]["run_directory"]  # dry_run is excluded from the name
    assert result["plan"]["run_directory"].endswith("student=1dec,teacher=tiny_random,trainer=debug")
    assert Path(result["run_dir"]).parent == home / "runs" / "train"


@pytest.mark.unit
@pytest.mark.parametrize(
    ("stage", "overrides", "names"),
    [
        ("evaluat", [], ["'evaluat'", "evaluate", "pseudo_label", "pipeline"]),
        ("evaluate", "model=tiny_en", ["list of strings", "'model=tiny_en'"]),
        ("evaluate", ["-m", "eval.max_samples=1,2"], ["-m", "python -m distil.evaluate"]),
        ("evaluate", ["eval.max_new_token=8"], ["eval.max_new_token", "not in struct"]),
        ("evaluate", ["model=no_such_model"], ["model/no_such_model", "tiny_en"]),
        ("evaluate", ["eval.max_samples=-3"], ["eval.max_samples", "-3"]),
        ("train", ["trainer.max_steps=ten"], ["trainer.max_steps", "ten"]),
    ],
    ids=["unknown stage", "a string", "a flag", "misspelt key", "unknown choice", "range", "type"],
)
def test_bad_input_is_one_config_error_line_naming_it(tmp_path, monkeypatch, stage, overrides, names):
    monkeypatch.setenv("DISTIL_HOME", str(tmp_path))
    with pytest.raises(ConfigError) as err:
        distil.run(stage, overrides)
    message = str(err.value)
    assert "\n" not in message, message
    for name in names:
        assert name in message, message


@pytest.mark.unit
def test_import_distil_stays_cheap():
    """`import distil` (and the API module) loads no torch: the stages import it when one runs."""
    code = "import sys, distil, distil.api; print(sorted({'torch', 'transformers', 'lightning'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
