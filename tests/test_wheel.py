"""`pip install .` (not editable) gives console scripts that find their configs from any directory.

The wheel is built from a copy of the sources (the checkout stays clean) and installed with `--no-deps` into a
fresh venv whose only view of the dependencies is a `.pth` line naming this venv's site-packages (so nothing
is downloaded, and this checkout's editable install is not on the path: its finder is never loaded).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from helpers import PROJECT_ROOT

CONSOLE_SCRIPTS = [
    "corpus",
    "import-model",
    "pseudo-label",
    "init-student",
    "train",
    "evaluate",
    "pipeline",
    "export",
]


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert result.returncode == 0, f"{cmd}: {result.stdout[-1500:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("distil", "conf"):
        shutil.copytree(PROJECT_ROOT / name, src / name, symlinks=True, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(PROJECT_ROOT / name, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", work, src])
    (wheel,) = work.glob("distil-*.whl")

    venv = work / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    site = Path(sysconfig.get_paths(vars={"base": str(venv), "platbase": str(venv)})["purelib"])
    (site / "_distil_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    pip = [sys.executable, "-m", "pip", "--python", venv / "bin" / "python"]
    # --ignore-installed: pip must not uninstall the editable distil it can see through the .pth line.
    _run([*pip, "install", "-q", "--no-deps", "--ignore-installed", wheel])
    return venv


def test_wheel_ships_the_configs_and_imports_from_the_wheel(wheel_venv, tmp_path):
    where = _run(
        [wheel_venv / "bin" / "python", "-c", "import distil.utils.paths as p; print(p.CONF_DIR)"],
        cwd=tmp_path,
    ).stdout.strip()
    conf = Path(where)
    assert str(conf).startswith(str(wheel_venv)), f"distil was imported from {conf}, not from the wheel"
    assert (conf / "train.yaml").is_file() and (conf / "hydra" / "launcher" / "slurm.yaml").is_file()
    shipped = {p.relative_to(conf) for p in conf.rglob("*.yaml")}
    assert shipped == {p.relative_to(PROJECT_ROOT / "conf") for p in (PROJECT_ROOT / "conf").rglob("*.yaml")}


@pytest.mark.slow  # about 30 s: every console script run from another directory of a wheel install
def test_console_scripts_find_their_config_from_any_directory(wheel_venv, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["DISTIL_HOME"] = str(tmp_path)
    commands = [[wheel_venv / "bin" / f"distil-{s}", "--cfg", "job", "--resolve"] for s in CONSOLE_SCRIPTS]
    commands.append([wheel_venv / "bin" / "distil-train", "--help"])
    with ThreadPoolExecutor(2) as pool:  # each script mostly imports torch: two at a time on two cores
        results = list(pool.map(lambda cmd: _run(cmd, cwd=tmp_path, env=env), commands))
    for script, result in zip(CONSOLE_SCRIPTS, results, strict=False):
        assert f"root: {tmp_path}" in result.stdout, script
    assert "train is powered by Hydra" in results[-1].stdout
