"""``crashlm landscape 1d|2d``: validation loss between models, along a line or on a plane."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch
import typer

from crashlm.analysis.landscape import (
    Landscape1D,
    Landscape1DConfig,
    Landscape2D,
    Landscape2DConfig,
    check_run,
    landscape_1d,
    landscape_2d,
)
from crashlm.cli import app
from crashlm.cli._common import print_text
from crashlm.cli._settings import with_settings
from crashlm.core.errors import UsageError
from crashlm.core.models import default_device
from crashlm.emulators.targets import resolve_target
from crashlm.outputs.plotting import (
    plot_landscape_1d,
    plot_landscape_2d_contour,
    plot_landscape_2d_surface,
)

landscape_app = typer.Typer(
    help="Loss landscapes in fp32: 1D between two models, 2D around an origin. Re-run the same command to resume.",
    no_args_is_help=True,
)
app.add_typer(landscape_app, name="landscape")

OUT_HELP = "Output directory: landscape.csv/.json and PNGs. Re-run with the same arguments to resume."


def _parse_range(value: str) -> list[float]:
    try:
        lo, hi = (float(v) for v in value.split(","))
    except ValueError as exc:
        raise UsageError(f"--range must be LO,HI (two numbers, e.g. --range=-1,2), got {value!r}") from exc
    return [lo, hi]


def _sweep(run, config: Landscape1DConfig | Landscape2DConfig, out: Path, batch_size: int, device: Optional[str]):
    """Check the run, then resolve its models in fp32 (the other anchors one at a time) and sweep."""
    check_run(config, out)  # before any model loads
    device = torch.device(device) if device is not None else default_device()
    (_, origin), *others = config.models.items()
    first = resolve_target(model=origin, dtype=torch.float32, device=device)
    ends = (resolve_target(model=spec, dtype=torch.float32, device=device).model for _, spec in others)
    return run(config, first.model, first.tokenizer, ends, out, batch_size=batch_size)


def _summary_1d(result: Landscape1D) -> str:
    a, b = result.anchor("a"), result.anchor("b")
    return (f"{a.label} -> {b.label} on {result.config.task} ({result.examples} examples): "
            f"loss {a.loss:.4f} -> {b.loss:.4f}, max {max(result.losses):.4f}, barrier {result.barrier:.4f}")


def _summary_2d(result: Landscape2D) -> str:
    anchors = ", ".join(f"{a.role} {a.label} {a.loss:.4f}" for a in result.anchors)
    finite = [(loss, x, y) for row, y in zip(result.losses, result.ys) for loss, x in zip(row, result.xs) if math.isfinite(loss)]
    best, x, y = min(finite, default=(math.nan, math.nan, math.nan))
    return f"{result.config.task} ({result.examples} examples): {anchors}; grid minimum {best:.4f} at ({x:.3g}, {y:.3g})"


@landscape_app.command("1d")
@with_settings(Landscape1DConfig, defaults={"task": ...})
def one_d(
    batch_size: int = typer.Option(8, "--batch-size", help="Examples per forward pass."),
    device: Optional[str] = typer.Option(None, "--device", help="Torch device (default: cuda if available, else cpu)."),
    out: Path = typer.Option(..., "--out", help=OUT_HELP),
    *,
    config: Landscape1DConfig,
) -> None:
    """theta(alpha) = theta_a + alpha (theta_b - theta_a): landscape.csv/.json, landscape_1d.png."""
    result = _sweep(landscape_1d, config, out, batch_size, device)
    figure = plot_landscape_1d(result, out / "landscape_1d.png")
    print_text(_summary_1d(result))
    print_text(f"wrote {out / 'landscape.json'}, {out / 'landscape.csv'}, {figure}")


@landscape_app.command("2d")
@with_settings(Landscape2DConfig, defaults={"task": ...})
def two_d(
    axis_range: str = typer.Option("-1,2", "--range", help="LO,HI of both axes; write --range=-1,2 for negatives."),
    batch_size: int = typer.Option(8, "--batch-size", help="Examples per forward pass."),
    device: Optional[str] = typer.Option(None, "--device", help="Torch device (default: cuda if available, else cpu)."),
    out: Path = typer.Option(..., "--out", help=OUT_HELP),
    *,
    config: Landscape2DConfig,
) -> None:
    """theta(a, b) = theta_origin + a d_x + b d_y: landscape.csv/.json, contour and surface PNGs."""
    config = replace(config, axis_range=_parse_range(axis_range))
    result = _sweep(landscape_2d, config, out, batch_size, device)
    figures = [
        plot_landscape_2d_contour(result, out / "landscape_2d_contour.png"),
        plot_landscape_2d_surface(result, out / "landscape_2d_surface.png"),
    ]
    print_text(_summary_2d(result))
    print_text(f"wrote {out / 'landscape.json'}, {out / 'landscape.csv'}, " + ", ".join(map(str, figures)))
