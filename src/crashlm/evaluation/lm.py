"""The model side of evaluation: :class:`CrashlmLM`, an lm-eval ``LM`` over a model held in memory.

:class:`CrashlmLM` returns the same numbers as lm-eval's ``HFLM`` up to float rounding
(the same encoding, :func:`crashlm.core.scoring.encode_request`: special tokens as the tokenizer adds
them, the same context/continuation split and left truncation) with less compute per request:

* requests that share a context (the choices of one item) are packed into one row: the context
  once, then each choice, with a block attention mask and per-choice position ids so a choice
  sees only the context and itself; the context is computed once instead of once per choice;
* a continuation's last token is never fed to the model (nothing is predicted from it), so a
  one-token answer costs no input token at all;
* the unembedding and log-softmax run only at the positions that predict answer tokens instead
  of at every position (a 49k-token vocabulary makes them a fifth of a small model's compute);
* rows are sorted longest first and a batch ends before padding exceeds a tenth of its tokens
  (answer lengths are long-tailed: PIQA batches of equal row count would be a third padding);
* bf16 autocast by default where the hardware computes bf16 natively (CUDA with bf16, CPUs with
  AVX512-BF16 or AMX), with every weight held in bf16 for the call (cast once, not per
  forward). On other CPUs bf16 matmuls are emulated and several times slower than fp32, so
  fp32 stays the default there; ``dtype=torch.bfloat16`` forces the bf16 path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from lm_eval.api.model import LM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from torch import nn
from tqdm.auto import tqdm

from crashlm.core.errors import RunFailure, UsageError
from crashlm.core.models import held_in_bf16, native_bf16
from crashlm.core.scoring import (
    encode_request,
    encode_text,
    pad_token_id,
    prefix_token_id,
    truncate_request,
    unembed_only,
)
from crashlm.core.settings import check_int

# Architectures whose forward accepts a custom 4D attention mask with explicit position ids
# (checked against unpacked scoring on tiny models of each, tests/test_evaluation.py). ALiBi
# models (BLOOM, Falcon-rw) derive positions from a 2D mask: they, like any other, are scored
# one request per row, which gives the same numbers more slowly.
PACKABLE_ARCHITECTURES = frozenset({
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "opt", "gpt2", "gpt_neox",
    "phi", "falcon",
})
_PACKABLE_ATTENTION = ("sdpa", "eager")
PADDING_SLACK = 0.1  # a batch ends before its padding would exceed 10% of its real tokens

Encoded = tuple[list[int], list[int]]  # (context ids, continuation ids)


# ---------------------------------------------------------------------------------------------
# Compute dtype


def weights_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def compute_dtype(model: nn.Module, dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype evaluation computes in: ``dtype``, else bf16 for fp32 weights on native-bf16
    hardware, else the weights' own dtype. Lower precision than the weights runs as autocast."""
    weights = weights_dtype(model)
    if dtype is None:
        device = next(model.parameters()).device
        return torch.bfloat16 if weights == torch.float32 and native_bf16(device) else weights
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise UsageError(f"cannot evaluate in {dtype}; choose float32 or bfloat16")
    if dtype != weights and weights != torch.float32:
        raise UsageError(f"the model's weights are {str(weights)[6:]}: evaluating in {str(dtype)[6:]} needs float32 weights")
    return dtype


def model_max_length(config, tokenizer=None, default: int = 2048) -> int:
    """The tokens a model reads at most, looked up as lm-eval 0.4 does: the text config's (else
    the config's) ``n_positions``, ``max_position_embeddings``, ``n_ctx``, then the tokenizer's
    ``model_max_length``, else 2048."""
    config = getattr(config, "text_config", None) or config
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    value = getattr(tokenizer, "model_max_length", None)
    return int(value) if value is not None and value < 1e29 else default


# ---------------------------------------------------------------------------------------------
# The lm-eval model


@dataclass
class _Row:
    """One input row: a context followed by one or more continuations (request index, ids)."""

    context: list[int]
    branches: list[tuple[int, list[int]]] = field(default_factory=list)

    @property
    def width(self) -> int:
        # A continuation's last token is only a target, never an input.
        return len(self.context) + sum(len(ids) - 1 for _, ids in self.branches)


class CrashlmLM(LM):
    """lm-eval's ``LM`` interface over an in-memory causal model (any crashlm architecture,
    emulators with shared layers included). See the module docstring for how it scores."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        batch_size: int = 16,
        dtype: torch.dtype | None = None,
        pack: bool = True,
        progress: bool = True,
        max_length: int | None = None,
    ):
        """``batch_size``: requests (answer choices) per forward pass at most, as in lm-eval.
        ``max_length``: tokens the model reads per request at most (longer contexts lose their
        start); None: the model's own limit, found as lm-eval finds it."""
        super().__init__()
        check_int(batch_size, "batch size")
        check_int(max_length, "max length", optional=True)
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.dtype = compute_dtype(model, dtype)
        self.autocast = self.dtype != weights_dtype(model)
        self.pack = pack
        self.packed: bool | None = None  # whether the last loglikelihood call packed contexts
        self.truncated = 0  # requests of the last scoring call that lost tokens to max_length
        # What the last scoring call computed: real input tokens, input positions with padding,
        # positions unembedded (benchmarks derive FLOPs from these).
        self.counts = {"tokens": 0, "positions": 0, "unembedded": 0}
        self.progress = progress
        self._device = next(model.parameters()).device
        self.max_length = max_length or model_max_length(model.config, tokenizer)
        self.prefix_token_id = prefix_token_id(tokenizer)
        self.pad_token_id = pad_token_id(tokenizer)

    # -- encoding ---------------------------------------------------------------------------

    def encode(self, context: str, continuation: str) -> Encoded:
        """lm-eval's causal encoding; an empty context becomes the prefix (BOS/EOS) token."""
        return encode_request(self.tokenizer, context, continuation)

    def can_pack(self, encoded: Sequence[Encoded]) -> bool:
        """Packing needs a 4D-mask-aware architecture, and no sliding window that a request outgrows."""
        config = self.model.config
        if not self.pack or config.model_type not in PACKABLE_ARCHITECTURES or getattr(config, "alibi", False):
            return False
        if getattr(config, "_attn_implementation", "eager") not in _PACKABLE_ATTENTION:
            return False
        window = getattr(config, "sliding_window", None)
        return window is None or all(len(c) + len(x) - 1 <= window for c, x in encoded)

    # -- scoring ----------------------------------------------------------------------------

    def score(
        self, encoded: Sequence[Encoded], pack: bool | None = None, desc: str = "loglikelihood", progress: bool = True
    ) -> list[tuple[float, bool]]:
        """(summed log-likelihood, greedy?) of each (context ids, continuation ids), in order.

        ``pack`` None packs requests that share a context whenever :meth:`can_pack` allows."""
        truncated = [truncate_request(list(c), list(x), self.max_length) for c, x in encoded]
        self.truncated = sum(len(t[0]) + len(t[1]) < len(c) + len(x) for t, (c, x) in zip(truncated, encoded))
        encoded = truncated
        self.counts = dict.fromkeys(self.counts, 0)
        if any(not c or not x for c, x in encoded):
            raise RunFailure("every request needs a non-empty context and continuation")
        pack = self.can_pack(encoded) if pack is None else pack
        rows: dict[Any, _Row] = {}
        for index, (context, continuation) in enumerate(encoded):
            key = tuple(context) if pack else index
            rows.setdefault(key, _Row(context)).branches.append((index, continuation))
        # Longest first: little padding, and memory peaks at the first batch.
        batches = list(self._batches(sorted(rows.values(), key=lambda r: (-r.width, r.context))))
        results: list[tuple[float, bool]] = [(math.nan, False)] * len(encoded)
        autocast = torch.autocast(self._device.type, dtype=self.dtype, enabled=self.autocast)
        bar = tqdm(total=len(encoded), desc=desc, disable=not (progress and self.progress), unit="req", leave=False)
        training = self.model.training
        self.model.eval()
        # Under bf16 autocast every weight is held in bf16 for the call: cast once, not at every
        # forward, and the residual stream stays in bf16 between the matmuls.
        held = held_in_bf16(self.model, self.autocast and self.dtype == torch.bfloat16, frozen_only=False)
        try:
            with held, torch.inference_mode(), autocast, bar:
                for batch in batches:
                    for index, value in self._score_rows(batch, pack):
                        results[index] = value
                    bar.update(sum(len(r.branches) for r in batch))
        finally:
            self.model.train(training)  # a model evaluated during training goes back to training
        return results

    def _batches(self, rows: list[_Row]) -> Iterator[list[_Row]]:
        """Consecutive rows (sorted longest first) holding at most ``batch_size`` requests; a batch
        also ends where padding would exceed ``PADDING_SLACK`` of its tokens (task lengths are
        long-tailed: a fixed row count would pad short rows up to the longest one)."""
        batch: list[_Row] = []
        tokens = requests = 0
        for row in rows:
            fits = (
                requests + len(row.branches) <= self.batch_size
                and (len(batch) + 1) * batch[0].width <= (tokens + row.width) * (1 + PADDING_SLACK)
            ) if batch else True
            if not fits:
                yield batch
                batch, tokens, requests = [], 0, 0
            batch.append(row)
            tokens += row.width
            requests += len(row.branches)
        if batch:
            yield batch

    def _score_rows(self, rows: list[_Row], packed: bool) -> Iterator[tuple[int, tuple[float, bool]]]:
        width = max(r.width for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        segments = torch.full((len(rows), width), -1, dtype=torch.long)  # -1 pad, 0 context, j branch j
        where_row, where_pos, targets, owners = [], [], [], []
        for b, row in enumerate(rows):
            n = len(row.context)
            ids, pos, seg = list(row.context), list(range(n)), [0] * n
            for j, (index, continuation) in enumerate(row.branches, start=1):
                start = len(ids)
                ids += continuation[:-1]
                pos += range(n, n + len(continuation) - 1)
                seg += [j] * (len(continuation) - 1)
                # The first answer token is predicted from the context's last position.
                where_pos += [n - 1, *range(start, start + len(continuation) - 1)]
                where_row += [b] * len(continuation)
                targets += continuation
                owners += [index] * len(continuation)
            input_ids[b, : len(ids)] = torch.tensor(ids)
            positions[b, : len(pos)] = torch.tensor(pos)
            segments[b, : len(seg)] = torch.tensor(seg)
        inputs = {"input_ids": input_ids.to(self._device)}
        if packed:
            inputs["attention_mask"] = self._block_mask(segments).to(self._device)
            inputs["position_ids"] = positions.to(self._device)
        else:
            inputs["attention_mask"] = (segments >= 0).long().to(self._device)
        self.counts["tokens"] += int((segments >= 0).sum())
        self.counts["positions"] += segments.numel()
        self.counts["unembedded"] += len(targets)
        rows_t = torch.tensor(where_row, device=self._device)
        pos_t = torch.tensor(where_pos, device=self._device)
        with unembed_only(self.model, rows_t, pos_t):
            logits = self.model(**inputs, use_cache=False).logits[0]  # [positions, vocab]
        targets_t = torch.tensor(targets, device=self._device)
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets_t[:, None]).squeeze(-1)
        missed = (logits.argmax(-1) != targets_t).float()
        local = {index: k for k, index in enumerate(dict.fromkeys(owners))}
        owner_t = torch.tensor([local[i] for i in owners], device=self._device)
        sums = torch.zeros(len(local), device=self._device, dtype=torch.float64).index_add_(0, owner_t, logp.double())
        misses = torch.zeros(len(local), device=self._device).index_add_(0, owner_t, missed)
        for index, k in local.items():
            yield index, (float(sums[k]), bool(misses[k] == 0))

    def _block_mask(self, segments: torch.Tensor) -> torch.Tensor:
        """[B, 1, T, T] mask: causal, padding excluded, a continuation never sees another one."""
        width = segments.size(1)
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        seg_q, seg_k = segments[:, :, None], segments[:, None, :]
        allowed = causal & (seg_k >= 0) & ((seg_k == 0) | (seg_k == seg_q))
        if getattr(self.model.config, "_attn_implementation", "eager") == "sdpa":
            return allowed[:, None]
        mask = torch.zeros(allowed.shape, dtype=weights_dtype(self.model))
        return mask.masked_fill_(~allowed, torch.finfo(mask.dtype).min)[:, None]

    # -- lm-eval interface ------------------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        encoded = [self.encode(*req.args) for req in requests]
        self.packed = self.can_pack(encoded)
        return self.score(encoded, pack=self.packed, progress=not disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-text log-likelihood, in lm-eval's disjoint rolling windows of ``max_length``."""
        windows, owners = [], []
        for index, req in enumerate(requests):
            tokens = encode_text(self.tokenizer, req.args[0])
            for window in get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length, context_len=1):
                windows.append(make_disjoint_window(window))
                owners.append(index)
        totals = [0.0] * len(requests)
        scores = self.score(windows, pack=False, desc="rolling loglikelihood", progress=not disable_tqdm)
        for index, (value, _) in zip(owners, scores):
            totals[index] += value
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        raise NotImplementedError(
            "crashlm evaluates multiple-choice (loglikelihood) tasks only; generation tasks are not supported"
        )
