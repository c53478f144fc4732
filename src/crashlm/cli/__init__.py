"""The ``crashlm`` command line: parse, call the library, print.

Each command group lives in its own module and registers itself on :data:`app`. User errors
(:class:`~crashlm.errors.CrashlmError`) become one line on stderr with exit code 2 (usage) or
1 (run failure); ``--debug`` keeps the traceback.
"""

from __future__ import annotations

import os
import sys

import typer

from ..errors import CrashlmError
from ._common import console, err_console, state

app = typer.Typer(
    name="crashlm",
    help="Offsite-tuning with CRaSh emulators: layer analysis, emulators, training, plug-in, evaluation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    state.debug = debug


def _register() -> None:
    # Imported for their side effect of adding commands to ``app``.
    import importlib

    for name in ("setup", "tasks", "similarity", "cluster", "table", "offsite", "lens", "landscape", "report"):
        try:
            importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise


_register()


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        # Standalone mode: typer/click report their own usage errors (exit 2) and exit codes.
        app(args=argv, prog_name="crashlm")
    except CrashlmError as exc:
        if state.debug:
            raise
        err_console.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted", markup=False)
        sys.exit(130)
    except SystemExit as exc:
        if exc.code not in (0, None):  # success returns normally, so tests can call main()
            raise


__all__ = ["app", "main", "console"]
