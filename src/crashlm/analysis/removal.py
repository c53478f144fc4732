"""What removing layers costs, measured on calibration text: the inputs of the training-free
removal strategies and of emulator fidelity.

:class:`LayerStack` runs the full model once per batch and records, for every decoder layer, the
call it received (the residual stream entering layer 0, and each layer's other arguments:
position embeddings, attention mask). Any sequence of the model's own layers can then be
replayed from those records, starting at any position, without copying or rebuilding the model.
A sequence is exactly what an untrained emulator computes (``[slot.source for slot in
spec.slots]``), so one recording scores every candidate removal, every strategy and every K.
Replaying a sequence from position i reuses the states entering it, which halves the cost of a
greedy search (only the layers after a candidate run again).

Scores (each strategy cites its source in :mod:`crashlm.emulators.strategies`):

* :meth:`LayerStack.block_influence`: ShortGPT's ``1 - cos(input, output)`` of each layer, mean
  over real tokens (Men et al. 2024);
* :meth:`LayerStack.angular_distance`: ``arccos(cos(x_l, x_{l+n})) / pi`` between the residual
  stream entering layer l and entering layer l + n, at each text's last token (Gromov et al. 2025);
* :meth:`LayerStack.loss`: the next-token loss of a layer sequence (SLEB's criterion, Song et al.
  2024), :meth:`LayerStack.removal_losses`: of the sequence with each candidate removed, and
  :meth:`LayerStack.block_removal_losses`: of the full model with each contiguous block removed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from crashlm.core.errors import UsageError
from crashlm.core.models import get_layers, hidden_to_logits
from crashlm.core.scoring import IGNORE_INDEX, next_token_targets, text_batches
from crashlm.training.runtime import use_bf16


@dataclass
class _Call:
    """One layer's recorded call, without the residual stream it read."""

    args: tuple  # positional arguments after the hidden state
    kwargs: dict[str, Any]


@dataclass
class _Batch:
    input_ids: torch.Tensor
    mask: torch.Tensor  # bool [B, T], real tokens
    targets: torch.Tensor  # next-token targets [B, T], IGNORE_INDEX where none
    embedded: torch.Tensor  # the residual stream entering layer 0
    calls: list[_Call]  # per layer of the full model


def _output(result: Any) -> torch.Tensor:
    return result[0] if isinstance(result, (tuple, list)) else result


class LayerStack:
    """The full ``model``'s layers on recorded batches of ``texts`` (first ``max_length`` tokens each).

    bf16 autocast where the device computes it natively and ``bf16`` is asked, as in training.
    """

    def __init__(self, model: nn.Module, tokenizer, texts: Sequence[str], batch_size: int = 8,
                 max_length: int = 128, bf16: bool = True, progress: bool = True):
        if not texts:
            raise UsageError("layer scores need at least one calibration text")
        self.model = model
        self.layers = list(get_layers(model))
        if len({id(layer) for layer in self.layers}) != len(self.layers):
            raise UsageError("layer scores read a full model; this one reuses layers (an emulator with sharing)")
        self.device = next(model.parameters()).device
        self.bf16 = use_bf16(bf16, self.device)
        self.progress = progress
        self.num_texts = len(texts)
        model.eval()
        self.batches = [self._record(batch) for batch in text_batches(tokenizer, texts, batch_size, max_length)]
        self.num_tokens = sum(int((b.targets != IGNORE_INDEX).sum()) for b in self.batches)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    @torch.no_grad()
    def _record(self, batch: dict[str, torch.Tensor]) -> _Batch:
        input_ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device)
        calls: list[_Call | None] = [None] * len(self.layers)
        embedded: list[torch.Tensor] = []

        def hook(index: int):
            def record(_module, args, kwargs):
                kwargs = dict(kwargs)
                hidden = args[0] if args else kwargs.pop("hidden_states")
                if index == 0:
                    embedded.append(hidden)
                calls[index] = _Call(tuple(args[1:]), kwargs)
            return record

        handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(self.layers)]
        base = getattr(self.model, "base_model", self.model)  # no LM head: its logits are not needed here
        try:
            with self._autocast():
                base(input_ids=input_ids, attention_mask=mask, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        return _Batch(input_ids, mask.bool(), next_token_targets(input_ids, mask), embedded[0], calls)

    # -- running sequences --------------------------------------------------------------------

    def _check(self, sequence: Sequence[int]) -> None:
        if not sequence or any(not 0 <= s < self.num_layers for s in sequence):
            raise UsageError(f"a layer sequence indexes layers 0..{self.num_layers - 1}, got {list(sequence)}")

    @torch.no_grad()
    def states(self, batch: _Batch, sequence: Sequence[int]) -> list[torch.Tensor]:
        """The residual stream entering each position of ``sequence``, then its output (len + 1 states)."""
        hidden, out = batch.embedded, [batch.embedded]
        with self._autocast():
            for source in sequence:
                call = batch.calls[source]
                hidden = _output(self.layers[source](hidden, *call.args, **call.kwargs))
                out.append(hidden)
        return out

    @torch.no_grad()
    def logits(self, batch: _Batch, sequence: Sequence[int], start: int = 0,
               state: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of ``sequence[start:]`` run on ``state`` (default: the embedding output, start 0)."""
        hidden = batch.embedded if state is None else state
        with self._autocast():
            for source in sequence[start:]:
                call = batch.calls[source]
                hidden = _output(self.layers[source](hidden, *call.args, **call.kwargs))
            return hidden_to_logits(self.model, hidden).float()

    def sequence_loss(self, batch: _Batch, sequence: Sequence[int], detached: Sequence[int] = ()) -> torch.Tensor:
        """The mean next-token loss of ``batch`` through ``sequence``, with autograd: the gradient
        reaches every parameter of the layers that need one, except at the positions in ``detached``,
        whose layer passes a gradient to its input but none to its own weights (a frozen copy)."""
        self._check(sequence)
        hidden = batch.embedded
        with self._autocast():
            for position, source in enumerate(sequence):
                layer, call = self.layers[source], batch.calls[source]
                if position in detached:
                    weights = {name: value.detach() for name, value in layer.named_parameters()}
                    result = functional_call(layer, weights, (hidden, *call.args), call.kwargs)
                else:
                    result = layer(hidden, *call.args, **call.kwargs)
                hidden = _output(result)
            logits = hidden_to_logits(self.model, hidden).float()
        keep = batch.targets != IGNORE_INDEX
        return F.cross_entropy(logits[keep], batch.targets[keep])

    def _nll(self, batch: _Batch, logits: torch.Tensor) -> float:
        """Summed next-token negative log-likelihood of a batch."""
        keep = batch.targets != IGNORE_INDEX
        logp = torch.log_softmax(logits[keep], dim=-1)
        return float(-logp.gather(-1, batch.targets[keep].unsqueeze(-1)).sum())

    def loss(self, sequence: Sequence[int]) -> float:
        """Mean next-token loss (nats per token) of the layer ``sequence`` on the calibration text."""
        self._check(sequence)
        return sum(self._nll(b, self.logits(b, sequence)) for b in self.batches) / self.num_tokens

    def removal_losses(self, sequence: Sequence[int], candidates: Sequence[int], desc: str | None = None) -> dict[int, float]:
        """Loss of ``sequence`` with each candidate layer (an element of it) removed alone.

        The states entering each position are computed once per batch, so removing the layer at
        position i runs only the layers after it.
        """
        sequence = list(sequence)
        self._check(sequence)
        positions = {layer: sequence.index(layer) for layer in candidates}
        totals = dict.fromkeys(candidates, 0.0)
        bar = tqdm(total=len(self.batches) * len(candidates), desc=desc or "removal losses", unit="run",
                   disable=not self.progress, leave=False)
        for batch in self.batches:
            entering = self.states(batch, sequence)
            for layer, i in positions.items():
                totals[layer] += self._nll(batch, self.logits(batch, sequence, i + 1, entering[i]))
                bar.update()
        bar.close()
        return {layer: total / self.num_tokens for layer, total in totals.items()}

    def block_removal_losses(self, starts: Sequence[int], size: int) -> dict[int, float]:
        """Loss of the full model with the ``size`` layers from each of ``starts`` removed (one block).

        The full model's states are computed once per batch; removing the block at s runs the
        layers after it on the state entering s.
        """
        depth = self.num_layers
        if size < 0 or any(s < 0 or s + size > depth for s in starts):
            raise UsageError(f"a block of {size} layers from {list(starts)} does not fit layers 0..{depth - 1}")
        totals = dict.fromkeys(starts, 0.0)
        bar = tqdm(total=len(self.batches) * len(totals), desc=f"blocks of {size}", unit="run",
                   disable=not self.progress, leave=False)
        for batch in self.batches:
            entering = self.states(batch, range(depth))
            for start in totals:
                totals[start] += self._nll(batch, self.logits(batch, range(depth), start + size, entering[start]))
                bar.update()
        bar.close()
        return {start: total / self.num_tokens for start, total in totals.items()}

    # -- geometric scores of the full model -----------------------------------------------------

    def _full_states(self) -> list[tuple[_Batch, list[torch.Tensor]]]:
        return [(b, self.states(b, range(self.num_layers))) for b in self.batches]

    def block_influence(self) -> list[float]:
        """ShortGPT's block influence of every layer: 1 - mean cos(input, output) over real tokens."""
        totals, count = [0.0] * self.num_layers, 0
        for batch, states in self._full_states():
            count += int(batch.mask.sum())
            for layer in range(self.num_layers):
                cos = torch.cosine_similarity(states[layer][batch.mask].float(), states[layer + 1][batch.mask].float(), dim=-1)
                totals[layer] += float(cos.sum())
        return [1.0 - total / count for total in totals]

    def angular_distance(self) -> list[list[float]]:
        """``d[l][n]``: mean over texts of arccos(cos(x_l, x_{l+n})) / pi at the last real token,
        where x_l enters layer l (x_L leaves the last layer); n = 0..L - l."""
        depth = self.num_layers
        totals = [[0.0] * (depth - layer + 1) for layer in range(depth + 1)]
        for batch, states in self._full_states():
            last = batch.mask.long().sum(dim=1) - 1
            rows = torch.arange(len(last), device=last.device)
            final = [state[rows, last].float() for state in states]
            for start in range(depth + 1):
                for n in range(depth - start + 1):
                    cos = torch.cosine_similarity(final[start], final[start + n], dim=-1).clamp(-1.0, 1.0)
                    totals[start][n] += float((torch.arccos(cos) / math.pi).sum())
        return [[total / self.num_texts for total in row] for row in totals]


class RemovalScores:
    """The scores of one :class:`LayerStack`, each computed once and kept (several strategies and
    K read the same ones: ``crashlm fidelity`` builds every plan from one recording)."""

    def __init__(self, stack: LayerStack, settings: dict | None = None):
        self.stack = stack
        self.settings = settings or {}  # what the plans record about the calibration text
        self._influence: list[float] | None = None
        self._angular: list[list[float]] | None = None
        self._single: dict[int, float] | None = None
        self._full: float | None = None
        self._greedy: dict[tuple[int, ...], tuple[list[int], list[float]]] = {}
        self._blocks: dict[int, dict[int, float]] = {}

    @property
    def num_layers(self) -> int:
        return self.stack.num_layers

    def full_loss(self) -> float:
        if self._full is None:
            self._full = self.stack.loss(range(self.num_layers))
        return self._full

    def block_influence(self) -> list[float]:
        if self._influence is None:
            self._influence = self.stack.block_influence()
        return self._influence

    def angular_distance(self) -> list[list[float]]:
        if self._angular is None:
            self._angular = self.stack.angular_distance()
        return self._angular

    def single_removal_losses(self) -> dict[int, float]:
        """Loss of the full model with each layer removed alone."""
        if self._single is None:
            self._single = self.stack.removal_losses(range(self.num_layers), range(self.num_layers), "single removals")
        return self._single

    def block_removal_losses(self, candidates: Sequence[int], size: int) -> dict[int, float]:
        """Loss of the full model with each contiguous block of ``size`` ``candidates`` removed, by its
        first layer (``candidates``: consecutive layers; each block size is measured once)."""
        starts = list(candidates)[: len(candidates) - size + 1]
        if size > len(candidates):
            raise UsageError(f"cannot remove {size} of {len(candidates)} candidate layers")
        measured = self._blocks.setdefault(size, {})
        missing = [start for start in starts if start not in measured]
        if missing:
            measured.update(self.stack.block_removal_losses(missing, size))
        return {start: measured[start] for start in starts}

    def greedy_removal(self, candidates: Sequence[int], count: int) -> tuple[list[int], list[float]]:
        """SLEB's greedy search: ``count`` times, remove the candidate whose removal raises the loss
        least (ties: the lower layer). Returns the removed layers in order and the loss after each.
        The search for fewer removals is the start of the search for more, so it is continued, not redone."""
        key = tuple(candidates)
        removed, losses = self._greedy.get(key, ([], []))
        if count > len(candidates):
            raise UsageError(f"cannot remove {count} of {len(candidates)} candidate layers")
        while len(removed) < count:
            sequence = [layer for layer in range(self.num_layers) if layer not in removed]
            left = [layer for layer in candidates if layer not in removed]
            costs = self.stack.removal_losses(sequence, left, f"greedy step {len(removed) + 1}/{count}")
            best = min(left, key=lambda layer: (costs[layer], layer))
            removed, losses = [*removed, best], [*losses, costs[best]]
            self._greedy[key] = (removed, losses)
        return removed[:count], losses[:count]
