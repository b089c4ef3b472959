"""The package's shape (CONTRIBUTING.md): imports point down, and no library module imports a command."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import distil

pytestmark = pytest.mark.unit  # no model, no audio synthesis: `make test-unit`

PACKAGE = Path(distil.__file__).resolve().parent
COMMANDS = {
    "corpus",
    "import_model",
    "pseudo_label",
    "init_student",
    "train",
    "evaluate",
    "pipeline",
    "export",
    "collect",
    "api",  # distil.run: any command from Python
}
# Lower levels never import higher ones (equal levels may import each other).
LEVELS = {
    "utils": 0,
    "data": 1,
    "whisper": 1,
    "training": 2,
    "evaluation": 2,
    "datamodules": 3,
    "modules": 3,
    "config": 4,  # the config schema names the values every part accepts; only commands import it
}


def _distil_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    return [
        n.module
        for n in ast.walk(tree)
        if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("distil.")
    ]


def test_commands_are_the_top_level_modules():
    top = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert top == COMMANDS
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()} == set(LEVELS)


def test_imports_point_down():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).parts
        if len(parts) == 1 or "resources" in parts:
            continue
        for module in _distil_imports(path):
            target = module.split(".")[1]
            if target in COMMANDS or LEVELS.get(target, -1) > LEVELS[parts[0]]:
                wrong.append(f"{path.relative_to(PACKAGE)} imports {module}")
    assert not wrong, wrong
