"""The strategy registry and the one plan builder.

A strategy is what ``--strategy`` names: a display label (the offsite table's row), the inputs
its plan needs, its default sharing mode and a function from :class:`PlanInputs` to a
:class:`~crashlm.emulators.plans.LayerPlan`. :func:`plan_for` is the only place a named plan is
made (``crashlm emulator``, ``crashlm cluster``, the offsite pipeline, the benchmarks): it checks
K, gathers the inputs (measuring the layer similarity on the task's train split when a strategy
needs it and none is given), calls the function and stamps the plan with the model's
fingerprint and name, and the similarity settings.

A new training-free strategy is one registered function::

    @register("drop-last", "Drop last")
    def drop_last(inputs: PlanInputs) -> LayerPlan:
        adapter, middle = split_adapter(inputs.num_layers, inputs.trainable)
        return removal_plan(inputs.num_layers, "drop-last", middle[len(middle) - inputs.removals:], inputs.trainable)

Every strategy also exists with sharing: ``<name>-share`` is the same plan with removed positions
filled by the nearest kept layer (:class:`~crashlm.emulators.plans.Sharing`), registered or not.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from crashlm.analysis.divergence import adjacent_similarity, compute_divergence
from crashlm.analysis.removal import LayerStack, RemovalScores
from crashlm.analysis.similarity import SimilarityResult, compute_similarity
from crashlm.core.calibration import CALIBRATION_TASK, calibration_texts
from crashlm.core.errors import UsageError
from crashlm.core.models import fingerprint, num_layers
from crashlm.core.tasks import ANALYSIS_SPLIT, load_examples
from crashlm.emulators.plans import (
    DEFAULT_TRAINABLE,
    EmulatorSpec,
    LayerPlan,
    Sharing,
    auto_k,
    check_k,
    crash_plan,
    default_k,
    removal_plan,
    split_adapter,
    uniform_plan,
)

SIMILARITY = "similarity"  # the input: adjacent-layer similarities of the full model
CALIBRATION = "calibration"  # the input: removal scores of the full model on calibration text
INPUTS = (SIMILARITY, CALIBRATION)
SHARE_SUFFIX = "-share"
K_RULES = ("auto", "gap")
# --k auto: the smallest K whose emulator's calibration loss is within this fraction of the full model's.
DEFAULT_MAX_LOSS_INCREASE = 0.25
# Calibration paragraphs the strategies score removals on (the greedy search's cost grows with them).
DEFAULT_CALIBRATION_SAMPLES = 32
# cka: linear CKA of pooled hidden states; lens: 1 - normalised JS divergence of logit-lens distributions.
SIMILARITY_SOURCES = ("cka", "lens")
# A CKA result, or the L - 1 adjacent-layer similarities themselves (entry b: layers b and b + 1).
Similarity = SimilarityResult | Sequence[float]


@dataclass(frozen=True)
class PlanInputs:
    """What a strategy's plan function reads (``adjacent`` only when it needs ``SIMILARITY``)."""

    model: nn.Module  # the full model; read it, never change it
    num_layers: int
    k: int
    trainable: int
    adjacent: list[float] | None = None  # entry b: the similarity of layers b and b + 1
    scores: RemovalScores | None = None  # removal scores on the calibration text

    @property
    def removals(self) -> int:
        return self.num_layers - self.k


@dataclass(frozen=True)
class Strategy:
    """A registered strategy. ``rule`` is the ``LayerPlan.strategy`` its plans carry: its own
    name, or the strategy whose layers it reuses (crash-share: crash's plan, shared)."""

    name: str
    label: str
    plan: Callable[[PlanInputs], LayerPlan]
    needs: frozenset[str]
    sharing: Sharing
    rule: str

    @property
    def shares(self) -> bool:
        return self.sharing is not Sharing.NONE

    def spec(self, plan: LayerPlan) -> EmulatorSpec:
        """``plan`` as this strategy's emulator (its default sharing)."""
        return EmulatorSpec(plan, self.sharing)


STRATEGIES: dict[str, Strategy] = {}


def register(
    name: str, label: str, needs: Iterable[str] = (), sharing: Sharing = Sharing.NONE, rule: str | None = None
) -> Callable[[Callable[[PlanInputs], LayerPlan]], Callable[[PlanInputs], LayerPlan]]:
    """Decorator: register a plan function as strategy ``name`` (decorators stack for variants)."""
    unknown = set(needs) - set(INPUTS)
    if unknown:
        raise ValueError(f"strategy {name}: unknown inputs {sorted(unknown)}; known: {', '.join(INPUTS)}")

    def add(function: Callable[[PlanInputs], LayerPlan]) -> Callable[[PlanInputs], LayerPlan]:
        if name in STRATEGIES:
            raise ValueError(f"strategy {name!r} is already registered")
        STRATEGIES[name] = Strategy(name, label, function, frozenset(needs), sharing, rule or name)
        return function

    return add


def get_strategy(name: str) -> Strategy:
    """A registered strategy, or ``<name>-share``: registered strategy ``name`` with sharing."""
    if name in STRATEGIES:
        return STRATEGIES[name]
    base = STRATEGIES.get(name.removesuffix(SHARE_SUFFIX)) if name.endswith(SHARE_SUFFIX) else None
    if base is None or base.shares:
        raise UsageError(f"unknown emulator strategy {name!r}; choose {', '.join(STRATEGIES)} "
                         f"(each also as <name>{SHARE_SUFFIX})")
    return replace(base, name=name, label=f"{base.label} + sharing", sharing=Sharing.COPIES)


def strategy_name(spec: EmulatorSpec) -> str:
    """The strategy an emulator is: the registered one with its plan's rule and sharing, else
    ``<rule>`` or ``<rule>-share`` (a hand-written plan, or a plan shared where its strategy does not)."""
    for strategy in STRATEGIES.values():
        if strategy.rule == spec.plan.strategy and strategy.shares == spec.shares:
            return strategy.name
    return spec.plan.strategy + ("-share" if spec.shares else "")


# ---------------------------------------------------------------------------------------------
# The paper's strategies


@register("uniform", "Uniform")
def uniform(inputs: PlanInputs) -> LayerPlan:
    """Offsite-Tuning's uniform drop: the bottom and top layers train, the middle is kept evenly."""
    return uniform_plan(inputs.num_layers, inputs.k, inputs.trainable)


@register("crash-share", "CRaSh", needs={SIMILARITY}, sharing=Sharing.COPIES, rule="crash")
@register("crash", "CRaSh w/o sharing", needs={SIMILARITY})
def crash(inputs: PlanInputs) -> LayerPlan:
    """CRaSh: one layer per cluster of similar consecutive layers."""
    return crash_plan(inputs.adjacent, inputs.k, inputs.trainable)


# ---------------------------------------------------------------------------------------------
# Since the paper: training-free removal scored on calibration text. The adapter is
# Offsite-Tuning's (T/2 bottom and T - T/2 top layers train) and only middle layers are removed.


@register("crash-loss-share", "CRaSh-loss", needs={SIMILARITY, CALIBRATION}, sharing=Sharing.COPIES, rule="crash-loss")
@register("crash-loss", "CRaSh-loss w/o sharing", needs={SIMILARITY, CALIBRATION})
def crash_loss(inputs: PlanInputs) -> LayerPlan:
    """CRaSh's clusters, each represented by the member whose removal alone raises the calibration
    loss most (``--representative loss``) instead of its middle layer."""
    costs = inputs.scores.single_removal_losses()
    plan = crash_plan(inputs.adjacent, inputs.k, inputs.trainable, costs=costs)
    return replace(plan, strategy="crash-loss", scores={"single_removal_loss": [costs[i] for i in range(inputs.num_layers)]})


@register("greedy", "Greedy (SLEB)", needs={CALIBRATION})
def greedy(inputs: PlanInputs) -> LayerPlan:
    """SLEB (Song et al., ICML 2024): remove one middle layer at a time, the one whose removal raises
    the calibration loss least, until K remain."""
    _, middle = split_adapter(inputs.num_layers, inputs.trainable)
    removed, losses = inputs.scores.greedy_removal(middle, inputs.removals)
    return removal_plan(inputs.num_layers, "greedy", removed, inputs.trainable,
                        scores={"removal_order": removed, "loss_after_removal": losses})


@register("block-influence", "Block influence (ShortGPT)", needs={CALIBRATION})
def block_influence(inputs: PlanInputs) -> LayerPlan:
    """ShortGPT (Men et al. 2024): remove the middle layers of lowest block influence
    1 - cos(input, output), measured once on the full model (ties: the lower layer)."""
    influence = inputs.scores.block_influence()
    _, middle = split_adapter(inputs.num_layers, inputs.trainable)
    removed = sorted(middle, key=lambda layer: (influence[layer], layer))[: inputs.removals]
    return removal_plan(inputs.num_layers, "block-influence", removed, inputs.trainable,
                        scores={"block_influence": influence})


@register("angular", "Angular distance (Gromov et al.)", needs={CALIBRATION})
def angular(inputs: PlanInputs) -> LayerPlan:
    """Gromov et al. (ICLR 2025): remove the contiguous block of n = L - K middle layers whose input
    and output are closest in angular distance at the last token (ties: the lower block)."""
    distance = inputs.scores.angular_distance()
    _, middle = split_adapter(inputs.num_layers, inputs.trainable)
    n = inputs.removals
    starts = range(middle[0], middle[-1] - n + 2)
    start = min(starts, key=lambda first: (distance[first][n], first))
    return removal_plan(inputs.num_layers, "angular", list(range(start, start + n)), inputs.trainable,
                        scores={"angular_distance": {str(first): distance[first][n] for first in starts}})


@register("contiguous", "Contiguous block (loss)", needs={CALIBRATION})
def contiguous(inputs: PlanInputs) -> LayerPlan:
    """Angular's contiguous block chosen by SLEB's criterion: remove the block of n = L - K middle
    layers whose removal raises the calibration loss least (ties: the lower block). Built here after
    the K = 25 SmolLM2 table, where contiguous removals transferred and removals that keep a layer
    inside the removed span did not, at the same closeness."""
    _, middle = split_adapter(inputs.num_layers, inputs.trainable)
    losses = inputs.scores.block_removal_losses(middle, inputs.removals)
    start = min(losses, key=lambda first: (losses[first], first))
    return removal_plan(inputs.num_layers, "contiguous", list(range(start, start + inputs.removals)), inputs.trainable,
                        scores={"block_removal_loss": {str(first): loss for first, loss in losses.items()}})


@register("drop-last", "Drop last")
def drop_last(inputs: PlanInputs) -> LayerPlan:
    """The deepest middle layers go (those just below the top adapter layers): the baseline that
    Gromov et al. (2025) and later pruning reassessments found hard to beat."""
    _, middle = split_adapter(inputs.num_layers, inputs.trainable)
    return removal_plan(inputs.num_layers, "drop-last", middle[len(middle) - inputs.removals:], inputs.trainable)


# ---------------------------------------------------------------------------------------------
# The builder


def _similarity(
    model: nn.Module, tokenizer: Any, similarity: Similarity | None, source: str, model_name: str | None,
    task: str, split: str, samples: int, pooling: str, batch_size: int, dtype: torch.dtype,
) -> tuple[list[float], dict | None]:
    """The adjacent-layer similarities and the settings the plan records (none for bare values)."""
    depth = num_layers(model)
    if similarity is not None and not isinstance(similarity, SimilarityResult):
        adjacent = [float(value) for value in similarity]
        if len(adjacent) != depth - 1:
            raise UsageError(f"the similarity describes {len(adjacent) + 1} layers but the model has {depth}")
        return adjacent, None
    if similarity is None and source == "lens":
        if tokenizer is None:
            raise UsageError("the lens similarity runs the model: give its tokenizer")
        texts = [example.text for example in load_examples(task, split, limit=samples)]
        result = compute_divergence(model, tokenizer, texts, batch_size=batch_size)
        settings = {"source": "lens", "measure": "js", "task": task, "split": split, "samples": len(texts)}
        return adjacent_similarity(result, "js"), settings
    if similarity is None:
        if tokenizer is None:
            raise UsageError("the layer similarity runs the model: give its tokenizer")
        similarity = compute_similarity(model_name or "model", task=task, samples=samples, pooling=pooling,
                                        batch_size=batch_size, dtype=dtype, split=split, model=model, tokenizer=tokenizer)
    if similarity.num_layers != depth:
        raise UsageError(f"the similarity describes {similarity.num_layers} layers but the model has {depth}")
    return similarity.adjacent_layers, {k: v for k, v in similarity.to_dict().items() if k not in ("cka", "adjacent")}


def removal_scores(
    model: nn.Module, tokenizer: Any, samples: int = DEFAULT_CALIBRATION_SAMPLES, max_length: int = 128,
    batch_size: int = 8, progress: bool = True,
) -> RemovalScores:
    """The full ``model``'s removal scores on the first ``samples`` texts of the calibration search slice."""
    if tokenizer is None:
        raise UsageError("calibration scores run the model: give its tokenizer")
    texts = calibration_texts("search", samples)
    stack = LayerStack(model, tokenizer, texts, batch_size=batch_size, max_length=max_length, progress=progress)
    settings = {"text": f"{CALIBRATION_TASK} train paragraphs (search slice)", "texts": len(texts),
                "max_length": max_length, "tokens": stack.num_tokens}
    return RemovalScores(stack, settings)


def _k_by_loss(entry: Strategy, inputs: PlanInputs, max_increase: float) -> tuple[int, dict]:
    """``--k auto``: the smallest K (down to T) whose untrained emulator's calibration loss is at most
    ``(1 + max_increase)`` times the full model's; with sharing the emulator runs its slots' sources."""
    scores = inputs.scores
    full = scores.full_loss()
    losses: dict[int, float] = {}
    chosen = inputs.num_layers - 1
    for k in range(inputs.num_layers - 1, inputs.trainable - 1, -1):
        plan = entry.plan(replace(inputs, k=k))
        losses[k] = scores.stack.loss([slot.source for slot in entry.spec(plan).slots])
        if losses[k] > (1 + max_increase) * full:
            break
        chosen = k
    return chosen, {"rule": "auto", "max_loss_increase": max_increase, "full_loss": full,
                    "loss_by_k": {str(k): v for k, v in sorted(losses.items())}}


def plan_for(
    model: nn.Module,
    strategy: str,
    k: int | str | None = None,
    trainable: int = DEFAULT_TRAINABLE,
    similarity: Similarity | None = None,
    *,
    scores: RemovalScores | None = None,
    max_loss_increase: float = DEFAULT_MAX_LOSS_INCREASE,
    model_name: str | None = None,
    tokenizer: Any = None,
    source: str = "cka",
    task: str = "piqa",
    split: str = ANALYSIS_SPLIT,
    samples: int = 512,
    pooling: str = "mean_weighted",
    batch_size: int = 16,
    dtype: torch.dtype = torch.float32,
    calibration_samples: int = DEFAULT_CALIBRATION_SAMPLES,
) -> LayerPlan:
    """The layer plan of ``strategy`` for the full ``model``, stamped with its fingerprint and name.

    Strategies that need the layer similarity read ``similarity`` (a CKA result, or the L - 1
    adjacent-layer values themselves); without one it is measured on ``samples`` examples of
    ``task``'s ``split`` (train by default: no evaluation item shapes the plan), by CKA
    (:func:`~crashlm.analysis.similarity.compute_similarity`) or, with ``source="lens"``, from the
    logit-lens divergence. Strategies that need calibration scores read ``scores``, else they are
    measured on ``calibration_samples`` paragraphs of the calibration search slice
    (:func:`removal_scores`). Both run ``model`` itself with its ``tokenizer``, so it is loaded once.

    K: an int, None (half the layers), ``"auto"`` (the smallest K whose untrained emulator's
    calibration loss stays within ``max_loss_increase`` of the full model's, :func:`_k_by_loss`) or
    ``"gap"`` (CRaSh's clusters: the largest gap of the similarities, :func:`~crashlm.emulators.plans.auto_k`).
    A bad K fails before any measurement.
    """
    entry = get_strategy(strategy)
    if source not in SIMILARITY_SOURCES:
        raise UsageError(f"unknown similarity source {source!r}; choose {' or '.join(SIMILARITY_SOURCES)}")
    depth = num_layers(model)
    if isinstance(k, str):
        if k not in K_RULES:
            raise UsageError(f"K must be a number or one of {', '.join(K_RULES)}, got {k!r}")
        if k == "gap" and SIMILARITY not in entry.needs:
            raise UsageError(f"K by similarity gap needs a layer similarity; strategy {strategy} reads none")
        if not max_loss_increase > 0:
            raise UsageError(f"the loss increase of K auto must be positive, got {max_loss_increase}")
        check_k(trainable, depth, trainable)
    else:
        k = default_k(depth) if k is None else k
        check_k(k, depth, trainable)
    model_name = model_name or getattr(model.config, "_name_or_path", None) or None
    adjacent, settings = None, None
    if SIMILARITY in entry.needs:
        adjacent, settings = _similarity(model, tokenizer, similarity, source, model_name, task, split, samples,
                                         pooling, batch_size, dtype)
    if scores is None and (CALIBRATION in entry.needs or k == "auto"):
        scores = removal_scores(model, tokenizer, calibration_samples)
    inputs = PlanInputs(model, depth, depth - 1, trainable, adjacent, scores)
    k_record = None
    if k == "gap":
        k = auto_k(adjacent, trainable)
    elif k == "auto":
        k, k_record = _k_by_loss(entry, inputs, max_loss_increase)
    plan = entry.plan(replace(inputs, k=k))
    recorded = dict(plan.scores or {})
    if CALIBRATION in entry.needs or k_record:
        recorded["calibration"] = scores.settings
    if k_record:
        recorded["k"] = k_record
    return replace(plan, strategy=entry.rule, similarity=plan.similarity if settings is None else settings,
                   scores=recorded or None, base_fingerprint=fingerprint(model), model=model_name)
