"""Layer plans: clustering equals the original greedy merge; plans are valid for every K."""

from __future__ import annotations

import random

import pytest

from crashlm.analysis.similarity import SimilarityResult
from crashlm.core.errors import UsageError
from crashlm.emulators import strategies
from crashlm.emulators.plans import (
    EmulatorSpec,
    LayerPlan,
    Sharing,
    SlotKind,
    auto_k,
    contiguous_clusters,
    crash_plan,
    spread_positions,
    uniform_plan,
)
from crashlm.emulators.strategies import (
    CALIBRATION,
    SIMILARITY,
    PlanInputs,
    get_strategy,
    plan_for,
    register,
    strategy_name,
)
from tests.tiny import tiny_model


def greedy_merge(adjacent: list[float], k: int) -> list[list[int]]:
    """The original CRaSh clustering: repeatedly merge the two adjacent clusters whose
    boundary layers are most similar (argmax takes the first maximum) until K remain."""
    clusters = [[i] for i in range(len(adjacent) + 1)]
    while len(clusters) > k:
        scores = [adjacent[clusters[i][-1]] for i in range(len(clusters) - 1)]
        best = scores.index(max(scores))
        clusters[best : best + 2] = [clusters[best] + clusters[best + 1]]
    return clusters


def test_cuts_equal_greedy_merge_on_random_profiles():
    rng = random.Random(0)
    for trial in range(1000):
        num_layers = rng.randint(2, 48)
        # Half the profiles are coarsely quantised so that ties (and their breaking) are exercised.
        if trial % 2:
            adjacent = [rng.randint(0, 4) / 4 for _ in range(num_layers - 1)]
        else:
            adjacent = [rng.random() for _ in range(num_layers - 1)]
        k = rng.randint(1, num_layers)
        assert contiguous_clusters(adjacent, k) == greedy_merge(adjacent, k)


@pytest.mark.parametrize("num_layers", [6, 12, 24, 30, 32])
def test_crash_plan_valid_for_every_k(num_layers):
    rng = random.Random(num_layers)
    adjacent = [rng.random() for _ in range(num_layers - 1)]
    for k in range(4, num_layers):
        plan = crash_plan(adjacent, k)
        assert len(plan.clusters) == k == plan.k
        assert [x for c in plan.clusters for x in c] == list(range(num_layers))
        assert plan.kept == [c[len(c) // 2] for c in plan.clusters]
        assert len(plan.trainable) == 4 and plan.trainable[0] == plan.kept[0] and plan.trainable[-1] == plan.kept[-1]
        assert sorted(plan.frozen + plan.trainable) == plan.kept
        assert LayerPlan.from_dict(plan.to_dict()) == plan


def test_reference_trainable_rule_example():
    # The CRaSh code's OPT-1.3B ARC-E plan: kept layers -> trainable 0,5,18,23; frozen 1,2,3,9,12,15,20,22.
    kept = [0, 1, 2, 3, 5, 9, 12, 15, 18, 20, 22, 23]
    assert [kept[p] for p in spread_positions(4, len(kept))] == [0, 5, 18, 23]


def test_uniform_plan_matches_offsite_tuning_sizes():
    plan = uniform_plan(24, 12)  # OPT-1.3B: 2 + 8 + 2
    assert plan.trainable == [0, 1, 22, 23]
    assert plan.frozen == [2, 5, 7, 10, 13, 16, 18, 21]
    assert len(uniform_plan(32, 22).frozen) == 18  # OPT-6.7B: 2 + 18 + 2
    for k in range(5, 30):
        plan = uniform_plan(30, k)
        assert plan.k == k and plan.trainable == [0, 1, 28, 29]


def test_slots_sharing_nearest_kept_tie_to_higher():
    plan = LayerPlan(num_layers=8, strategy="custom", kept=[0, 3, 5, 7], trainable=[0, 7])
    slots = EmulatorSpec(plan, Sharing.COPIES).slots
    assert [s.source for s in slots] == [0, 0, 3, 3, 5, 5, 7, 7]  # position 4: 3 vs 5 -> 5; 6: 5 vs 7 -> 7
    assert [s.key for s in slots][:2] == ["adapter.0", "copy.0"]
    assert slots[6].key == "copy.7" and slots[7].key == "adapter.7"
    assert [s.kind for s in slots[2:4]] == [SlotKind.FROZEN, SlotKind.FROZEN]
    tied = EmulatorSpec(plan, Sharing.TIED).slots
    assert tied[6].key == "adapter.7"
    plain = EmulatorSpec(plan).slots
    assert [s.source for s in plain] == [0, 3, 5, 7] and [s.trainable for s in plain] == [True, False, False, True]


def test_auto_k_finds_the_obvious_blocks():
    # Three blocks of very similar layers separated by two sharp drops -> 3 clusters.
    adjacent = [0.95] * 4 + [0.2] + [0.96] * 4 + [0.3] + [0.94] * 4
    assert auto_k(adjacent, trainable=1) == 3
    assert auto_k(adjacent, trainable=4) == 4  # never fewer clusters than trainable layers


@pytest.mark.parametrize(
    "bad",
    [
        dict(kept=[0, 1, 9], trainable=[0]),  # out of range
        dict(kept=[0, 1, 1], trainable=[0]),  # duplicate
        dict(kept=[0, 2, 1], trainable=[0]),  # unordered
        dict(kept=[0, 1], trainable=[2]),  # trainable not kept
        dict(kept=[0, 4], trainable=[0], clusters=[[0, 1, 2], [2, 3, 4, 5, 6, 7]]),  # overlapping
        dict(kept=[0, 4], trainable=[0], clusters=[[0, 1, 2], [4, 5, 6, 7]]),  # gap
    ],
)
def test_invalid_plans_are_refused(bad):
    with pytest.raises(UsageError):
        LayerPlan(num_layers=8, strategy="custom", **bad)


def test_k_out_of_range():
    with pytest.raises(UsageError):
        uniform_plan(12, 13)
    assert uniform_plan(12, 12).kept == list(range(12))  # K = L: the ceiling control, nothing removed
    with pytest.raises(UsageError):
        crash_plan([0.5] * 11, 3)  # fewer kept than trainable


# ---------------------------------------------------------------------------------------------
# Specs and the strategy registry


def test_spec_round_trips_and_unknown_sharing_is_refused():
    spec = EmulatorSpec(crash_plan([0.9, 0.2, 0.95, 0.97, 0.3, 0.9, 0.99], k=4), Sharing.TIED)
    assert EmulatorSpec.from_dict(spec.to_dict()) == spec and spec.to_dict()["sharing"] == "tied"
    assert spec.shares and not EmulatorSpec(spec.plan).shares
    with pytest.raises(UsageError, match="unknown sharing 'sometimes'"):
        EmulatorSpec.from_dict({**spec.to_dict(), "sharing": "sometimes"})


def test_the_papers_strategies_are_registered_with_their_labels_inputs_and_sharing():
    table = {name: (s.label, s.needs, s.sharing, s.rule) for name, s in strategies.STRATEGIES.items()}
    assert table == {
        "uniform": ("Uniform", frozenset(), Sharing.NONE, "uniform"),
        "crash": ("CRaSh w/o sharing", {SIMILARITY}, Sharing.NONE, "crash"),
        "crash-share": ("CRaSh", {SIMILARITY}, Sharing.COPIES, "crash"),
        "crash-loss": ("CRaSh-loss w/o sharing", {SIMILARITY, CALIBRATION}, Sharing.NONE, "crash-loss"),
        "crash-loss-share": ("CRaSh-loss", {SIMILARITY, CALIBRATION}, Sharing.COPIES, "crash-loss"),
        "greedy": ("Greedy (SLEB)", {CALIBRATION}, Sharing.NONE, "greedy"),
        "block-influence": ("Block influence (ShortGPT)", {CALIBRATION}, Sharing.NONE, "block-influence"),
        "angular": ("Angular distance (Gromov et al.)", {CALIBRATION}, Sharing.NONE, "angular"),
        "contiguous": ("Contiguous block (loss)", {CALIBRATION}, Sharing.NONE, "contiguous"),
        "drop-last": ("Drop last", frozenset(), Sharing.NONE, "drop-last"),
    }
    with pytest.raises(UsageError, match="unknown emulator strategy 'random'; choose uniform, crash"):
        get_strategy("random")
    shared = get_strategy("greedy-share")
    assert (shared.label, shared.sharing, shared.rule) == ("Greedy (SLEB) + sharing", Sharing.COPIES, "greedy")
    for name in ("crash-share-share", "random-share"):
        with pytest.raises(UsageError, match="unknown emulator strategy"):
            get_strategy(name)


def test_an_emulator_is_named_by_its_plans_rule_and_whether_it_shares():
    crash = crash_plan([0.9, 0.2, 0.95, 0.97, 0.3, 0.9, 0.99], k=4)
    custom = LayerPlan(num_layers=8, strategy="custom", kept=[0, 3, 5, 7], trainable=[0, 7])
    names = {(plan.strategy, sharing): strategy_name(EmulatorSpec(plan, sharing))
             for plan in (uniform_plan(8, 4, 2), crash, custom) for sharing in Sharing}
    assert names == {
        ("uniform", Sharing.NONE): "uniform", ("uniform", Sharing.COPIES): "uniform-share",
        ("uniform", Sharing.TIED): "uniform-share",
        ("crash", Sharing.NONE): "crash", ("crash", Sharing.COPIES): "crash-share",
        ("crash", Sharing.TIED): "crash-share",
        ("custom", Sharing.NONE): "custom", ("custom", Sharing.COPIES): "custom-share",
        ("custom", Sharing.TIED): "custom-share",
    }


def test_a_new_strategy_is_one_registered_function(monkeypatch):
    monkeypatch.setattr(strategies, "STRATEGIES", dict(strategies.STRATEGIES))
    seen = []

    @register("most-similar", "Most similar", needs={SIMILARITY}, sharing=Sharing.COPIES)
    def most_similar(inputs: PlanInputs) -> LayerPlan:
        seen.append(inputs)
        order = sorted(range(inputs.num_layers - 1), key=lambda b: -inputs.adjacent[b])
        dropped = set(order[: inputs.num_layers - inputs.k])
        kept = [layer for layer in range(inputs.num_layers) if layer not in dropped]
        return LayerPlan(inputs.num_layers, "anything", kept, [kept[0], kept[-1]])

    model, _ = tiny_model("llama", 6)
    similarity = synthetic_similarity([0.9, 0.2, 0.95, 0.3, 0.8])
    plan = plan_for(model, "most-similar", k=3, trainable=2, similarity=similarity, model_name="tiny")
    assert seen[0].adjacent == similarity.adjacent_layers and seen[0].k == 3 and seen[0].model is model
    assert plan.kept == [1, 3, 5] and plan.strategy == "most-similar" and plan.model == "tiny"
    assert plan.similarity["task"] == "synthetic" and "cka" not in plan.similarity and plan.base_fingerprint
    assert strategy_name(get_strategy("most-similar").spec(plan)) == "most-similar"
    with pytest.raises(ValueError, match="already registered"):
        register("most-similar", "again")(most_similar)
    with pytest.raises(ValueError, match="unknown inputs"):
        register("psychic", "Psychic", needs={"future"})


def synthetic_similarity(adjacent_layers: list[float]) -> SimilarityResult:
    """A CKA result whose consecutive decoder layers have these similarities."""
    num_layers = len(adjacent_layers) + 1
    adjacent = [0.5, *adjacent_layers]
    cka = [[1.0 if i == j else 0.5 for j in range(num_layers + 1)] for i in range(num_layers + 1)]
    return SimilarityResult(model="tiny", task="synthetic", samples=8, pooling="mean", estimator="biased",
                            minibatch=None, num_layers=num_layers, cka=cka, adjacent=adjacent)


def test_plan_for_with_automatic_k_and_bare_similarities():
    model, _ = tiny_model("llama", 6)
    adjacent = [0.95, 0.2, 0.96, 0.3, 0.94]
    plan = plan_for(model, "crash", trainable=1, similarity=synthetic_similarity(adjacent), k="gap")
    assert plan.k == auto_k(adjacent, 1) == 3
    bare = plan_for(model, "crash", k=3, trainable=1, similarity=adjacent)
    assert (bare.kept, bare.trainable, bare.similarity) == (plan.kept, plan.trainable, None)
    with pytest.raises(UsageError, match="describes 5 layers but the model has 6"):
        plan_for(model, "crash", k=3, trainable=1, similarity=adjacent[:-1])
    with pytest.raises(UsageError, match="a number or one of auto, gap"):
        plan_for(model, "crash", k="half", similarity=adjacent)
    with pytest.raises(UsageError, match="strategy uniform reads none"):
        plan_for(model, "uniform", k="gap")
