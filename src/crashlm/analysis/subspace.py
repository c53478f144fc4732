"""Lines and planes in parameter space, written into one model in place, and the resumable sweep.

A :class:`Subspace` holds, for the parameters that move only, an fp32 copy of the origin and
one tensor per direction, and writes each point into the working model's weights, restoring
the origin at the end (the ``loss-landscapes`` library deep-copies the whole model per point
instead; see benchmarks/bench_landscape.py). :func:`sweep` evaluates a list of points,
appending each to a :class:`PointLog` so that an interrupted sweep resumes. The landscapes
built on these: :mod:`crashlm.analysis.landscape`.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from crashlm.core.errors import UsageError
from crashlm.core.io import atomic_path

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
