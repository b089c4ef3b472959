"""The one base class of distil's input errors.

Every error about what a user gave (a config key, a file, a column, a model directory) subclasses `InputError`
and says in its message what is wrong and how to fix it. Each command prints such an error as one line
(`error: ...`) and exits non-zero, instead of a traceback.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


class InputError(ValueError):
    """Bad input: the message names the file, column or key and what to do."""


class ConfigError(InputError):
    """A configuration value of the wrong kind or out of range (the message names the key and what it takes)."""


def one_line_errors(main: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a command's body: an `InputError` becomes `error: <message>` on stderr and exit status 1.

    The traceback still goes to the log (the run directory's log file under Hydra)."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except InputError as err:
            log.debug("input error", exc_info=True)
            raise SystemExit(f"error: {err}") from err

    return wrapper


def instantiate(config: Any, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate`, but an `InputError` of the target reaches the caller as itself.

    Hydra wraps whatever a `_target_` raises in an InstantiationException; distil's own input errors already
    name the key and the fix, so they are re-raised unwrapped (and printed as one line by the command)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as hydra_instantiate

    try:
        return hydra_instantiate(config, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, InputError):
            raise err.__cause__ from None
        raise
