"""How a task example becomes tokens, a loss and choice log-likelihoods.

One encoding serves training (loss on the answer tokens only), validation loss, the loss
landscape and our own multiple-choice scorer, and it is the encoding lm-evaluation-harness
uses for causal models: encode ``context + continuation`` whole, then split at the length of
the encoded context. So what a model is trained on is exactly what it is evaluated on (the
original CRaSh code tokenised the two parts separately and dropped the leading space).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


@dataclass(frozen=True)
class EncodedPair:
    """Token ids of one (context, continuation) pair; labels mask the context with -100."""

    input_ids: list[int]
    labels: list[int]

    @property
    def num_answer_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def encode_pair(tokenizer, context: str, continuation: str, max_length: int | None = None) -> EncodedPair:
    """lm-eval's causal encoding; truncates from the left so the answer is always kept."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    n_context = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    labels = [IGNORE_INDEX] * n_context + whole[n_context:]
    if max_length is not None and len(whole) > max_length:
        whole, labels = whole[-max_length:], labels[-max_length:]
    return EncodedPair(whole, labels)


def encode_example(tokenizer, example, max_length: int | None = None) -> EncodedPair:
    """The training/validation encoding of a task example: its context and gold answer."""
    return encode_pair(tokenizer, example.context, example.target, max_length)


def collate(pairs: Sequence[EncodedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padded positions are masked out of attention and labels."""
    width = max(len(p.input_ids) for p in pairs)
    input_ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for row, pair in enumerate(pairs):
        n = len(pair.input_ids)
        input_ids[row, :n] = torch.tensor(pair.input_ids)
        labels[row, :n] = torch.tensor(pair.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability of each next-token label (0 where the label is ignored), shape [B, T-1]."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    logp = torch.log_softmax(shift_logits, dim=-1)
    picked = logp.gather(-1, shift_labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return picked * mask


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens of a batch (context tokens excluded)."""
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.size(-1)),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
    )


def batches(items: Sequence, batch_size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), batch_size):
        yield items[start : start + batch_size]


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def mean_answer_loss(
    model: nn.Module,
    tokenizer,
    examples: Iterable,
    batch_size: int = 8,
    max_length: int | None = 512,
    autocast_dtype: torch.dtype | None = None,
) -> float:
    """Mean answer-token cross-entropy over examples, weighted by token (validation loss)."""
    pairs = [encode_example(tokenizer, ex, max_length) for ex in examples]
    device = _device_of(model)
    total, count = 0.0, 0
    for chunk in batches(pairs, batch_size):
        batch = {k: v.to(device) for k, v in collate(chunk, tokenizer.pad_token_id).items()}
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        logp = token_logprobs(logits, batch["labels"])
        total -= logp.sum().item()
        count += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    return total / count if count else math.nan


@torch.no_grad()
def choice_loglikelihoods(
    model: nn.Module,
    tokenizer,
    requests: Sequence[tuple[str, str]],
    batch_size: int = 8,
    max_length: int | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> list[float]:
    """Summed log-likelihood of each (context, continuation) request, in request order."""
    pairs = [encode_pair(tokenizer, c, x, max_length) for c, x in requests]
    # Longest first, so padding is small and memory peaks early (as lm-eval orders them).
    order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i].input_ids))
    device = _device_of(model)
    scores = [0.0] * len(pairs)
    for chunk in batches(order, batch_size):
        batch = {k: v.to(device) for k, v in collate([pairs[i] for i in chunk], tokenizer.pad_token_id).items()}
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        sums = token_logprobs(logits, batch["labels"]).sum(-1)
        for i, value in zip(chunk, sums.tolist()):
            scores[i] = value
    return scores


def multiple_choice_accuracy(model: nn.Module, tokenizer, examples: Sequence, **kwargs) -> float:
    """Accuracy (lm-eval's ``acc``: argmax of summed log-likelihood) of our own scorer."""
    requests = [(ex.context, " " + choice) for ex in examples for choice in ex.choices]
    scores = iter(choice_loglikelihoods(model, tokenizer, requests, **kwargs))
    correct = 0
    for ex in examples:
        choice_scores = [next(scores) for _ in ex.choices]
        correct += int(max(range(len(choice_scores)), key=choice_scores.__getitem__) == ex.gold)
    return correct / len(examples)
