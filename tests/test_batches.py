"""The training data order (crashlm.training.data.MicroBatches): plain and length-grouped."""

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from crashlm.core.scoring import IGNORE_INDEX, EncodedPair, batch_answer_loss, collate
from crashlm.training.config import LENGTH_GROUP_BATCHES
from crashlm.training.data import MicroBatches

from .tiny import TINY_LAYOUTS, TINY_VARIANTS, tiny_model


def _epoch(micro: MicroBatches, epoch: int = 0) -> list[list[int]]:
    steps = range(epoch * micro.steps_per_epoch + 1, (epoch + 1) * micro.steps_per_epoch + 1)
    return [batch for step in steps for batch in micro(step)]


def _padding(batches: list[list[int]], lengths: list[int]) -> int:
    return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 300), batch_size=st.integers(1, 9), seed=st.integers(0, 5), grouped=st.booleans())
def test_every_item_once_per_epoch(n, batch_size, seed, grouped):
    lengths = [random.Random(seed + i).randint(1, 90) for i in range(n)] if grouped else None
    micro = MicroBatches(list(range(n)), batch_size, 1, 1, 0, seed, lengths)
    for epoch in (0, 1):
        batches = _epoch(micro, epoch)
        assert sorted(i for b in batches for i in b) == list(range(n))
        assert all(0 < len(b) <= batch_size for b in batches)
    # The order is a function of the seed and step alone.
    again = MicroBatches(list(range(n)), batch_size, 1, 1, 0, seed, lengths)
    assert _epoch(again, 1) == _epoch(micro, 1)


def test_grouping_cuts_padding_and_keeps_batches_random():
    rng = random.Random(0)
    lengths = [rng.randint(10, 90) for _ in range(1000)]
    plain = _epoch(MicroBatches(list(range(1000)), 8, 1, 1, 0, 1))
    grouped = _epoch(MicroBatches(list(range(1000)), 8, 1, 1, 0, 1, lengths))
    assert _padding(grouped, lengths) < 0.2 * _padding(plain, lengths)
    # Batches are not sorted by length across the epoch: long and short ones interleave.
    widths = [max(lengths[i] for i in b) for b in grouped]
    assert widths != sorted(widths) and widths != sorted(widths, reverse=True)
    # Each batch comes from one window of the seeded permutation, so the seed changes it.
    other = _epoch(MicroBatches(list(range(1000)), 8, 1, 1, 0, 2, lengths))
    assert sorted(map(sorted, other)) != sorted(map(sorted, grouped))
    assert LENGTH_GROUP_BATCHES > 1


def test_two_processes_split_the_steps_of_one_with_doubled_accumulation():
    lengths = [random.Random(i).randint(1, 50) for i in range(101)]
    one = MicroBatches(list(range(101)), 4, 2, 1, 0, 3, lengths)
    two = [MicroBatches(list(range(101)), 4, 1, 2, p, 3, lengths) for p in (0, 1)]
    for step in range(1, one.steps_per_epoch * 2 + 1):
        assert sorted(map(sorted, one(step))) == sorted(sorted(b) for m in two for b in m(step))


@pytest.mark.parametrize("layout", TINY_LAYOUTS)
def test_answer_loss_scores_only_the_labelled_positions(layout):
    """The gathered unembedding gives the loss of full logits, with padding, on every layout
    (logit soft-capping, projected unembeddings)."""
    arch, overrides = TINY_VARIANTS.get(layout, (layout, {}))
    model, _ = tiny_model(arch, **overrides)
    torch.manual_seed(0)
    vocab = model.config.vocab_size
    pairs = []
    for context, answer in ((5, 3), (2, 6), (9, 1)):
        ids = torch.randint(3, vocab, (context + answer,)).tolist()
        pairs.append(EncodedPair(ids, [IGNORE_INDEX] * context + ids[context:]))
    batch = collate(pairs, pad_id=0)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        expected = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), batch["targets"].reshape(-1),
                                                     ignore_index=IGNORE_INDEX)
        assert torch.allclose(batch_answer_loss(model, batch), expected, atol=1e-5)
