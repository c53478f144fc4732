"""``crashlm models``: model aliases, what is cached, supported architectures."""

from __future__ import annotations

from rich.table import Table

from crashlm.cli import app
from crashlm.cli._common import console
from crashlm.core import assets
from crashlm.core.models import supported_architectures


@app.command()
def models() -> None:
    """List model aliases, what is cached, and the supported architectures."""
    cached = set(assets.cached_models())
    table = Table("alias", "cached", "licence", "description")
    for alias, asset in assets.MODEL_ASSETS.items():
        table.add_row(alias, "yes" if alias in cached else "no", asset.licence, asset.description)
    console.print(table)
    for asset in assets.MODEL_ASSETS.values():
        if asset.terms:
            console.print(f"{asset.alias}: using it means accepting its terms. {asset.terms}.", markup=False, highlight=False)
    console.print(f"cache: {assets.cache_dir()}")
    console.print("supported architectures: " + ", ".join(supported_architectures()))
    console.print("--model also accepts a local Hugging Face directory, a .gguf file, or a hub id.")
