"""Which examples a task training run sees, and when.

The validation examples are held out from the TRAIN split by a fixed permutation that does not
depend on the seed, so every seed and strategy is selected on the same examples and the
evaluation split is never touched. An epoch is a seeded permutation of the training examples
cut into micro-batches; optimizer step ``s`` of an epoch consumes micro-batches
``s*P*G .. (s+1)*P*G - 1`` (P processes, G accumulation steps; the last step wraps around to the
epoch's start), process ``p`` taking every P-th of them. So a 2-process run sees the same
examples per step as a 1-process run with twice the accumulation, and the data position is a
function of the step alone: a resumed run needs no data-loader state.
"""

from __future__ import annotations

import math
import random
from typing import Sequence

from crashlm.core.errors import UsageError
from crashlm.core.tasks import load_examples
from crashlm.training.config import TrainConfig

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
    """This process's micro-batches of every optimizer step, as a function of the step alone."""

    def __init__(self, items: Sequence, batch_size: int, grad_accum: int, num_processes: int, process_index: int,
                 seed: int):
        self.items, self.batch_size, self.seed = items, batch_size, seed
        self.num_processes, self.process_index = num_processes, process_index
        self.per_step = num_processes * grad_accum
        self.batches_per_epoch = math.ceil(len(items) / batch_size)
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / self.per_step)
        self._orders: dict[int, list[int]] = {}

    def epoch_order(self, epoch: int) -> list[int]:
        """The seeded permutation of the items in ``epoch`` (0-based); only the latest is kept."""
        if epoch not in self._orders:
            order = list(range(len(self.items)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._orders = {epoch: order}
        return self._orders[epoch]

    def __call__(self, step: int) -> list[list]:
        """The items of each of this process's micro-batches of optimizer step ``step`` (1-based)."""
        epoch, local = divmod(step - 1, self.steps_per_epoch)
        order, size = self.epoch_order(epoch), self.batch_size
        ids = [(local * self.per_step + j) % self.batches_per_epoch for j in range(self.per_step)]
        return [[self.items[i] for i in order[b * size : (b + 1) * size]]
                for b in ids[self.process_index :: self.num_processes]]
