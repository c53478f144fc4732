"""``crashlm plugin``: the model owner plugs a returned adapter into the full model."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from crashlm.cli import app
from crashlm.cli._common import DTYPES, console, parse_dtype
from crashlm.core.assets import DEFAULT_MODEL
from crashlm.core.io import check_output_dir, read_json
from crashlm.emulators.plugin import PLUGIN_META, plug_in


@app.command()
def plugin(
    adapter: Path = typer.Option(..., "--adapter", help="Adapter directory returned by the data owner."),
    out: Path = typer.Option(..., "--out", help="Directory for the full model with the adapter plugged in (HF format)."),
    model: Optional[str] = typer.Option(
        None, "--model", help=f"Full model. Default: the model named in the adapter's plan, else {DEFAULT_MODEL}."
    ),
    dtype: str = typer.Option("float32", "--dtype", help=f"Weights dtype: {', '.join(DTYPES)}."),
) -> None:
    """Plug a trained adapter into the full model at its original layers and save the model."""
    check_output_dir(out)
    plug_in(model, adapter, out, dtype=parse_dtype(dtype))
    record = read_json(out / PLUGIN_META, "plug-in record")
    console.print(f"plugged adapter layers {record['sources']} into {record['base_model']}; wrote {out}")
