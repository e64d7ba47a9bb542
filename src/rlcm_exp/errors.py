"""One error type for bad user input: the entry points print its message as one paragraph, no traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

CONFIG_ERROR_EXIT_CODE = 2  # as argparse: the command line or the config is wrong


class ConfigError(ValueError):
    """Bad configuration or input. The message names the key or file and what would be valid."""


def find_config_error(err: BaseException | None) -> ConfigError | None:
    """The ConfigError behind an exception, if any (Hydra's instantiate wraps what builders raise)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, ConfigError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def exit_on_config_error(fn: Callable[[], T]) -> T:
    """Run `fn`; a ConfigError anywhere in the chain becomes one line on stderr and exit code 2,
    any other exception propagates with its traceback (a bug, not bad input)."""
    try:
        return fn()
    except Exception as err:
        config_error = find_config_error(err)
        if config_error is None:
            raise
        print(f"error: {config_error}", file=sys.stderr)
        sys.exit(CONFIG_ERROR_EXIT_CODE)


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (the previous one is untouched) or does not fit this model."""


class RunStopped(RuntimeError):
    """A run stopped for a reason its message states (diverged, a reward that hung): the entry point
    prints the message as one line and exits 1, no traceback."""
