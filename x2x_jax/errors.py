"""The few exception types the project raises on bad input.

Every message names the file / key / value at fault. CLIs turn any `X2XError` into one line on stderr and a
non-zero exit (see `cli_main`).
"""

from __future__ import annotations

import functools
import sys


class X2XError(Exception):
    """Base class: a problem with what the user gave us (never a bug of ours)."""


class ConfigError(X2XError):
    """A config key or command-line value is missing, unknown or out of range."""


class WeightsError(X2XError):
    """A weights directory / checkpoint is missing, incomplete, mis-shaped or non-finite."""


class DataError(X2XError):
    """An image, dataset file or CSV row is missing, corrupt or unsupported."""


class InstructionError(X2XError):
    """An instruction is empty or cannot be used."""


def error_line(e: BaseException) -> str:
    """The one line a CLI prints for an error: `error: <message>` with its whitespace runs collapsed."""
    return "error: " + " ".join(str(e).split())


def cli_main(fn):
    """Decorator for a CLI entry point: X2XError -> `error: <message>` on stderr, exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except X2XError as e:
            print(error_line(e), file=sys.stderr)
            sys.exit(2)

    return wrapper
