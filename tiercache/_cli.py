"""Command-line plumbing shared by ``python -m tiercache`` and ``python -m tiercache_llm``.

Conventions (those of argparse and the shell): a usage error prints one line
``<prog>: error: <message>`` to stderr and exits 2; a failure while running prints one such line and
exits 1; Ctrl-C prints ``<prog>: interrupted`` and exits 130.  ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

from .sizes import parse_size

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    """A command-line argument is wrong (exit code 2).  The message names the argument."""


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (no usage dump) pointing at ``--help``."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def size_arg(allow_zero: bool = True) -> Callable[[str], int]:
    """An argparse ``type`` turning ``"512MiB"``/``"0"`` into bytes with a one-line error."""

    def parse(text: str) -> int:
        if text.strip().startswith("-"):
            raise argparse.ArgumentTypeError(f"a size must not be negative, got {text!r}")
        try:
            value = parse_size(text, "size")
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"cannot parse size {text!r}; use bytes or a number with a unit like 512MiB or 4GiB"
            ) from None
        if not allow_zero and value == 0:
            raise argparse.ArgumentTypeError("must be larger than 0")
        return value

    parse.__name__ = "size"
    return parse


def int_arg(minimum: int) -> Callable[[str], int]:
    """An argparse ``type`` for an integer of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = "int"
    return parse


def describe(exc: BaseException) -> str:
    """One line describing ``exc`` for a person (no traceback)."""
    if isinstance(exc, KeyError) and exc.args:
        text = f"missing key {exc.args[0]!r}"
    elif isinstance(exc, OSError) and exc.strerror and exc.filename:
        text = f"{exc.strerror}: {exc.filename}"
    else:
        text = str(exc)
    text = " ".join(text.split())
    known = (UsageError, ValueError, TypeError, OSError, RuntimeError, KeyError, MemoryError)
    if not text or not isinstance(exc, known):
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text


def run_guarded(prog: str, debug: bool, func: Callable[[], int], *, on_interrupt: Callable[[], Any] | None = None) -> int:
    """Run ``func`` and turn its exceptions into the exit codes above (re-raise them when ``debug``)."""
    try:
        return func()
    except KeyboardInterrupt:
        if on_interrupt is not None:
            on_interrupt()
        if debug:
            raise
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except UsageError as exc:
        if debug:
            raise
        print(f"{prog}: error: {describe(exc)} (see {prog} --help)", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # noqa: BLE001 - the whole point: one line instead of a traceback
        if debug:
            raise
        print(f"{prog}: error: {describe(exc)} (run with --debug for the traceback)", file=sys.stderr)
        return EXIT_FAILURE

