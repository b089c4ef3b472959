"""An option of a config group that does not exist (`logger=nope`, `teacher=tiny`) as one line naming the group,
the option and those there are, instead of Hydra's multi-line composition error.

Hydra composes the config (and reports a missing option itself) before a command's body runs, so the command
line is checked first (`known_choices`); `distil-pipeline` composes its stages itself (`choice_error`).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from distil.utils.errors import ConfigError, one_line_errors
from distil.utils.paths import CONF_DIR

# Flags that add config directories: an option may then live outside conf/, so it is left to Hydra.
SEARCH_PATH_FLAGS = ("--config-dir", "-cd", "--config-path", "-cp", "hydra.searchpath")


def options(group: str, conf_dir: str | Path = CONF_DIR) -> list[str]:
    """The options of a config group: conf/<group>/*.yaml."""
    return sorted(p.stem for p in (Path(conf_dir) / group).glob("*.yaml"))


def choice_error(group: str, value: str, choices: Sequence[str]) -> str:
    return f"{group}={value}: there is no such {group} (conf/{group}/{value}.yaml); choose from {', '.join(choices)}"


def unknown_choice(args: Sequence[str], conf_dir: str | Path = CONF_DIR) -> str | None:
    """The error for the first command-line override that selects a missing option of one of conf/'s top-level
    groups (a list selection, `logger=[tensorboard,mlflow]`, and each value of a sweep checked), else None."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ValueType

    if any(arg.startswith(SEARCH_PATH_FLAGS) for arg in args):
        return None
    parser = OverridesParser.create()
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue  # a flag (-m, --cfg job) or its value
        try:
            (override,) = parser.parse_overrides([arg])
        except Exception:  # a malformed override: Hydra's own error names it
            continue
        group = override.key_or_group
        if override.is_delete() or "/" in group or "." in group or group == "hydra":
            continue
        if not (Path(conf_dir) / group).is_dir():
            continue  # a key, not a group
        if override.value_type == ValueType.SIMPLE_CHOICE_SWEEP:  # -m logger=tensorboard,mlflow
            values = list(override.sweep_string_iterator())
        elif override.is_sweep_override():
            continue  # ranges, globs, sweeps of lists: left to Hydra
        else:
            value = override.value()
            values = value if isinstance(value, list) else [value]  # logger=[tensorboard,mlflow]
        for value in values:
            if isinstance(value, str) and not (Path(conf_dir) / group / f"{value}.yaml").is_file():
                return choice_error(group, value, options(group, conf_dir))
    return None


def known_choices(command: Callable[..., Any]) -> Callable[..., Any]:
    """Outside a command's `hydra.main`: an unknown group option on the command line is one line, exit status 1."""

    def check() -> None:
        problem = unknown_choice(sys.argv[1:])
        if problem:
            raise ConfigError(problem)

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        one_line_errors(check)()
        return command(*args, **kwargs)

    return wrapper
