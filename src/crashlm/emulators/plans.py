"""Layer plans and emulator specs: what an emulator is, as data.

A :class:`LayerPlan` says which of the full model's L layers are kept, which of those are the
trainable adapter, and (for CRaSh) how layers were clustered. An :class:`EmulatorSpec` is a plan
plus a :class:`Sharing` mode; :attr:`EmulatorSpec.slots` expands it into the emulator's layer
sequence: for each position, its source layer and the kind of module there (positions with the
same :attr:`Slot.key` share one module). Building, bundles, training, evaluation and plug-in all
read the spec, so they cannot disagree about where the adapter sits. Which plan a named strategy
makes lives in :mod:`crashlm.emulators.strategies`.

Rules (the CRaSh and Offsite-Tuning papers, with the original code's behaviour where it matters):

* uniform (Offsite-Tuning): T/2 bottom + T/2 top layers train; of the M middle layers,
  n = K - T are kept at ``round(i * (M - 1) / (n - 1))`` (Python's round, as the original).
* crash: contiguous clusters cut at the K - 1 weakest adjacent-layer similarities (equal to the
  original greedy merge of the most similar adjacent clusters); each cluster keeps its middle
  layer ``c[len(c) // 2]``; the kept layers at positions ``ceil(i * (K - 1) / (T - 1))`` train.
* sharing: every removed position is filled by the nearest kept layer (tie -> higher index).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Mapping, Sequence

from crashlm.core.errors import UsageError
from crashlm.core.io import read_json, write_json

PLAN_VERSION = 1
DEFAULT_TRAINABLE = 4


def default_k(num_layers: int) -> int:
    """The paper's emulator size: half the layers, rounded (OPT-1.3B: 24 -> 12)."""
    return max(1, round(num_layers / 2))


def check_k(k: int, num_layers: int, trainable: int) -> None:
    """K = L is allowed: nothing is removed and the adapter trains on the full model itself, the
    ceiling of what any emulator's adapter with those trainable layers can bring back."""
    if not trainable <= k <= num_layers:
        raise UsageError(
            f"K={k} is out of range for a {num_layers}-layer model with {trainable} trainable layers "
            f"(need {trainable} <= K <= {num_layers})"
        )


# ---------------------------------------------------------------------------------------------
# Clustering


def cluster_cuts(adjacent: Sequence[float], k: int) -> list[int]:
    """Boundaries to cut: the K - 1 lowest adjacent similarities.

    ``adjacent[b]`` is the similarity of layers b and b + 1; cutting at b separates them. Ties
    are broken as the greedy merge breaks them (it merges the leftmost of equal maxima first,
    so among equal minima the rightmost boundaries survive as cuts).
    """
    order = sorted(range(len(adjacent)), key=lambda b: (adjacent[b], -b))
    return sorted(order[: k - 1])


def contiguous_clusters(adjacent: Sequence[float], k: int) -> list[list[int]]:
    """Split layers 0..L-1 (L = len(adjacent) + 1) into K contiguous clusters."""
    num_layers = len(adjacent) + 1
    if not 1 <= k <= num_layers:
        raise UsageError(f"K={k} must be between 1 and {num_layers}")
    bounds = [-1, *cluster_cuts(adjacent, k), num_layers - 1]
    return [list(range(lo + 1, hi + 1)) for lo, hi in zip(bounds, bounds[1:])]


def auto_k(adjacent: Sequence[float], trainable: int) -> int:
    """Pick K at the largest gap of the sorted dissimilarities ``1 - adjacent``.

    Boundaries whose dissimilarity stands clearly above the rest are the natural cuts: sort
    the dissimilarities in decreasing order and cut before the largest drop between two
    consecutive values. K is clamped to [trainable, L - 1].
    """
    num_layers = len(adjacent) + 1
    dissim = sorted((1.0 - a for a in adjacent), reverse=True)
    if len(dissim) < 2:
        return max(trainable, 1)
    gaps = [dissim[i] - dissim[i + 1] for i in range(len(dissim) - 1)]
    cuts = max(range(len(gaps)), key=lambda i: (gaps[i], -i)) + 1
    return min(max(cuts + 1, trainable), num_layers - 1)


def spread_positions(count: int, total: int) -> list[int]:
    """``ceil(i * (total - 1) / (count - 1))`` for i < count: first, last, evenly in between."""
    if count == 1:
        return [0]
    return [-(-(i * (total - 1)) // (count - 1)) for i in range(count)]


def uniform_indices(total: int, keep: int) -> list[int]:
    """Offsite-Tuning's uniform drop: ``round(i * (total - 1) / (keep - 1))`` for i < keep."""
    if keep == 1:
        return [round((total - 1) / 2)]
    return [round(i * (total - 1) / (keep - 1)) for i in range(keep)]


# ---------------------------------------------------------------------------------------------
# Slots and sharing


class SlotKind(Enum):
    """What module sits at an emulator position."""

    ADAPTER = "adapter"  # a trainable layer of the plan, itself
    FROZEN = "frozen"  # a frozen kept layer, itself
    COPY = "copy"  # a frozen copy of a trainable layer's pretrained weights


class Sharing(Enum):
    """How an emulator fills the positions of removed layers."""

    NONE = "none"  # not at all: the kept layers only (Offsite-Tuning, "CRaSh w/o sharing")
    COPIES = "copies"  # the nearest kept layer; a frozen copy where that one trains (the original CRaSh)
    TIED = "tied"  # the nearest kept layer, the trainable module itself included (--share-trainable)


@dataclass(frozen=True)
class Slot:
    """One emulator position: its source layer and the kind of module there.

    :attr:`key` (``adapter.<s>``, ``frozen.<s>``, ``copy.<s>``) names the module object: positions
    with equal keys share one module, and bundles store each module once under its key.
    """

    position: int
    source: int
    kind: SlotKind

    @property
    def key(self) -> str:
        return f"{self.kind.value}.{self.source}"

    @property
    def trainable(self) -> bool:
        return self.kind is SlotKind.ADAPTER


# ---------------------------------------------------------------------------------------------
# Plans and specs


@dataclass
class LayerPlan:
    """Which layers an emulator keeps, which of them train, and why (clusters, similarity).

    ``strategy`` names the rule that chose the layers (``uniform``, ``crash``, a registered
    strategy's rule, or ``custom`` for a hand-written plan): it is a record, not a switch.
    """

    num_layers: int
    strategy: str
    kept: list[int]
    trainable: list[int]
    clusters: list[list[int]] | None = None
    similarity: dict | None = None
    scores: dict | None = None  # what a calibration strategy measured to choose the layers
    base_fingerprint: str | None = None
    model: str | None = None
    version: int = field(default=PLAN_VERSION)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def k(self) -> int:
        return len(self.kept)

    @property
    def frozen(self) -> list[int]:
        return [layer for layer in self.kept if layer not in set(self.trainable)]

    def validate(self) -> None:
        L = self.num_layers
        if L < 2:
            raise UsageError(f"plan: num_layers must be >= 2, got {L}")
        if not isinstance(self.strategy, str) or not self.strategy:
            raise UsageError(f"plan: strategy must be a name, got {self.strategy!r}")
        for name, layers in (("kept", self.kept), ("trainable", self.trainable)):
            if not layers:
                raise UsageError(f"plan: {name} is empty")
            if any(not isinstance(x, int) or not 0 <= x < L for x in layers):
                raise UsageError(f"plan: {name} has layers outside 0..{L - 1}: {layers}")
            if len(set(layers)) != len(layers):
                raise UsageError(f"plan: {name} has duplicate layers: {layers}")
            if list(layers) != sorted(layers):
                raise UsageError(f"plan: {name} must be in increasing order: {layers}")
        if not set(self.trainable) <= set(self.kept):
            raise UsageError(f"plan: trainable layers {self.trainable} are not all kept {self.kept}")
        if self.clusters is not None:
            flat = [x for c in self.clusters for x in c]
            if flat != list(range(L)):
                raise UsageError("plan: clusters must be contiguous, non-overlapping and cover every layer in order")
            if len(self.clusters) != len(self.kept) or any(k not in c for k, c in zip(self.kept, self.clusters)):
                raise UsageError("plan: each cluster must hold exactly one kept layer, in order")

    def check_base(self, fingerprint: str) -> None:
        """Refuse to apply a plan made for another base model."""
        if self.base_fingerprint and self.base_fingerprint != fingerprint:
            raise UsageError(
                f"plan was made for another base model (fingerprint {self.base_fingerprint}, this model {fingerprint})"
            )

    # -- serialisation -----------------------------------------------------------------------

    def to_dict(self) -> dict:
        data = asdict(self)
        data["k"] = self.k
        data["frozen"] = self.frozen
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "LayerPlan":
        if not isinstance(data, dict):
            raise UsageError("plan: expected a JSON object")
        missing = [key for key in ("num_layers", "strategy", "kept", "trainable") if key not in data]
        if missing:
            raise UsageError(f"plan: missing keys {', '.join(missing)}")
        if data.get("version", PLAN_VERSION) > PLAN_VERSION:
            raise UsageError(f"plan: version {data['version']} is newer than this crashlm understands")
        fields = ("num_layers", "strategy", "kept", "trainable", "clusters", "similarity", "scores", "base_fingerprint",
                  "model")
        try:
            return cls(**{key: data[key] for key in fields if key in data})
        except TypeError as exc:
            raise UsageError(f"plan: {exc}") from exc

    def save(self, path: str | Path) -> Path:
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "LayerPlan":
        return cls.from_dict(read_json(path, "plan"))


@dataclass(frozen=True)
class EmulatorSpec:
    """What an emulator is: its layer plan and how removed positions are filled."""

    plan: LayerPlan
    sharing: Sharing = Sharing.NONE

    @property
    def shares(self) -> bool:
        """Whether the emulator runs all L positions (removed ones filled by kept layers)."""
        return self.sharing is not Sharing.NONE

    @property
    def slots(self) -> list[Slot]:
        """The emulator's layer sequence.

        Without sharing: the kept layers, in order. With sharing: all L positions, each filled by
        the nearest kept layer (tie -> the higher index). A removed position whose nearest kept
        layer trains gets a frozen copy of that layer's pretrained weights (``COPIES``, as the
        original CRaSh did) or the trainable module itself (``TIED``).
        """
        trainable = set(self.plan.trainable)

        def kind(source: int, own: bool) -> SlotKind:
            if source not in trainable:
                return SlotKind.FROZEN
            return SlotKind.ADAPTER if own or self.sharing is Sharing.TIED else SlotKind.COPY

        if not self.shares:
            return [Slot(i, s, kind(s, True)) for i, s in enumerate(self.plan.kept)]
        slots = []
        for position in range(self.plan.num_layers):
            source = min(self.plan.kept, key=lambda s: (abs(s - position), -s))
            slots.append(Slot(position, source, kind(source, source == position)))
        return slots

    def to_dict(self) -> dict:
        return {"plan": self.plan.to_dict(), "sharing": self.sharing.value}

    @classmethod
    def from_dict(cls, data: dict) -> "EmulatorSpec":
        if not isinstance(data, dict) or "plan" not in data:
            raise UsageError("emulator spec: expected an object with a plan")
        try:
            sharing = Sharing(data.get("sharing", Sharing.NONE.value))
        except ValueError:
            known = ", ".join(mode.value for mode in Sharing)
            raise UsageError(f"emulator spec: unknown sharing {data['sharing']!r}; known: {known}") from None
        return cls(LayerPlan.from_dict(data["plan"]), sharing)


def split_adapter(num_layers: int, trainable: int) -> tuple[list[int], list[int]]:
    """(adapter, middle): Offsite-Tuning's T/2 bottom + T - T/2 top layers, and the layers between."""
    bottom, top = trainable // 2, trainable - trainable // 2
    adapter = list(range(bottom)) + list(range(num_layers - top, num_layers))
    return adapter, list(range(bottom, num_layers - top))


def uniform_plan(num_layers: int, k: int | None = None, trainable: int = DEFAULT_TRAINABLE, **meta) -> LayerPlan:
    """Offsite-Tuning's plan: T/2 bottom + T/2 top layers train, K - T middle layers kept uniformly."""
    k = default_k(num_layers) if k is None else k
    check_k(k, num_layers, trainable)
    adapter, middle = split_adapter(num_layers, trainable)
    if k - trainable > len(middle):
        raise UsageError(f"K={k} keeps more middle layers than the {len(middle)} available")
    kept_middle = [middle[i] for i in uniform_indices(len(middle), k - trainable)] if k > trainable else []
    return LayerPlan(num_layers, "uniform", sorted(adapter + kept_middle), adapter, **meta)


def removal_plan(num_layers: int, strategy: str, removed: Sequence[int], trainable: int, **meta) -> LayerPlan:
    """The plan that removes ``removed`` (middle layers only): the T/2 bottom and top layers train."""
    adapter, middle = split_adapter(num_layers, trainable)
    if not set(removed) <= set(middle):
        raise UsageError(f"{strategy}: only middle layers {middle[0]}..{middle[-1]} may be removed, got {sorted(removed)}")
    kept = [layer for layer in range(num_layers) if layer not in set(removed)]
    return LayerPlan(num_layers, strategy, kept, adapter, **meta)


def crash_plan(
    adjacent: Sequence[float], k: int | None = None, trainable: int = DEFAULT_TRAINABLE,
    costs: Mapping[int, float] | None = None, **meta
) -> LayerPlan:
    """CRaSh's plan from the L - 1 similarities between consecutive decoder layers.

    Each cluster keeps its middle layer; with ``costs`` (layer -> what removing it alone costs)
    it keeps its costliest member instead (ties: the one nearest the middle).
    """
    num_layers = len(adjacent) + 1
    k = default_k(num_layers) if k is None else k
    check_k(k, num_layers, trainable)
    clusters = contiguous_clusters(adjacent, k)
    if costs is None:
        kept = [c[len(c) // 2] for c in clusters]
    else:
        kept = [max(c, key=lambda layer, c=c: (costs[layer], -abs(layer - c[len(c) // 2]))) for c in clusters]
    train = [kept[p] for p in spread_positions(trainable, k)]
    return LayerPlan(num_layers, "crash", kept, train, clusters=clusters, **meta)

