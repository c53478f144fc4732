"""Loss landscapes between models: 1D interpolation and 2D surfaces around an origin.

CRaSh argues that the plugged-in adapter and full fine-tuning land in one basin: the validation
loss along the straight line between the two has no barrier (1D), and a plane through the
pretrained model, the fine-tuned one and the plugged-in one shows both optima in one valley (2D).

    1D:  theta(a)    = theta_A + a (theta_B - theta_A),   a in linspace(0, 1, n)
    2D:  theta(a, b) = theta_O + a d_x + b d_y,  d = theta_X - theta_O, or filter-normalised noise

Parameters are matched by name, so any models of one architecture and shape compare (a model,
an emulator bundle, or either with an adapter). Only parameters that differ move: a sweep keeps
ONE working model plus, for the moving parameters only, an fp32 copy of the origin and one tensor
per direction, and writes each point into the model's weights in place, restoring the origin at
the end. (The ``loss-landscapes`` library deep-copies the whole model per point instead; see
benchmarks/bench_landscape.py.) Everything runs in fp32 with both end points included; the
original code interpolated in fp16 and used unnormalised directions.

A sweep is resumable: each evaluated point is appended to ``landscape.csv`` and flushed, and the
run's configuration and model fingerprints are recorded in ``landscape_config.json``; re-running
with the same configuration evaluates only the points missing from the CSV. ``landscape.json``
is written (atomically) once every point is in.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from crashlm.core.errors import UsageError
from crashlm.core.io import atomic_path, read_json, write_json
from crashlm.core.models import default_device, fingerprint
from crashlm.core.scoring import mean_answer_loss

DIRECTIONS = ("models", "random-filter-norm")
CONFIG_FILE = "landscape_config.json"
POINTS_FILE = "landscape.csv"
RESULT_FILE = "landscape.json"

Coords = tuple[float, ...]
# Called after each evaluated point with its coordinates and loss (progress hooks, tests).
PointCallback = Callable[[Coords, float], None]


# ---------------------------------------------------------------------------------------------
# Directions in parameter space


def _fp32_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    # named_parameters() lists a tied or shared weight once, so it moves once.
    params = dict(model.named_parameters())
    wrong = next((name for name, p in params.items() if p.dtype != torch.float32), None)
    if wrong is not None:
        raise ValueError(f"landscapes are computed in fp32; {wrong} is {params[wrong].dtype}")
    return params


def _check_compatible(params: dict[str, nn.Parameter], other: dict[str, nn.Parameter]) -> None:
    if params.keys() != other.keys():
        name = sorted(params.keys() ^ other.keys())[0]
        raise UsageError(f"the models have different parameters (e.g. {name}): a landscape needs one architecture")
    for name, param in params.items():
        if param.shape != other[name].shape:
            raise UsageError(
                f"{name} has shape {tuple(param.shape)} in one model and {tuple(other[name].shape)} in the other: "
                "a landscape needs one architecture and shape"
            )


def _filter_axis(model: nn.Module) -> dict[str, int]:
    """Parameters whose filters lie along dim 1: GPT-2's Conv1D stores its weight as [in, out]."""
    from transformers.pytorch_utils import Conv1D

    return {f"{name}.weight": 1 for name, module in model.named_modules() if isinstance(module, Conv1D)}


def filter_normalise(direction: torch.Tensor, reference: torch.Tensor, axis: int = 0) -> torch.Tensor:
    """Rescale each filter of ``direction`` to the norm of the same filter of ``reference``.

    Filter normalisation (Li et al. 2018): a filter is an output unit (a row of an ``nn.Linear``
    weight, a token's embedding row). Scaling a random direction per filter moves every unit by
    an amount proportional to its own size, so plots of differently scaled models compare.
    """
    rows = direction.movedim(axis, 0)
    flat, ref = rows.reshape(rows.shape[0], -1), reference.movedim(axis, 0).reshape(rows.shape[0], -1)
    scale = ref.norm(dim=1, keepdim=True) / (flat.norm(dim=1, keepdim=True) + 1e-10)
    return (flat * scale).reshape(rows.shape).movedim(0, axis).contiguous()


class Subspace:
    """A line or plane in one architecture's parameter space, written into a model in place.

    Holds, for the moving parameters only, an fp32 copy of the origin and one tensor per
    direction (a parameter absent from a direction does not move along it). An ``anchored``
    subspace is spanned by end-point models: ``vectors[i]`` holds model i's weights and the
    point c is the affine combination (1 - sum c_i) O + sum c_i V_i, which reproduces every
    anchor bit for bit. Otherwise ``vectors[i]`` is a direction and the point is O + sum c_i V_i.
    """

    def __init__(self, anchored: bool) -> None:
        self.anchored = anchored
        self.origin: dict[str, torch.Tensor] = {}
        self.vectors: list[dict[str, torch.Tensor]] = []

    @classmethod
    def between(cls, origin: nn.Module, *ends: nn.Module) -> Subspace:
        """The line (one end) or plane (two ends) through ``origin`` and the end-point models."""
        subspace = cls(anchored=True)
        for end in ends:
            subspace.add_end_point(origin, end)
        return subspace

    @torch.no_grad()
    def add_end_point(self, origin: nn.Module, end: nn.Module) -> None:
        """Span towards ``end``, keeping only the parameters where it differs from ``origin``.

        ``end`` is only read and can be freed afterwards, so models load one at a time.
        """
        params, end_params = _fp32_parameters(origin), _fp32_parameters(end)
        _check_compatible(params, end_params)
        vector = {}
        for name, param in params.items():
            end_weights = end_params[name].detach().to(param.device)
            if not torch.equal(param, end_weights):
                self.origin.setdefault(name, param.detach().clone())
                vector[name] = end_weights.clone()
        self.vectors.append(vector)

    @classmethod
    @torch.no_grad()
    def random_filter_norm(cls, origin: nn.Module, count: int = 2, seed: int = 0) -> Subspace:
        """``count`` seeded Gaussian directions, filter-normalised to ``origin`` (Li et al. 2018).

        Biases and norm gains (1-D parameters) get no direction, as in the paper: they stay at
        the origin. Noise is drawn on the CPU, so a seed gives the same directions on any device.
        """
        generator = torch.Generator().manual_seed(seed)
        axes = _filter_axis(origin)
        subspace = cls(anchored=False)
        subspace.vectors = [{} for _ in range(count)]
        for name, param in _fp32_parameters(origin).items():
            if param.dim() <= 1:
                continue
            subspace.origin[name] = param.detach().clone()
            for vector in subspace.vectors:
                noise = torch.randn(param.shape, generator=generator).to(param.device)
                vector[name] = filter_normalise(noise, param.detach(), axes.get(name, 0))
        return subspace

    @torch.no_grad()
    def write(self, model: nn.Module, coords: Sequence[float]) -> None:
        """Set ``model``'s moving parameters to the point ``coords`` (one coordinate per direction)."""
        if len(coords) != len(self.vectors):
            raise ValueError(f"expected {len(self.vectors)} coordinates, got {len(coords)}")
        params = dict(model.named_parameters())
        for name, origin in self.origin.items():
            terms = [(float(c), vector[name]) for c, vector in zip(coords, self.vectors) if name in vector]
            out = params[name].data
            torch.mul(origin, 1.0 - sum(c for c, _ in terms) if self.anchored else 1.0, out=out)
            for c, tensor in terms:
                out.add_(tensor, alpha=c)

    @torch.no_grad()
    def restore(self, model: nn.Module) -> None:
        """Put the origin's weights back into ``model``."""
        params = dict(model.named_parameters())
        for name, weights in self.origin.items():
            params[name].data.copy_(weights)


# ---------------------------------------------------------------------------------------------
# Grids and the resumable sweep


def grid_axis(lo: float, hi: float, n: int) -> list[float]:
    """``n`` evenly spaced values from ``lo`` to ``hi``, both included.

    Values within rounding of an anchor coordinate (0 or 1) are snapped to it, so a model on
    the grid is evaluated at exactly its own weights.
    """
    if n < 2:
        raise ValueError("a grid axis needs at least 2 values")
    step = (hi - lo) / (n - 1)
    values = [lo + i * step for i in range(n - 1)] + [float(hi)]
    return [next((a for a in (0.0, 1.0) if abs(v - a) <= 1e-9 * abs(step)), v) for v in values]


class PointLog:
    """The CSV of evaluated points, one flushed row per point, so an interrupted sweep resumes.

    Numbers are written with ``repr`` (exact round trip), so a re-run recognises its points.
    A last row without its newline (torn by a kill) is dropped when the log is read.
    """

    def __init__(self, path: str | Path, axes: Sequence[str]) -> None:
        self.path = Path(path)
        self.header = [*axes, "loss"]
        self._file = None

    def read(self) -> dict[Coords, float]:
        """Points already evaluated; rewrites the file clean (header + complete rows)."""
        done: dict[Coords, float] = {}
        if self.path.exists():
            lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
            rows = list(csv.reader(io.StringIO("".join(line for line in lines if line.endswith("\n")))))
            if rows and rows[0] != self.header:
                raise UsageError(f"{self.path} has columns {rows[0]}, expected {self.header}; choose another --out")
            for row in rows[1:]:
                try:
                    *coords, loss = (float(v) for v in row)
                except ValueError:
                    continue
                if len(coords) == len(self.header) - 1:
                    done[tuple(coords)] = loss
        with atomic_path(self.path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(self.header)
            writer.writerows([*map(repr, coords), repr(loss)] for coords, loss in done.items())
        return done

    def append(self, coords: Coords, loss: float) -> None:
        if self._file is None:
            self._file = open(self.path, "a", newline="", encoding="utf-8")
        csv.writer(self._file).writerow([*map(repr, coords), repr(loss)])
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def sweep(
    model: nn.Module,
    subspace: Subspace,
    points: Sequence[Sequence[float]],
    evaluate: Callable[[nn.Module], float],
    log: PointLog | None = None,
    on_point: PointCallback | None = None,
    desc: str = "landscape",
) -> dict[Coords, float]:
    """``evaluate(model)`` at every point of ``subspace``, writing the weights in place.

    ``model`` must hold the subspace's origin; it holds it again afterwards, even on error.
    Points already in ``log`` are not evaluated again; new ones are appended as they come.
    """
    points = list(dict.fromkeys(tuple(float(c) for c in p) for p in points))
    done = log.read() if log is not None else {}
    losses = {p: done[p] for p in points if p in done}
    todo = [p for p in points if p not in losses]
    try:
        for coords in tqdm(todo, desc=desc, unit="point", total=len(points), initial=len(losses)):
            subspace.write(model, coords)
            losses[coords] = float(evaluate(model))
            if log is not None:
                log.append(coords, losses[coords])
            if on_point is not None:
                on_point(coords, losses[coords])
    finally:
        subspace.restore(model)
        if log is not None:
            log.close()
    return losses


# ---------------------------------------------------------------------------------------------
# Configurations and results


def _check_int(value: Any, what: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UsageError(f"{what} must be an integer >= {minimum}, got {value!r}")


class _Config:
    """to_dict/from_dict and the checks shared by both configurations."""

    kind: ClassVar[str]

    def _validate_common(self) -> None:
        _check_int(self.limit, "--limit", 1)
        _check_int(self.max_length, "--max-length", 1)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


@dataclass
class Landscape1DConfig(_Config):
    """A 1D interpolation from model ``a`` (alpha 0) to model ``b`` (alpha 1)."""

    kind: ClassVar[str] = "1d"

    a: str
    b: str
    task: str = "piqa"
    points: int = 25
    limit: int = 256
    max_length: int = 512

    def validate(self) -> None:
        _check_int(self.points, "--points", 2)
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

    origin: str
    x: str | None = None
    y: str | None = None
    task: str = "piqa"
    grid: int = 25
    axis_range: list[float] = (-1.0, 2.0)
    directions: str = "models"
    seed: int = 0
    limit: int = 256
    max_length: int = 512

    def __post_init__(self) -> None:
        self.axis_range = list(self.axis_range)  # a list, as JSON gives it back

    def validate(self) -> None:
        if self.directions not in DIRECTIONS:
            raise UsageError(f"unknown --directions {self.directions!r}; choose one of {', '.join(DIRECTIONS)}")
        if self.directions == "models" and (self.x is None or self.y is None):
            raise UsageError("--directions models needs both --x and --y models")
        if self.directions != "models" and (self.x is not None or self.y is not None):
            raise UsageError(f"--directions {self.directions} takes no --x/--y models")
        _check_int(self.grid, "--grid", 2)
        _check_int(self.seed, "--seed", 0)
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
# Entry points: load models, sweep, save


def _load(spec: str, device: torch.device) -> tuple[nn.Module, Any]:
    """A model spec, emulator bundle or ``SPEC+ADAPTER`` as an fp32 model (plugin.load_target)."""
    from crashlm.emulators.plugin import load_target

    model, tokenizer, _ = load_target(model=spec, dtype=torch.float32, device=device)
    return model, tokenizer


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


def _run(
    config: Landscape1DConfig | Landscape2DConfig,
    out_dir: str | Path,
    grid: list[Coords],
    axes: Sequence[str],
    batch_size: int,
    device: str | torch.device | None,
    on_point: PointCallback | None,
) -> tuple[dict[Coords, float], dict[str, Any]]:
    """Check, load, sweep the grid and the anchors (resuming from ``out_dir``).

    Returns the losses by point and the result's common fields (anchors, examples, fingerprints).
    """
    from crashlm.core.tasks import load_examples

    _check_int(batch_size, "--batch-size", 1)
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, {"config": config.to_dict()})  # before loading any model
    examples = load_examples(config.task, "validation", config.limit)
    device = torch.device(device) if device is not None else default_device()

    (first, origin_spec), *ends = config.models.items()
    model, tokenizer = _load(origin_spec, device)
    fingerprints = {first: fingerprint(model)}
    if getattr(config, "directions", "models") == "random-filter-norm":
        subspace = Subspace.random_filter_norm(model, count=2, seed=config.seed)
    else:
        subspace = Subspace(anchored=True)
        for role, spec in ends:  # one at a time, freed once its direction is taken
            end, _ = _load(spec, device)
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
    out_dir: str | Path,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    on_point: PointCallback | None = None,
) -> Landscape1D:
    """Validation loss along the straight line from model a to model b; resumable in ``out_dir``.

    Writes ``landscape.csv`` (as it goes), ``landscape_config.json`` and, when complete,
    ``landscape.json``. Memory: model a (the working model) plus the weights that differ
    between a and b, twice, in fp32.
    """
    config.validate()
    points = [(alpha,) for alpha in config.alphas]
    losses, common = _run(config, out_dir, points, ("alpha",), batch_size, device, on_point)
    result = Landscape1D(config=config, alphas=config.alphas, losses=[losses[p] for p in points], **common)
    write_json(Path(out_dir) / RESULT_FILE, result.to_dict())
    return result


def landscape_2d(
    config: Landscape2DConfig,
    out_dir: str | Path,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    on_point: PointCallback | None = None,
) -> Landscape2D:
    """Validation loss on a grid around the origin model; resumable in ``out_dir``.

    Directions are the differences to models x and y (anchors at (1, 0) and (0, 1)), or seeded
    filter-normalised random directions. Anchors off the grid are evaluated too (``on_grid``
    false). Memory: the origin (the working model) plus, for the moving parameters, an fp32
    origin copy and one tensor per direction; models x and y load one at a time.
    """
    config.validate()
    axis = config.axis
    grid = [(x, y) for y in axis for x in axis]
    losses, common = _run(config, out_dir, grid, ("x", "y"), batch_size, device, on_point)
    result = Landscape2D(config=config, xs=axis, ys=axis, losses=[[losses[(x, y)] for x in axis] for y in axis], **common)
    write_json(Path(out_dir) / RESULT_FILE, result.to_dict())
    return result
