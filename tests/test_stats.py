"""The gain recovered's interval over evaluation items (crashlm.outputs.stats)."""

import random

import pytest

from crashlm.outputs.stats import item_interval


def _items(n: int, p: float, rng: random.Random) -> list[float]:
    return [float(rng.random() < p) for _ in range(n)]


def test_a_plug_in_equal_to_full_ft_or_to_zero_shot_has_a_point_interval():
    rng = random.Random(0)
    zs = {"a": _items(50, 0.4, rng), "b": _items(30, 0.5, rng)}
    ft = {task: [[1.0] * len(items), [1.0] * len(items)] for task, items in zs.items()}
    assert item_interval(zs, ft, ft) == pytest.approx((1.0, 1.0))
    assert item_interval(zs, ft, {task: [items] for task, items in zs.items()}) == pytest.approx((0.0, 0.0))


def test_no_full_ft_gain_has_no_interval():
    zs = {"a": [1.0, 0.0] * 20}
    assert item_interval(zs, {"a": [zs["a"]]}, {"a": [[1.0] * 40]}) is None


@pytest.mark.parametrize("seed", range(5))
def test_the_interval_holds_the_ratio_of_mean_gains_and_narrows_with_more_items(seed):
    rng = random.Random(seed)

    def case(n):
        zs = {"t": _items(n, 0.4, rng)}
        ft = {"t": [_items(n, 0.7, rng) for _ in range(3)]}
        plug = {"t": [_items(n, 0.55, rng) for _ in range(3)]}
        mean = lambda rows: sum(map(sum, rows)) / (len(rows) * n)  # noqa: E731
        point = (mean(plug["t"]) - mean([zs["t"]])) / (mean(ft["t"]) - mean([zs["t"]]))
        return point, item_interval(zs, ft, plug)

    point, (low, high) = case(100)
    assert low <= point <= high
    _, (wide_low, wide_high) = case(60)
    _, (narrow_low, narrow_high) = case(2000)
    assert narrow_high - narrow_low < wide_high - wide_low


def test_the_same_seed_gives_the_same_interval():
    zs, ft, plug = {"t": [1.0, 0.0] * 50}, {"t": [[1.0] * 100]}, {"t": [[1.0, 1.0] + [1.0, 0.0] * 49]}
    assert item_interval(zs, ft, plug, seed=3) == item_interval(zs, ft, plug, seed=3)
