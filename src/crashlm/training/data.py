"""Which examples a task training run sees, and when.

The validation examples are held out from the TRAIN split by a fixed permutation that does not
depend on the seed, so every seed and strategy is selected on the same examples and the
evaluation split is never touched. An epoch is a seeded permutation of the training examples
cut into micro-batches; optimizer step ``s`` of an epoch consumes micro-batches
``s*P*G .. (s+1)*P*G - 1`` (P processes, G accumulation steps; the last step wraps around to the
epoch's start), process ``p`` taking every P-th of them. So a 2-process run sees the same
examples per step as a 1-process run with twice the accumulation, and the data position is a
function of the step alone: a resumed run needs no data-loader state.

With length grouping (the default), each window of ``LENGTH_GROUP_BATCHES`` micro-batches of
the permutation is sorted by length before it is cut, and the epoch's micro-batches are then
shuffled (seeded): each micro-batch holds examples of similar length, so little of it is
padding (task examples vary in length: random batches of 8 PIQA, ARC or OpenBookQA examples
are 40-50 % padding, grouped ones 7-8 %), while every example is still seen once per epoch in a
seeded order.
"""

from __future__ import annotations

import math
import random
from typing import Sequence

from crashlm.core.errors import UsageError
from crashlm.core.tasks import load_examples
from crashlm.training.config import LENGTH_GROUP_BATCHES, TrainConfig

# The held-out validation docs are the same for every seed: a fixed permutation of the train split.
VAL_SPLIT_SEED = 0


def split_examples(config: TrainConfig) -> tuple[list, list]:
    """``(train, validation)`` examples from the task's train split (see the module docstring)."""
    examples = load_examples(config.task, "train", source=config.data_source)
    if len(examples) <= config.val_samples:
        raise UsageError(
            f"{config.task} has {len(examples)} training docs: too few to hold out {config.val_samples} for validation"
        )
    order = list(range(len(examples)))
    random.Random(VAL_SPLIT_SEED).shuffle(order)
    val = [examples[i] for i in order[: config.val_samples]]
    train = [examples[i] for i in order[config.val_samples :]][: config.train_samples]
    return train, val


class MicroBatches:
    """This process's micro-batches of every optimizer step, as a function of the step alone.

    ``lengths`` (one per item) turns on length grouping (module docstring)."""

    def __init__(self, items: Sequence, batch_size: int, grad_accum: int, num_processes: int, process_index: int,
                 seed: int, lengths: Sequence[int] | None = None):
        if lengths is not None and len(lengths) != len(items):
            raise ValueError(f"{len(lengths)} lengths for {len(items)} items")
        self.items, self.batch_size, self.seed, self.lengths = items, batch_size, seed, lengths
        self.num_processes, self.process_index = num_processes, process_index
        self.per_step = num_processes * grad_accum
        self.batches_per_epoch = math.ceil(len(items) / batch_size)
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / self.per_step)
        self._batches: dict[int, list[list[int]]] = {}

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The item indices of each micro-batch of ``epoch`` (0-based), in order; only the latest is kept."""
        if epoch not in self._batches:
            rng = random.Random(self.seed * 1_000_003 + epoch)
            order = list(range(len(self.items)))
            rng.shuffle(order)
            size = self.batch_size
            if self.lengths is not None:
                window = size * LENGTH_GROUP_BATCHES
                order = [i for start in range(0, len(order), window)
                         for i in sorted(order[start : start + window], key=lambda i: -self.lengths[i])]
            cut = [order[b * size : (b + 1) * size] for b in range(self.batches_per_epoch)]
            if self.lengths is not None:
                rng.shuffle(cut)
            self._batches = {epoch: cut}
        return self._batches[epoch]

    def __call__(self, step: int) -> list[list]:
        """The items of each of this process's micro-batches of optimizer step ``step`` (1-based)."""
        epoch, local = divmod(step - 1, self.steps_per_epoch)
        cut = self.epoch_batches(epoch)
        ids = [(local * self.per_step + j) % self.batches_per_epoch for j in range(self.per_step)]
        return [[self.items[i] for i in cut[b]] for b in ids[self.process_index :: self.num_processes]]
