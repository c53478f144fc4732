"""Loss landscapes between models: 1D interpolation and 2D surfaces around an origin.

CRaSh argues that the plugged-in adapter and full fine-tuning land in one basin: the validation
loss along the straight line between the two has no barrier (1D), and a plane through the
pretrained model, the fine-tuned one and the plugged-in one shows both optima in one valley (2D).

    1D:  theta(a)    = theta_A + a (theta_B - theta_A),   a in linspace(0, 1, n)
    2D:  theta(a, b) = theta_O + a d_x + b d_y,  d = theta_X - theta_O, or filter-normalised noise

Parameters are matched by name, so any loaded models of one architecture and shape compare
(the command line resolves model, emulator and ``SPEC+ADAPTER`` arguments). Only parameters
that differ move (:mod:`crashlm.analysis.subspace`): one working model is swept in place.
Everything runs in fp32 with both end points included; the original code interpolated in fp16
and used unnormalised directions.

A sweep is resumable: each evaluated point is appended to ``landscape.csv`` and flushed, and the
run's configuration and model fingerprints are recorded in ``landscape_config.json``; re-running
with the same configuration evaluates only the points missing from the CSV. ``landscape.json``
is written (atomically) once every point is in.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterable, Sequence

from torch import nn

from crashlm.analysis.subspace import (
    Coords,
    PointCallback,
    PointLog,
    Subspace,
    grid_axis,
    sweep,
)
from crashlm.core.errors import UsageError
from crashlm.core.io import read_json, write_json
from crashlm.core.models import fingerprint
from crashlm.core.scoring import mean_answer_loss
from crashlm.core.settings import Settings, check_int, setting
from crashlm.core.tasks import load_examples

DIRECTIONS = ("models", "random-filter-norm")
CONFIG_FILE = "landscape_config.json"
POINTS_FILE = "landscape.csv"
RESULT_FILE = "landscape.json"


# ---------------------------------------------------------------------------------------------
# Configurations and results


MODEL_HELP = "a model spec, an emulator bundle, or SPEC+ADAPTER_DIR"
TASK_HELP = "Task whose validation examples give the loss (see crashlm tasks)."
LIMIT_HELP = "The first N validation examples give the loss (mean answer-token cross-entropy)."
MAX_LENGTH_HELP = "Truncate examples to this many tokens (from the left)."


class _Config(Settings):
    """The file form (with its ``kind``) and the checks shared by both configurations."""

    kind: ClassVar[str]
    what: ClassVar[str] = "landscape"

    def _validate_common(self) -> None:
        self.check_positive("limit", "max_length")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **super().to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        if not isinstance(data, dict) or data.get("kind", cls.kind) != cls.kind:
            raise UsageError(f"not a {cls.kind} landscape configuration")
        return super().from_dict({key: value for key, value in data.items() if key != "kind"})


@dataclass
class Landscape1DConfig(_Config):
    """A 1D interpolation from model ``a`` (alpha 0) to model ``b`` (alpha 1)."""

    kind: ClassVar[str] = "1d"

    a: str = setting(help=f"Model at alpha 0 (e.g. full fine-tuning): {MODEL_HELP}.")
    b: str = setting(help=f"Model at alpha 1 (e.g. base+plug-in adapter): {MODEL_HELP}.")
    task: str = setting("piqa", TASK_HELP)
    points: int = setting(25, "Points in linspace(0, 1), both end points included (>= 2).")
    limit: int = setting(256, LIMIT_HELP)
    max_length: int = setting(512, MAX_LENGTH_HELP)

    def validate(self) -> None:
        self.check_positive("points", minimum=2)
        self._validate_common()

    @property
    def alphas(self) -> list[float]:
        return grid_axis(0.0, 1.0, self.points)

    @property
    def models(self) -> dict[str, str]:
        return {"a": self.a, "b": self.b}

    @property
    def anchor_coords(self) -> dict[str, Coords]:
        return {"a": (0.0,), "b": (1.0,)}


@dataclass
class Landscape2DConfig(_Config):
    """A 2D surface around ``origin``, towards models ``x`` and ``y`` or along random directions."""

    kind: ClassVar[str] = "2d"

    origin: str = setting(help=f"Model at (0, 0) (e.g. the pretrained model): {MODEL_HELP}.")
    x: str | None = setting(None, f"Model at (1, 0), for --directions models: {MODEL_HELP}.")
    y: str | None = setting(None, f"Model at (0, 1), for --directions models: {MODEL_HELP}.")
    task: str = setting("piqa", TASK_HELP)
    grid: int = setting(25, "Grid points per axis (>= 2), both ends included.")
    axis_range: list[float] = setting(help="LO, HI of both axes.", factory=lambda: [-1.0, 2.0], cli=False)
    directions: str = setting("models", f"{' or '.join(DIRECTIONS)}: towards --x and --y, or two seeded "
                                        "filter-normalised random directions.")
    seed: int = setting(0, "Seed of the random directions.")
    limit: int = setting(256, LIMIT_HELP)
    max_length: int = setting(512, MAX_LENGTH_HELP)

    def __post_init__(self) -> None:
        self.axis_range = list(self.axis_range)  # a list, as JSON gives it back

    def validate(self) -> None:
        self.check_choice("directions", DIRECTIONS)
        if self.directions == "models" and (self.x is None or self.y is None):
            raise UsageError("--directions models needs both --x and --y models")
        if self.directions != "models" and (self.x is not None or self.y is not None):
            raise UsageError(f"--directions {self.directions} takes no --x/--y models")
        self.check_positive("grid", minimum=2)
        self.check_positive("seed", minimum=0)
        lo_hi = self.axis_range
        if len(lo_hi) != 2 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in lo_hi) or lo_hi[0] >= lo_hi[1]:
            raise UsageError(f"--range must be two finite numbers LO,HI with LO < HI, got {lo_hi!r}")
        self._validate_common()

    @property
    def axis(self) -> list[float]:
        return grid_axis(float(self.axis_range[0]), float(self.axis_range[1]), self.grid)

    @property
    def models(self) -> dict[str, str]:
        roles = {"origin": self.origin, "x": self.x, "y": self.y}
        return {role: spec for role, spec in roles.items() if spec is not None}

    @property
    def anchor_coords(self) -> dict[str, Coords]:
        coords = {"origin": (0.0, 0.0), "x": (1.0, 0.0), "y": (0.0, 1.0)}
        return {role: coords[role] for role in self.models}


def model_label(spec: str) -> str:
    """A short display name of a model spec: the last path component (of each side of ``SPEC+ADAPTER``)."""
    return "+".join(Path(part).name or part for part in spec.split("+"))


def _json_loss(value: float) -> float | None:
    return value if math.isfinite(value) else None  # JSON has no NaN/inf


@dataclass
class Anchor:
    """A model the landscape passes through, at ``coords``; ``on_grid`` if it is also a grid point."""

    role: str
    model: str
    coords: Coords
    loss: float
    on_grid: bool

    @property
    def label(self) -> str:
        return model_label(self.model)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "coords": list(self.coords), "loss": _json_loss(self.loss)}


@dataclass
class LandscapeResult:
    """What every landscape records besides its axes: anchors, example count, model fingerprints."""

    config: Landscape1DConfig | Landscape2DConfig
    anchors: list[Anchor]
    examples: int
    fingerprints: dict[str, str]

    def anchor(self, role: str) -> Anchor:
        return next(a for a in self.anchors if a.role == role)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.config.kind,
            "config": self.config.to_dict(),
            "examples": self.examples,
            "fingerprints": self.fingerprints,
            "anchors": [anchor.to_dict() for anchor in self.anchors],
        }


@dataclass
class Landscape1D(LandscapeResult):
    """Loss along the line from model a (alpha 0) to model b (alpha 1)."""

    alphas: list[float]
    losses: list[float]

    @property
    def barrier(self) -> float:
        """Largest excess of the path's loss over the straight line between the end losses.

        0 when the path never rises above the chord; a positive value is the height of the
        barrier between the two models (Frankle et al. 2020).
        """
        first, last = self.losses[0], self.losses[-1]
        return max(loss - ((1 - a) * first + a * last) for a, loss in zip(self.alphas, self.losses))

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "alphas": self.alphas, "losses": [_json_loss(v) for v in self.losses],
                "barrier": _json_loss(self.barrier)}


@dataclass
class Landscape2D(LandscapeResult):
    """Loss on a grid: ``losses[j][i]`` is the loss at (xs[i], ys[j]) (rows are y, as images)."""

    xs: list[float]
    ys: list[float]
    losses: list[list[float]]

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "xs": self.xs, "ys": self.ys,
                "losses": [[_json_loss(v) for v in row] for row in self.losses]}


# ---------------------------------------------------------------------------------------------
# Entry points: sweep loaded models, save


def _check_out_dir(out_dir: Path, identity: dict[str, Any]) -> None:
    """Refuse an ``out_dir`` that is not a landscape run, or one whose recorded identity differs."""
    path = out_dir / CONFIG_FILE
    if not path.is_file():
        if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
            raise UsageError(f"{out_dir} exists and is not a crashlm landscape run; choose another --out")
        return
    stored = read_json(path, "landscape configuration")
    wanted = json.loads(json.dumps(identity))
    differing = [key for key, value in wanted.items() if not isinstance(stored, dict) or stored.get(key) != value]
    if differing:
        raise UsageError(f"{out_dir} holds a landscape with another {' and '.join(differing)}; choose another --out")


def check_run(config: Landscape1DConfig | Landscape2DConfig, out_dir: str | Path) -> None:
    """Refuse a bad configuration, or an ``out_dir`` holding another run: call it before loading models."""
    config.validate()
    _check_out_dir(Path(out_dir), {"config": config.to_dict()})


def _run(
    config: Landscape1DConfig | Landscape2DConfig,
    model: nn.Module,
    tokenizer: Any,
    ends: Iterable[nn.Module],
    out_dir: str | Path,
    grid: list[Coords],
    axes: Sequence[str],
    batch_size: int,
    on_point: PointCallback | None,
) -> tuple[dict[Coords, float], dict[str, Any]]:
    """Take the directions, sweep the grid and the anchors (resuming from ``out_dir``).

    Returns the losses by point and the result's common fields (anchors, examples, fingerprints).
    """
    check_int(batch_size, "batch size")
    out_dir = Path(out_dir)
    examples = load_examples(config.task, "validation", config.limit)

    (first, origin_spec), *others = config.models.items()
    fingerprints = {first: fingerprint(model)}
    if getattr(config, "directions", "models") == "random-filter-norm":
        subspace = Subspace.random_filter_norm(model, count=2, seed=config.seed)
    else:
        subspace = Subspace(anchored=True)
        ends = iter(ends)
        for role, spec in others:  # one at a time, freed once its direction is taken
            end = next(ends, None)
            if end is None:
                raise ValueError(f"no model given for the {role} anchor ({spec})")
            fingerprints[role] = fingerprint(end)
            try:
                subspace.add_end_point(model, end)
            except UsageError as exc:
                raise UsageError(f"cannot compare {origin_spec} with {spec}: {exc}") from exc
            del end
    identity = {"config": config.to_dict(), "fingerprints": fingerprints, "examples": len(examples)}
    _check_out_dir(out_dir, identity)
    if not (out_dir / CONFIG_FILE).exists():
        write_json(out_dir / CONFIG_FILE, identity)

    def evaluate(m: nn.Module) -> float:
        return mean_answer_loss(m, tokenizer, examples, batch_size=batch_size, max_length=config.max_length)

    anchor_coords = config.anchor_coords
    losses = sweep(model, subspace, grid + list(anchor_coords.values()), evaluate,
                   PointLog(out_dir / POINTS_FILE, axes), on_point, desc=f"{config.kind} landscape")
    anchors = [Anchor(role, spec, anchor_coords[role], losses[anchor_coords[role]], anchor_coords[role] in grid)
               for role, spec in config.models.items()]
    return losses, {"anchors": anchors, "examples": len(examples), "fingerprints": fingerprints}


def landscape_1d(
    config: Landscape1DConfig,
    model: nn.Module,
    tokenizer: Any,
    ends: Iterable[nn.Module],
    out_dir: str | Path,
    batch_size: int = 8,
    on_point: PointCallback | None = None,
) -> Landscape1D:
    """Validation loss along the straight line from model a to model b; resumable in ``out_dir``.

    ``model`` is a (fp32, the working model: swept in place, restored at the end) and ``ends``
    yields b. Writes ``landscape.csv`` (as it goes), ``landscape_config.json`` and, when
    complete, ``landscape.json``. Memory: model a plus the weights that differ between a and b,
    twice, in fp32 (b itself is dropped once read, when ``ends`` is an iterator).
    """
    check_run(config, out_dir)
    points = [(alpha,) for alpha in config.alphas]
    losses, common = _run(config, model, tokenizer, ends, out_dir, points, ("alpha",), batch_size, on_point)
    result = Landscape1D(config=config, alphas=config.alphas, losses=[losses[p] for p in points], **common)
    write_json(Path(out_dir) / RESULT_FILE, result.to_dict())
    return result


def landscape_2d(
    config: Landscape2DConfig,
    model: nn.Module,
    tokenizer: Any,
    ends: Iterable[nn.Module],
    out_dir: str | Path,
    batch_size: int = 8,
    on_point: PointCallback | None = None,
) -> Landscape2D:
    """Validation loss on a grid around the origin model; resumable in ``out_dir``.

    ``model`` is the origin (fp32, swept in place, restored at the end) and ``ends`` yields
    models x and y for ``directions="models"`` (directions to their anchors at (1, 0) and
    (0, 1); pass an iterator so that each is dropped once read), nothing for seeded
    filter-normalised random directions. Anchors off the grid are evaluated too (``on_grid``
    false). Memory: the origin plus, for the moving parameters, an fp32 origin copy and one
    tensor per direction.
    """
    check_run(config, out_dir)
    axis = config.axis
    grid = [(x, y) for y in axis for x in axis]
    losses, common = _run(config, model, tokenizer, ends, out_dir, grid, ("x", "y"), batch_size, on_point)
    result = Landscape2D(config=config, xs=axis, ys=axis, losses=[[losses[(x, y)] for x in axis] for y in axis], **common)
    write_json(Path(out_dir) / RESULT_FILE, result.to_dict())
    return result
