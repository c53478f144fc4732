"""How text becomes tokens: one encoding for evaluation, training, validation and analysis.

It is lm-evaluation-harness's own (``HFLM``, 0.4) for a causal model, so crashlm's numbers are
lm-eval's on every tokenizer:

* a string is encoded with the tokenizer's default special tokens (a BOS where the tokenizer
  adds one: Gemma, Llama 2/3, OPT; nothing for SmolLM2 or GPT-2), unless it already starts with
  the prefix token's text;
* a (context, continuation) pair moves the context's trailing spaces to the continuation,
  encodes ``context + continuation`` whole and splits it at the length of the encoded context;
  an empty context becomes the prefix token (BOS, else EOS);
* a pair longer than the model may read keeps its last ``max_length + 1`` tokens (left
  truncation, so the answer is always kept); the last token is only a target, never an input.

Training, validation loss, the loss landscape and evaluation all score a pair through
:func:`encode_pair` with the same ``max_length``, so what an adapter is trained and selected on
is exactly what evaluation scores (the original CRaSh code tokenised the two parts separately,
dropped the leading space and never added a BOS). Analyses read plain texts through
:func:`encode_text`, and every batch is right-padded by :func:`pad_batch`, so the tokenizer's
padding side never changes a position id.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


def prefix_token_id(tokenizer) -> int:
    """The token an empty context stands for, as lm-eval picks it: BOS, else EOS."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def pad_token_id(tokenizer) -> int:
    """The id padded positions carry (never attended to, never scored): PAD, else the prefix token."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else prefix_token_id(tokenizer)


def _tok_encode(tokenizer, text: str) -> list[int]:
    """lm-eval's ``tok_encode``: default special tokens, none if the text starts with the prefix's text."""
    prefix = prefix_token_id(tokenizer)
    starts_with_prefix = prefix is not None and text.startswith(tokenizer.decode(prefix))
    return tokenizer.encode(text, **({"add_special_tokens": False} if starts_with_prefix else {}))


def encode_text(tokenizer, text: str, max_length: int | None = None) -> list[int]:
    """A plain text as the model reads it (analysis inputs): its first ``max_length`` tokens."""
    ids = _tok_encode(tokenizer, text)
    return ids[:max_length] if max_length is not None else ids


def encode_request(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) of a loglikelihood request, exactly as lm-eval's HFLM."""
    if not context:
        ids = tokenizer.encode(continuation, add_special_tokens=False)
        prefix = prefix_token_id(tokenizer)
        return (ids[:1], ids[1:]) if ids[:1] == [prefix] else ([prefix], ids)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = _tok_encode(tokenizer, context + continuation)
    n_context = len(_tok_encode(tokenizer, context))
    return whole[:n_context], whole[n_context:]


@dataclass(frozen=True)
class EncodedPair:
    """Token ids of one (context, continuation) pair; labels mask the context with -100.

    ``truncated``: the pair lost context tokens to ``max_length`` (left truncation)."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    @property
    def num_answer_tokens(self) -> int:
        """Answer tokens that carry a loss (the first position is never predicted)."""
        return sum(1 for x in self.labels[1:] if x != IGNORE_INDEX)


def truncate_request(context_ids: list[int], answer_ids: list[int], max_length: int | None) -> tuple[list[int], list[int]]:
    """Keep the last ``max_length + 1`` tokens (the model reads ``max_length``), as lm-eval does; an
    answer longer than ``max_length`` keeps its last ``max_length`` tokens (lm-eval would refuse it)."""
    whole = context_ids + answer_ids
    if max_length is None or len(whole) <= max_length + 1:
        return context_ids, answer_ids
    kept = whole[-(max_length + 1):]
    answer = min(len(answer_ids), max_length)
    return kept[:-answer], kept[-answer:]


def encode_pair(tokenizer, context: str, continuation: str, max_length: int | None = None) -> EncodedPair:
    """lm-eval's causal encoding of a pair; the model reads at most ``max_length`` of its tokens."""
    context_ids, answer_ids = encode_request(tokenizer, context, continuation)
    if not answer_ids:
        raise ValueError(f"the continuation {continuation!r} encodes to no token")
    kept_context, kept_answer = truncate_request(context_ids, answer_ids, max_length)
    truncated = len(kept_context) + len(kept_answer) < len(context_ids) + len(answer_ids)
    return EncodedPair(kept_context + kept_answer, [IGNORE_INDEX] * len(kept_context) + kept_answer, truncated)


def encode_example(tokenizer, example, max_length: int | None = None) -> EncodedPair:
    """The training/validation encoding of a task example: its context and gold answer."""
    return encode_pair(tokenizer, example.context, example.target, max_length)


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad token id lists: ``input_ids`` and ``attention_mask`` [B, T].

    Always on the right, whatever the tokenizer's ``padding_side``: every real token then sits at
    its own position (0, 1, ...) on every architecture, with or without position ids."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(list(ids), dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def text_batches(
    tokenizer, texts: Sequence[str], batch_size: int, max_length: int | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """Plain texts as right-padded batches (an empty encoding becomes one pad token)."""
    pad_id = pad_token_id(tokenizer)
    for chunk in batches(texts, batch_size):
        yield pad_batch([encode_text(tokenizer, text, max_length) or [pad_id] for text in chunk], pad_id)


def next_token_targets(input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The token each position predicts; IGNORE_INDEX where no real token follows (end of text, padding)."""
    targets = torch.full_like(input_ids, IGNORE_INDEX)
    targets[:, :-1] = torch.where(mask[:, 1:].bool(), input_ids[:, 1:], IGNORE_INDEX)
    return targets


def collate(pairs: Sequence[EncodedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """A right-padded batch: ``input_ids``/``attention_mask`` [B, T-1] and aligned ``targets``.

    ``targets[b, t]`` is the token position t predicts (-100: context or padding); a pair's last
    token is only a target, as in lm-eval, so the model reads at most ``max_length`` tokens."""
    batch = pad_batch([p.input_ids for p in pairs], pad_id)
    labels = torch.full(batch["input_ids"].shape, IGNORE_INDEX, dtype=torch.long)
    for row, pair in enumerate(pairs):
        labels[row, : len(pair.labels)] = torch.tensor(pair.labels)
    return {"input_ids": batch["input_ids"][:, :-1], "attention_mask": batch["attention_mask"][:, :-1],
            "targets": labels[:, 1:]}


@contextlib.contextmanager
def unembed_only(model: nn.Module, rows: torch.Tensor, positions: torch.Tensor) -> Iterator[None]:
    """Feed the unembedding only the hidden states at (rows, positions), as one [1, N, d] batch.

    Works on every architecture: the model's own unembedding (and any logit soft-capping after
    it) runs unchanged, on N positions instead of all B * T. A 49k-token vocabulary makes the
    unembedding and its softmax a large share of a small model's compute, and only the positions
    that predict a scored token need them; gathering them also keeps the unembedding one flat
    matmul (a strided slice of the hidden states would run it as a slower batched one).
    """

    def pick(_module, args):
        return (args[0][rows, positions][None], *args[1:])

    inner = getattr(model, "module", model)  # DDP / DeepSpeed wrap the model
    handle = inner.get_output_embeddings().register_forward_pre_hook(pick)
    try:
        yield
    finally:
        handle.remove()


def target_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logits [N, V], targets [N], rows [N])`` at the N positions of a :func:`collate` batch whose
    target is set; ``rows`` says which row each comes from."""
    targets = batch["targets"]
    rows, positions = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
    with unembed_only(model, rows, positions):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return logits[0], targets[rows, positions], rows


def batch_answer_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over a :func:`collate` batch's target tokens, unembedding only those positions."""
    logits, targets, _ = target_logits(model, batch)
    return F.cross_entropy(logits.float(), targets)


def batches(items: Sequence, batch_size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), batch_size):
        yield items[start : start + batch_size]


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _pair_logprobs(
    model, tokenizer, pairs: Sequence[EncodedPair], batch_size: int, autocast_dtype
) -> Iterator[tuple[Sequence[int], torch.Tensor, torch.Tensor]]:
    """(pair indices, summed answer log-likelihood, answer tokens) per batch, longest pairs first."""
    # Longest first, so padding is small and memory peaks early (as lm-eval orders them).
    order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i].input_ids))
    device = _device_of(model)
    for chunk in batches(order, batch_size):
        batch = {k: v.to(device) for k, v in collate([pairs[i] for i in chunk], pad_token_id(tokenizer)).items()}
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits, targets, rows = target_logits(model, batch)
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)
        sums = torch.zeros(len(chunk), dtype=torch.float64, device=device).index_add_(0, rows, logp.double())
        yield chunk, sums, (batch["targets"] != IGNORE_INDEX).sum(-1)


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
    total, count = 0.0, 0
    for _, sums, tokens in _pair_logprobs(model, tokenizer, pairs, batch_size, autocast_dtype):
        total -= float(sums.sum())
        count += int(tokens.sum())
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
    """Summed log-likelihood of each (context, continuation) request, in request order: the plain,
    one-request-per-row reference for the packed scorer of :mod:`crashlm.evaluation.lm`."""
    pairs = [encode_pair(tokenizer, c, x, max_length) for c, x in requests]
    scores = [0.0] * len(pairs)
    for chunk, sums, _ in _pair_logprobs(model, tokenizer, pairs, batch_size, autocast_dtype):
        for i, value in zip(chunk, sums.tolist()):
            scores[i] = value
    return scores
