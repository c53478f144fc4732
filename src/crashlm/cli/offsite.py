"""``crashlm offsite``: the paper's comparison table from one command."""

from __future__ import annotations

from pathlib import Path

import typer

from crashlm.cli import app
from crashlm.cli._common import console
from crashlm.cli._settings import with_settings
from crashlm.experiments.offsite import OffsiteConfig, run_offsite
from crashlm.outputs.tables import table_markdown


@app.command()
@with_settings(OffsiteConfig, exclude=("task", "seed", "data_source"))
def offsite(
    out: Path = typer.Option(..., "--out", help="Run directory; re-running with the same settings continues where it stopped."),
    *,
    config: OffsiteConfig,
) -> None:
    """Plans, emulators (+ KD with --distill), training, plug-in and evaluation -> RUN_DIR/table.*, report.html."""
    table = run_offsite(config, out, console)
    console.print(table_markdown(table))
    console.print(f"wrote {out / 'table.json'}, {out / 'table.md'}, {out / 'table.png'}, {out / 'report.html'}")
