"""``crashlm fetch``: download the embedded models and benchmark data into the cache."""

from __future__ import annotations

from crashlm.cli import app
from crashlm.cli._common import console
from crashlm.core import assets


@app.command()
def fetch() -> None:
    """Download the embedded model and benchmark data into the cache (once)."""
    for name, path in assets.fetch_all().items():
        console.print(f"{name}: {path}")
