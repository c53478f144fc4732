"""Layer plans: clustering equals the original greedy merge; plans are valid for every K."""

from __future__ import annotations

import random

import pytest

from crashlm.core.errors import UsageError
from crashlm.emulators.plans import (
    LayerPlan,
    auto_k,
    contiguous_clusters,
    crash_plan,
    spread_positions,
    uniform_plan,
)


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
    slots = plan.slots(sharing=True)
    assert [s.source for s in slots] == [0, 0, 3, 3, 5, 5, 7, 7]  # position 4: 3 vs 5 -> 5; 6: 5 vs 7 -> 7
    assert [s.module for s in slots][:2] == ["adapter.0", "copy.0"]
    assert slots[6].module == "copy.7" and slots[7].module == "adapter.7"
    tied = plan.slots(sharing=True, share_trainable=True)
    assert tied[6].module == "adapter.7"
    plain = plan.slots(sharing=False)
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
        dict(kept=list(range(8)), trainable=[0]),  # drops nothing
        dict(kept=[0, 4], trainable=[0], clusters=[[0, 1, 2], [2, 3, 4, 5, 6, 7]]),  # overlapping
        dict(kept=[0, 4], trainable=[0], clusters=[[0, 1, 2], [4, 5, 6, 7]]),  # gap
    ],
)
def test_invalid_plans_are_refused(bad):
    with pytest.raises(UsageError):
        LayerPlan(num_layers=8, strategy="custom", **bad)


def test_k_out_of_range():
    with pytest.raises(UsageError):
        uniform_plan(12, 12)
    with pytest.raises(UsageError):
        crash_plan([0.5] * 11, 3)  # fewer kept than trainable
