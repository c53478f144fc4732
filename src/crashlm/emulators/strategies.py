"""The strategy registry and the one plan builder.

A strategy is what ``--strategy`` names: a display label (the offsite table's row), the inputs
its plan needs, its default sharing mode and a function from :class:`PlanInputs` to a
:class:`~crashlm.emulators.plans.LayerPlan`. :func:`plan_for` is the only place a named plan is
made (``crashlm emulator``, ``crashlm cluster``, the offsite pipeline, the benchmarks): it checks
K, gathers the inputs (measuring the layer similarity on the task's train split when a strategy
needs it and none is given), calls the function and stamps the plan with the model's
fingerprint and name, and the similarity settings.

A new training-free strategy is one registered function::

    @register("greedy", "Greedy", needs={SIMILARITY})
    def greedy(inputs: PlanInputs) -> LayerPlan:
        kept, trainable = ...  # from inputs.adjacent, inputs.k, inputs.trainable
        return LayerPlan(inputs.num_layers, "greedy", kept, trainable)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from crashlm.analysis.divergence import adjacent_similarity, compute_divergence
from crashlm.analysis.similarity import SimilarityResult, compute_similarity
from crashlm.core.errors import UsageError
from crashlm.core.models import fingerprint, num_layers
from crashlm.core.settings import check_choice
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
    uniform_plan,
)

SIMILARITY = "similarity"  # the input: adjacent-layer similarities of the full model
INPUTS = (SIMILARITY,)
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
    check_choice(name, STRATEGIES, "emulator strategy")
    return STRATEGIES[name]


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


def plan_for(
    model: nn.Module,
    strategy: str,
    k: int | None = None,
    trainable: int = DEFAULT_TRAINABLE,
    similarity: Similarity | None = None,
    *,
    auto: bool = False,
    model_name: str | None = None,
    tokenizer: Any = None,
    source: str = "cka",
    task: str = "piqa",
    split: str = ANALYSIS_SPLIT,
    samples: int = 512,
    pooling: str = "mean_weighted",
    batch_size: int = 16,
    dtype: torch.dtype = torch.float32,
) -> LayerPlan:
    """The layer plan of ``strategy`` for the full ``model``, stamped with its fingerprint and name.

    Strategies that need the layer similarity read ``similarity`` (a CKA result, or the L - 1
    adjacent-layer values themselves); without one it is measured on ``samples`` examples of
    ``task``'s ``split`` (train by default: no evaluation item shapes the plan), by CKA
    (:func:`~crashlm.analysis.similarity.compute_similarity`) or, with ``source="lens"``, from the
    logit-lens divergence; both run ``model`` itself with its ``tokenizer``, so it is loaded once. K is checked
    first, so a bad K fails before that work; ``auto`` picks K at the largest gap of the
    similarities instead (:func:`~crashlm.emulators.plans.auto_k`).
    """
    entry = get_strategy(strategy)
    if source not in SIMILARITY_SOURCES:
        raise UsageError(f"unknown similarity source {source!r}; choose {' or '.join(SIMILARITY_SOURCES)}")
    if auto and k is not None:
        raise UsageError("give K or automatic K, not both")
    if auto and SIMILARITY not in entry.needs:
        raise UsageError(f"automatic K needs a layer similarity; strategy {strategy} reads none")
    depth = num_layers(model)
    if not auto:
        k = default_k(depth) if k is None else k
        check_k(k, depth, trainable)
    model_name = model_name or getattr(model.config, "_name_or_path", None) or None
    adjacent, settings = None, None
    if SIMILARITY in entry.needs:
        adjacent, settings = _similarity(model, tokenizer, similarity, source, model_name, task, split, samples,
                                         pooling, batch_size, dtype)
        k = auto_k(adjacent, trainable) if auto else k
    plan = entry.plan(PlanInputs(model, depth, k, trainable, adjacent))
    return replace(plan, strategy=entry.rule, similarity=plan.similarity if settings is None else settings,
                   base_fingerprint=fingerprint(model), model=model_name)
