"""The ``crashlm`` command line: parse, call the library, print.

Each command group lives in its own module and registers itself on :data:`app`. User errors
(:class:`~crashlm.core.errors.CrashlmError`) become one line on stderr with exit code 2 (usage) or
1 (run failure); ``--debug`` keeps the traceback.
"""

from __future__ import annotations

import errno
import importlib
import os
import sys

import typer

from crashlm.cli._common import console, err_console, state
from crashlm.core.errors import CrashlmError
from crashlm.core.reproducibility import make_deterministic
from crashlm.core.settings import SettingError

app = typer.Typer(
    name="crashlm",
    help="Offsite-tuning with CRaSh emulators: layer analysis, emulators, training, plug-in, evaluation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    deterministic: bool = typer.Option(
        False, "--deterministic", help="Deterministic GPU kernels only (slower; see docs/determinism.md). Default: off."
    ),
) -> None:
    state.debug = debug
    if deterministic:
        make_deterministic()


_COMMAND_MODULES = (
    "fetch", "models", "tasks", "similarity", "cluster", "emulator", "fidelity", "train", "distill", "plugin", "eval",
    "offsite",
    "lens", "divergence", "landscape", "report",
)


def _register() -> None:
    # Imported for their side effect of adding commands to ``app``.
    for name in _COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}")


_register()


def _fail(message: str, code: int) -> None:
    err_console.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; success returns normally, a failure exits with 2 (usage) or 1 (run failure)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        # Not standalone: click's own usage errors come here too, and become one line like ours.
        code = app(args=argv, prog_name="crashlm", standalone_mode=False)
    except CrashlmError as exc:
        if state.debug:
            raise
        _fail(exc.for_flag() if isinstance(exc, SettingError) else str(exc), exc.exit_code)
    except typer.TyperException as exc:  # typer's (vendored) click errors: bad options, values, commands
        if type(exc).__name__ == "NoArgsIsHelpError":
            sys.exit(exc.exit_code)  # the help is already printed
        ctx = getattr(exc, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        _fail(exc.format_message() + hint, exc.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        err_console.print("interrupted", markup=False)
        sys.exit(130)
    except OSError as exc:
        # A full disk or quota can strike any write (caches included): a run failure, not a bug.
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or state.debug:
            raise
        _fail(f"{exc.strerror or 'no space left on device'}{f': {exc.filename}' if exc.filename else ''}", 1)
    if code == 130:  # typer turns Ctrl-C into exit code 130
        err_console.print("interrupted", markup=False)
    if isinstance(code, int) and code != 0:
        sys.exit(code)


__all__ = ["app", "main", "console"]
