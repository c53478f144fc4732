"""``crashlm fidelity``: the strategy x K table of untrained emulators' distance to the full model."""

from __future__ import annotations

from pathlib import Path

import typer

from crashlm.cli import app
from crashlm.cli._common import print_text
from crashlm.cli._settings import with_settings
from crashlm.core.io import check_output_dir
from crashlm.experiments.fidelity import FidelityConfig, run_fidelity
from crashlm.outputs.fidelity import fidelity_markdown


@app.command()
@with_settings(FidelityConfig)
def fidelity(
    out: Path = typer.Option(..., "--out", help="Directory for fidelity.json, fidelity.md and fidelity.png."),
    *,
    config: FidelityConfig,
) -> None:
    """Loss, KL and top-1 agreement with the full model of every strategy's emulator at every K."""
    check_output_dir(out)
    table = run_fidelity(config, out)
    print_text(fidelity_markdown(table))
    print_text(f"{table['seconds']:.0f} s; wrote {out / 'fidelity.json'}, {out / 'fidelity.md'}, {out / 'fidelity.png'}")
