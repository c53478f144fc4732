"""Calibration text: the offline plain English that emulators are chosen, distilled and judged on.

No hub is reachable here, and the offline benchmark data hold no generic corpus (no Pile,
C4 or WikiText), so crashlm's calibration text is the **Wikipedia paragraphs of BoolQ's
training split** (Clark et al. 2019, CC-BY-SA 3.0): encyclopedic English, about 120 tokens
each, 7,927 distinct ones. Only the paragraphs are used, never BoolQ's questions or answers,
and BoolQ is none of the transfer tasks (PIQA, ARC, OpenBookQA): the model owner shapes the
emulator without any downstream task's data. Use of BoolQ itself as a downstream task would
see its training paragraphs here; the offsite pipeline refuses that pairing.

The distinct paragraphs, in file order, are cut into three disjoint slices so no score is
measured on the text it was fitted to:

* ``search``: the first :data:`SEARCH_TEXTS`, read by the strategies that run the model to
  choose layers (greedy, block influence, angular distance, contiguous block, the loss representative);
* ``distill``: the paragraphs in between, the distillation's training text;
* ``heldout``: the last :data:`HELDOUT_TEXTS`, on which emulator fidelity is measured and the
  distillation's step count is chosen.
"""

from __future__ import annotations

import functools

from crashlm.core.errors import UsageError
from crashlm.core.tasks import load_examples

CALIBRATION_TASK = "boolq"
SEARCH_TEXTS = 512
HELDOUT_TEXTS = 512
SLICES = ("search", "distill", "heldout")
_QUESTION = "\nQuestion:"


@functools.lru_cache(maxsize=1)
def _paragraphs() -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for example in load_examples(CALIBRATION_TASK, "train"):
        seen.setdefault(example.context.split(_QUESTION)[0].strip(), None)
    return tuple(text for text in seen if text)


def calibration_texts(part: str, limit: int | None = None) -> list[str]:
    """The first ``limit`` paragraphs (all without a limit) of calibration slice ``part``."""
    if part not in SLICES:
        raise UsageError(f"unknown calibration slice {part!r}; choose {', '.join(SLICES)}")
    paragraphs = _paragraphs()
    bounds = {"search": (0, SEARCH_TEXTS), "distill": (SEARCH_TEXTS, len(paragraphs) - HELDOUT_TEXTS),
              "heldout": (len(paragraphs) - HELDOUT_TEXTS, len(paragraphs))}
    start, stop = bounds[part]
    texts = list(paragraphs[start:stop])
    if limit is not None:
        if limit > len(texts):
            raise UsageError(f"the {part} calibration slice has {len(texts)} paragraphs; asked for {limit}")
        texts = texts[:limit]
    return texts
