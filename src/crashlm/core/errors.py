"""Errors a user can cause, versus failures at run time.

The CLI turns a :class:`UsageError` into one line on stderr and exit code 2, and a
:class:`RunFailure` into one line and exit code 1; anything else is a bug and keeps its
traceback. Library code raises these instead of printing, so it stays usable from Python.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator


class CrashlmError(Exception):
    """Base class of every error crashlm raises on purpose."""

    exit_code = 1


class UsageError(CrashlmError):
    """Bad input: unknown model/task, invalid plan, out-of-range numbers, unreadable files."""

    exit_code = 2


class RunFailure(CrashlmError):
    """The input was valid but the work failed (NaN loss, disk full, integrity mismatch)."""

    exit_code = 1


@contextmanager
def usage_errors_exit() -> Iterator[None]:
    """For scripts outside the CLI (the benchmarks): a :class:`UsageError` becomes one line on
    stderr and exit code 2, as the CLI does."""
    try:
        yield
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(exc.exit_code) from None
