"""Every command in README.md and docs/ runs as written: each fenced shell block is extracted and each distil
command in it is composed as its console script would compose it (Hydra, the same overrides, sweeps at their
first value), fully resolved (`--cfg job --resolve`), and the pipeline's plan built as `dry_run=true` builds it.
`make` targets must exist, scripts must exist, and every relative link must point at a file of the repository.
The CPU-cheap path is run for real by tests/test_quickstart.py."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf, open_dict

import distil.utils.launch  # noqa: F401 - registers the slurm resolvers
import distil.whisper.models  # noqa: F401 - registers model_dir_name
import distil.whisper.student  # noqa: F401 - registers student_name
from distil.utils.paths import CONF_DIR

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", REPO / "CONTRIBUTING.md", *sorted((REPO / "docs").rglob("*.md"))]
SHELL_BLOCK = re.compile(r"^```(?:bash|sh|shell|console)\n(.*?)^```", re.S | re.M)
# The console scripts and the main config each composes (pyproject.toml [project.scripts]).
CONFIGS = {
    "corpus": "corpus",
    "import-model": "import_model",
    "pseudo-label": "pseudo_label",
    "init-student": "init_student",
    "train": "train",
    "evaluate": "evaluate",
    "export": "export",
    "pipeline": "pipeline",
}
# Commands of other tools that the docs show for the user to run (installing, logging in, viewing logs).
OTHER_TOOLS = {
    "pip",
    "git",
    "cd",
    "cp",
    "mkdir",
    "export",
    "huggingface-cli",
    "hf",
    "tensorboard",
    "mlflow",
    "wandb",
    "sbatch",
    "ls",
    "cat",
}


def _is_python(word: str) -> bool:
    return Path(word).name in ("python", "python3")  # also .venv/bin/python


@dataclass
class Command:
    page: str
    line: int
    words: list[str]

    def __str__(self) -> str:
        return f"{self.page}:{self.line}: {' '.join(self.words)}"


def _commands(page: Path) -> list[Command]:
    text = page.read_text()
    found = []
    for block in SHELL_BLOCK.finditer(text):
        first_line = text[: block.start(1)].count("\n") + 1
        body = re.sub(r"\\\n", " ", block.group(1))  # continuation lines
        for offset, line in enumerate(body.splitlines()):
            words = shlex.split(line, comments=True)
            command: list[str] = []
            for word in [*words, "&&"]:
                if word in ("&&", ";", "||", "|"):
                    if command:
                        found.append(Command(str(page.relative_to(REPO)), first_line + offset, command))
                    command = []
                else:
                    command.append(word)
    return found


ALL = [c for page in PAGES for c in _commands(page)]


def _without_env(words: list[str]) -> list[str]:
    """The command after leading `NAME=value` environment assignments."""
    i = 0
    while i < len(words) and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[i]):
        i += 1
    return words[i:]


def _distil_command(words: list[str]) -> tuple[str, list[str]] | None:
    """(config name, arguments) of a distil command: `distil-X ...`, `python -m distil.X ...`, `make demo`."""
    words = _without_env(words)
    if words and words[0].startswith("distil-") and words[0][7:] in CONFIGS:
        return CONFIGS[words[0][7:]], words[1:]
    if len(words) >= 3 and _is_python(words[0]) and words[1] == "-m":
        module = words[2].removeprefix("distil.")
        if words[2].startswith("distil.") and module in CONFIGS.values():
            return module, words[3:]
    if words[:2] == ["make", "demo"]:
        args = [w.removeprefix("ARGS=") for w in words[2:] if w.startswith("ARGS=")]
        return "pipeline", [a for arg in args for a in shlex.split(arg)]
    return None


def _overrides(args: list[str]) -> list[str]:
    """Hydra overrides of a command line: flags dropped, `--config-dir` kept as a search path, sweeps at their
    first value (each job of a multirun composes like this one)."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        if arg in ("-m", "--multirun", "--resolve"):
            i += 1
        elif arg == "--cfg":
            i += 2
        elif arg in ("--config-dir", "-cd"):
            out.append(f"hydra.searchpath=[file://{Path(args[i + 1]).expanduser()}]")
            i += 2
        else:
            out.append(arg)
            i += 1
    parsed = OverridesParser.create().parse_overrides(out)
    return [
        f"{o.get_key_element()}={next(o.sweep_string_iterator())}" if o.is_sweep_override() else o.input_line
        for o in parsed
    ]


def test_the_docs_have_commands():
    distil_commands = [c for c in ALL if _distil_command(c.words)]
    assert len(distil_commands) > 40, [str(c) for c in ALL]  # the extraction itself works
    assert any(c.page == "README.md" for c in distil_commands)


@pytest.mark.parametrize("command", ALL, ids=str)
def test_every_documented_command_composes(command, tmp_path, monkeypatch):
    monkeypatch.setenv("DISTIL_HOME", str(tmp_path))
    found = _distil_command(command.words)
    words = _without_env(command.words)
    if found is None:
        if words[0] == "make":
            targets = re.findall(r"^([a-z-]+):", (REPO / "Makefile").read_text(), re.M)
            assert words[1] in targets, f"{command}: no make target {words[1]!r}"
        elif _is_python(words[0]) and words[1:2] == ["-m"]:
            assert words[2] in ("distil.collect", "pytest"), f"{command}: not a distil command"
        elif _is_python(words[0]) and words[1].endswith(".py"):
            assert (REPO / words[1]).is_file(), f"{command}: no script {words[1]}"
        else:
            assert words[0] in OTHER_TOOLS, f"{command}: not a command the docs test knows"
        return
    config_name, args = found
    overrides = _overrides(args)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)  # launchers too
        with open_dict(cfg):
            del cfg["hydra"]  # the job's own config, as `--cfg job --resolve` prints it
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        if config_name == "pipeline":  # every stage composes as the pipeline composes it
            from distil.pipeline import dry_run_plan

            dry_run_plan(cfg, tmp_path / "run")
        if config_name == "train":
            from distil.training.sizing import estimate_training

            estimate_training(cfg)


LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_point_inside_the_repository(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path = (page.parent / target).resolve()
        if not path.exists() or REPO not in path.parents:
            broken.append(target)
    assert not broken, f"{page.relative_to(REPO)}: {broken}"
