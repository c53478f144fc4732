"""Shared CLI helpers: consoles, global flags, option parsing helpers."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate import PartialState
from rich.console import Console

from crashlm.core.errors import UsageError
from crashlm.core.settings import check_choice, check_int

console = Console()
err_console = Console(stderr=True)


@dataclass
class _State:
    debug: bool = False


state = _State()

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    check_choice(name, DTYPES, "dtype")
    return DTYPES[name]


def parse_list(value: str | None, what: str) -> list[str]:
    """Split a comma-separated option into a non-empty list of stripped items."""
    items = [v.strip() for v in (value or "").split(",") if v.strip()]
    if not items:
        raise UsageError(f"{what} needs at least one value")
    return items


def positive(value: int | None, flag: str, allow_none: bool = True) -> int | None:
    """``value`` of ``flag`` when it is a positive integer (or None, when allowed)."""
    check_int(value, flag, optional=allow_none)
    return value


def parse_k(value: str | None, flag: str = "--k") -> int | str | None:
    """An emulator size option: a positive integer, ``auto`` (by calibration loss) or None."""
    if value is None or value == "auto":
        return value
    try:
        k = int(value)
    except ValueError:
        raise UsageError(f"{flag} must be a positive integer or 'auto', got {value!r}") from None
    return positive(k, flag)


def print_text(text: str) -> None:
    """Print plain text: no rich markup or highlighting, long lines kept whole."""
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def print_main(text: str) -> None:
    """:func:`print_text` on the main process only (commands that also run under ``accelerate launch``)."""
    # The same cpu flag as the training's Accelerator: the first PartialState fixes the backend.
    if PartialState(cpu=not torch.cuda.is_available()).is_main_process:
        print_text(text)
