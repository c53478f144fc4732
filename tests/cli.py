"""Calling the ``crashlm`` command line in-process, as a user would from a shell."""

from __future__ import annotations

from crashlm.cli import main


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """``(exit code, stdout, stderr)`` of ``crashlm ARGS``: success returns, failure raises SystemExit."""
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err
