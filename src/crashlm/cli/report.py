"""``crashlm report``: one self-contained HTML page for a run directory."""

from __future__ import annotations

from pathlib import Path

import typer

from crashlm.cli import app
from crashlm.cli._common import console
from crashlm.outputs.report import write_report


@app.command()
def report(run_dir: Path = typer.Argument(..., help="A run directory (e.g. from `crashlm offsite`).")) -> None:
    """Write RUN_DIR/report.html with every figure embedded, and the configuration behind each."""
    console.print(f"wrote {write_report(run_dir)}")
