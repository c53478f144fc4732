"""``crashlm landscape 1d|2d``: validation loss between models, along a line or on a plane."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch
import typer

from crashlm.analysis.landscape import (
    DIRECTIONS,
    Landscape1D,
    Landscape1DConfig,
    Landscape2D,
    Landscape2DConfig,
    check_run,
    landscape_1d,
    landscape_2d,
)
from crashlm.cli import app
from crashlm.cli._common import console
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

MODEL_HELP = "a model spec, an emulator bundle, or SPEC+ADAPTER_DIR"
LIMIT_HELP = "The first N validation examples give the loss (mean answer-token cross-entropy)."
OUT_HELP = "Output directory: landscape.csv/.json and PNGs. Re-run with the same arguments to resume."


def _parse_range(value: str) -> list[float]:
    try:
        lo, hi = (float(v) for v in value.split(","))
    except ValueError as exc:
        raise UsageError(f"--range must be LO,HI (two numbers, e.g. --range=-1,2), got {value!r}") from exc
    return [lo, hi]


def _print(text: str) -> None:
    console.print(text, markup=False, highlight=False, soft_wrap=True)


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
def one_d(
    a: str = typer.Option(..., "--a", help=f"Model at alpha 0 (e.g. full fine-tuning): {MODEL_HELP}."),
    b: str = typer.Option(..., "--b", help=f"Model at alpha 1 (e.g. base+plug-in adapter): {MODEL_HELP}."),
    task: str = typer.Option(..., "--task", help="Task whose validation examples give the loss (see crashlm tasks)."),
    points: int = typer.Option(25, "--points", help="Points in linspace(0, 1), both end points included (>= 2)."),
    limit: int = typer.Option(256, "--limit", help=LIMIT_HELP),
    batch_size: int = typer.Option(8, "--batch-size", help="Examples per forward pass."),
    max_length: int = typer.Option(512, "--max-length", help="Truncate examples to this many tokens (from the left)."),
    device: Optional[str] = typer.Option(None, "--device", help="Torch device (default: cuda if available, else cpu)."),
    out: Path = typer.Option(..., "--out", help=OUT_HELP),
) -> None:
    """theta(alpha) = theta_a + alpha (theta_b - theta_a): landscape.csv/.json, landscape_1d.png."""
    config = Landscape1DConfig(a=a, b=b, task=task, points=points, limit=limit, max_length=max_length)
    result = _sweep(landscape_1d, config, out, batch_size, device)
    figure = plot_landscape_1d(result, out / "landscape_1d.png")
    _print(_summary_1d(result))
    _print(f"wrote {out / 'landscape.json'}, {out / 'landscape.csv'}, {figure}")


@landscape_app.command("2d")
def two_d(
    origin: str = typer.Option(..., "--origin", help=f"Model at (0, 0) (e.g. the pretrained model): {MODEL_HELP}."),
    x: Optional[str] = typer.Option(None, "--x", help=f"Model at (1, 0), for --directions models: {MODEL_HELP}."),
    y: Optional[str] = typer.Option(None, "--y", help=f"Model at (0, 1), for --directions models: {MODEL_HELP}."),
    task: str = typer.Option(..., "--task", help="Task whose validation examples give the loss (see crashlm tasks)."),
    grid: int = typer.Option(25, "--grid", help="Grid points per axis (>= 2), both ends included."),
    axis_range: str = typer.Option("-1,2", "--range", help="LO,HI of both axes; write --range=-1,2 for negatives."),
    directions: str = typer.Option(
        "models", "--directions",
        help=f"{' or '.join(DIRECTIONS)}: towards --x and --y, or two seeded filter-normalised random directions.",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the random directions."),
    limit: int = typer.Option(256, "--limit", help=LIMIT_HELP),
    batch_size: int = typer.Option(8, "--batch-size", help="Examples per forward pass."),
    max_length: int = typer.Option(512, "--max-length", help="Truncate examples to this many tokens (from the left)."),
    device: Optional[str] = typer.Option(None, "--device", help="Torch device (default: cuda if available, else cpu)."),
    out: Path = typer.Option(..., "--out", help=OUT_HELP),
) -> None:
    """theta(a, b) = theta_origin + a d_x + b d_y: landscape.csv/.json, contour and surface PNGs."""
    config = Landscape2DConfig(
        origin=origin, x=x, y=y, task=task, grid=grid, axis_range=_parse_range(axis_range),
        directions=directions, seed=seed, limit=limit, max_length=max_length,
    )
    result = _sweep(landscape_2d, config, out, batch_size, device)
    figures = [
        plot_landscape_2d_contour(result, out / "landscape_2d_contour.png"),
        plot_landscape_2d_surface(result, out / "landscape_2d_surface.png"),
    ]
    _print(_summary_2d(result))
    _print(f"wrote {out / 'landscape.json'}, {out / 'landscape.csv'}, " + ", ".join(map(str, figures)))
