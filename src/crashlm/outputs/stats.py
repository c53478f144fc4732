"""How much the offsite table's gain recovered would move on other evaluation items.

A table's seeds share its evaluation items, so the std over seeds leaves out the items' own
sampling noise: on SmolLM2, two emulators whose gain recovered on ARC-Easy's first 100 test items
was 61 % and 15 % recovered 54 % and 55 % on 300 validation items (`benchmarks/results/offsite_smollm2.md`).
:func:`item_interval` resamples each task's items with replacement (the same items for Full ZS,
Full FT and the plug-in, each averaged over its seeds first) and gives the percentile interval
of the ratio of the mean gains.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

ITEM_LEVEL = 0.9  # the interval's coverage
ITEM_RESAMPLES = 2000


def item_interval(
    zero_shot: Mapping[str, Sequence[float]],
    full_ft: Mapping[str, Sequence[Sequence[float]]],
    plugin: Mapping[str, Sequence[Sequence[float]]],
    level: float = ITEM_LEVEL,
    resamples: int = ITEM_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float] | None:
    """The ``level`` percentile interval of (plug-in gain) / (Full FT gain) over item resamples.

    ``zero_shot[task]`` is Full ZS's correctness per item; ``full_ft[task]`` and ``plugin[task]``
    one such list per seed, the items in the same order. A gain is the mean over tasks of the
    mean over items of (seed-averaged correctness - Full ZS's). Resamples where Full FT gains
    nothing have no ratio; when they are more than the interval's tail, the ratio is unbounded
    and the answer is None.
    """
    rng = np.random.default_rng(seed)
    gain, full = np.zeros(resamples), np.zeros(resamples)
    for task, zs in zero_shot.items():
        base = np.asarray(zs, dtype=float)
        picks = rng.integers(0, len(base), size=(resamples, len(base)))
        gain += (np.asarray(plugin[task], dtype=float).mean(axis=0) - base)[picks].mean(axis=1)
        full += (np.asarray(full_ft[task], dtype=float).mean(axis=0) - base)[picks].mean(axis=1)
    tail = (1 - level) / 2
    defined = full > 0
    if 1 - defined.mean() > tail:
        return None
    low, high = np.quantile(gain[defined] / full[defined], [tail, 1 - tail])
    return float(low), float(high)
