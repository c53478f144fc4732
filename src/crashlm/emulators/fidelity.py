"""Emulator fidelity: how close an emulator is to its full model, before anyone trains on it.

Measured on held-out calibration text (:mod:`crashlm.core.calibration`, the ``heldout`` slice:
no task's data, and no text any strategy or distillation was fitted on), per real next-token
position:

* ``loss``: the emulator's next-token loss (nats per token), beside ``full_loss``, the full model's;
* ``kl``: the mean KL(full || emulator) of the next-token distributions, in nats;
* ``top1``: how often the emulator's most likely next token is the full model's.

A zero-removal emulator has KL 0 and agreement 1. :func:`gradient_agreement` asks the question
closer to offsite-tuning: is the adapter's gradient on the emulator the one it would get on the
full model (cosine 1 when nothing was removed)? :func:`spec_fidelity` scores untrained
emulators as layer sequences of the full model (:class:`~crashlm.analysis.removal.LayerStack`),
many at once and without building them; :func:`emulator_fidelity` scores a built emulator (one
whose weights changed: distilled, or with a trained adapter) beside the full model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from crashlm.analysis.removal import LayerStack
from crashlm.core.calibration import CALIBRATION_TASK, calibration_texts
from crashlm.core.errors import UsageError
from crashlm.core.scoring import IGNORE_INDEX, next_token_targets, text_batches
from crashlm.emulators.emulator import Emulator, check_plan
from crashlm.emulators.plans import EmulatorSpec, SlotKind
from crashlm.training.runtime import use_bf16

FIDELITY_TEXTS, FIDELITY_LENGTH = 64, 128


@dataclass(frozen=True)
class Fidelity:
    loss: float
    full_loss: float
    kl: float
    top1: float
    texts: int
    tokens: int
    text: str = f"{CALIBRATION_TASK} train paragraphs (heldout slice)"

    @property
    def loss_increase(self) -> float:
        return self.loss - self.full_loss

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Fidelity":
        try:
            return cls(**{key: data[key] for key in ("loss", "full_loss", "kl", "top1", "texts", "tokens", "text")
                          if key in data})
        except TypeError as exc:
            raise UsageError(f"fidelity record: {exc}") from exc


@dataclass
class _Reference:
    """The full model's side of one batch, computed once for every emulator scored against it."""

    keep: torch.Tensor  # the scored positions
    gold: torch.Tensor  # their next tokens, [N, 1]
    probs: torch.Tensor  # the full model's next-token distribution there, [N, V]
    neg_entropy: float  # sum of p log p: KL(p || q) = this - sum of p log q
    argmax: torch.Tensor
    nll: float
    tokens: int

    @classmethod
    def of(cls, full_logits: torch.Tensor, targets: torch.Tensor) -> _Reference:
        keep = targets != IGNORE_INDEX
        logp = torch.log_softmax(full_logits[keep].float(), dim=-1)
        gold = targets[keep].unsqueeze(-1)
        probs = logp.exp()
        return cls(keep, gold, probs, float((probs * logp).sum(dtype=torch.float64)), logp.argmax(-1),
                   -float(logp.gather(-1, gold).sum()), int(keep.sum()))


class _Totals:
    """Sums over the scored tokens of one emulator."""

    def __init__(self) -> None:
        self.nll = self.full_nll = self.kl = self.agree = 0.0
        self.tokens = 0

    def add(self, reference: _Reference, logits: torch.Tensor) -> None:
        emu = torch.log_softmax(logits[reference.keep].float(), dim=-1)
        self.nll -= float(emu.gather(-1, reference.gold).sum())
        self.full_nll += reference.nll
        # float64 sums: the difference of two large sums stays exact enough for a KL near 0.
        self.kl += reference.neg_entropy - float((reference.probs * emu).sum(dtype=torch.float64))
        self.agree += float((reference.argmax == emu.argmax(-1)).sum())
        self.tokens += reference.tokens

    def result(self, texts: int) -> Fidelity:
        n = max(self.tokens, 1)
        return Fidelity(self.nll / n, self.full_nll / n, max(self.kl / n, 0.0), self.agree / n, texts, self.tokens)


def heldout_texts(samples: int = FIDELITY_TEXTS) -> list[str]:
    return calibration_texts("heldout", samples)


def spec_fidelity(model: nn.Module, tokenizer, specs: Mapping[str, EmulatorSpec], texts: Sequence[str] | None = None,
                  max_length: int = FIDELITY_LENGTH, bf16: bool = True, progress: bool = True) -> dict[str, Fidelity]:
    """Fidelity of each untrained emulator of ``specs`` (name -> spec) made from the full ``model``."""
    for spec in specs.values():
        check_plan(model, spec.plan)
    texts = list(texts) if texts is not None else heldout_texts()
    stack = LayerStack(model, tokenizer, texts, max_length=max_length, bf16=bf16, progress=progress)
    totals = {name: _Totals() for name in specs}
    sequences = {name: [slot.source for slot in spec.slots] for name, spec in specs.items()}
    bar = tqdm(total=len(stack.batches) * len(specs), desc="emulator fidelity", unit="run", disable=not progress,
               leave=False)
    with bar:
        for batch in stack.batches:
            reference = _Reference.of(stack.logits(batch, range(stack.num_layers)), batch.targets)
            for name, sequence in sequences.items():
                totals[name].add(reference, stack.logits(batch, sequence))
                bar.update()
    return {name: total.result(len(texts)) for name, total in totals.items()}


@torch.no_grad()
def emulator_fidelity(full_model: nn.Module, emulator: Emulator, texts: Sequence[str] | None = None,
                      max_length: int = FIDELITY_LENGTH, batch_size: int = 8, bf16: bool = True) -> Fidelity:
    """Fidelity of a built ``emulator`` (e.g. distilled) against its ``full_model``."""
    texts = list(texts) if texts is not None else heldout_texts()
    device = next(emulator.model.parameters()).device
    full_model.to(device).eval()
    emulator.model.eval()
    autocast = use_bf16(bf16, device)
    totals = _Totals()
    for batch in text_batches(emulator.tokenizer, texts, batch_size, max_length):
        batch = {key: value.to(device) for key, value in batch.items()}
        targets = next_token_targets(batch["input_ids"], batch["attention_mask"])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            full = full_model(**batch, use_cache=False).logits
            logits = emulator.model(**batch, use_cache=False).logits
        totals.add(_Reference.of(full, targets), logits)
    return totals.result(len(texts))


@dataclass(frozen=True)
class GradientAgreement:
    """Cosine between the adapter's gradient on an emulator and on the full model, mean over batches."""

    cosine: float  # over every adapter parameter at once
    per_layer: dict[int, float]  # over each trainable layer's parameters (keyed by full-model layer)
    batches: int

    def to_dict(self) -> dict:
        return {"cosine": self.cosine, "per_layer": {str(k): v for k, v in self.per_layer.items()},
                "batches": self.batches}


def _adapter_gradient(stack: LayerStack, batch, sequence: Sequence[int], detached: Sequence[int],
                      trainable: Sequence[int]) -> list[torch.Tensor]:
    """The gradient of ``batch``'s loss through ``sequence`` for each trainable layer, flattened."""
    params = [list(stack.layers[layer].parameters()) for layer in trainable]
    with torch.enable_grad():
        loss = stack.sequence_loss(batch, sequence, detached)
        # Zeros for a parameter the loss does not reach (a layer the sequence left out).
        grads = iter(torch.autograd.grad(loss, [p for ps in params for p in ps], materialize_grads=True))
    return [torch.cat([next(grads).float().flatten() for _ in layer_params]) for layer_params in params]


def gradient_agreement(model: nn.Module, tokenizer, specs: Mapping[str, EmulatorSpec], texts: Sequence[str],
                       max_length: int = FIDELITY_LENGTH, bf16: bool = True,
                       progress: bool = True) -> dict[str, GradientAgreement]:
    """For each untrained emulator of ``specs`` (name -> spec): how alike its adapter's gradient of
    the next-token loss on ``texts`` is to the gradient the same layers get in the full ``model``.

    Offsite-tuning trains the adapter with the emulator's gradients and hopes they are the full
    model's; this measures that hope at the pretrained weights, per batch of ``texts`` (generic
    text, or a task's own). Frozen copies of adapter layers (CRaSh's sharing) pass gradients
    through but collect none, as in a built emulator.
    """
    for spec in specs.values():
        check_plan(model, spec.plan)
    stack = LayerStack(model, tokenizer, texts, max_length=max_length, bf16=bf16, progress=progress)
    requires = {p: p.requires_grad for p in model.parameters()}
    sums: dict[str, list[float]] = {name: [0.0] * (1 + len(spec.plan.trainable)) for name, spec in specs.items()}
    cos = torch.nn.functional.cosine_similarity
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in {t for spec in specs.values() for t in spec.plan.trainable}:
            for p in stack.layers[layer].parameters():
                p.requires_grad_(True)
        bar = tqdm(total=len(stack.batches) * len(specs), desc="gradient agreement", unit="run",
                   disable=not progress, leave=False)
        with bar:
            for batch in stack.batches:
                full: dict[tuple[int, ...], list[torch.Tensor]] = {}
                for name, spec in specs.items():
                    trainable = tuple(spec.plan.trainable)
                    if trainable not in full:
                        full[trainable] = _adapter_gradient(stack, batch, range(stack.num_layers), (), trainable)
                    sequence = [slot.source for slot in spec.slots]
                    detached = [i for i, slot in enumerate(spec.slots) if slot.kind == SlotKind.COPY]
                    emu = _adapter_gradient(stack, batch, sequence, detached, trainable)
                    sums[name][0] += float(cos(torch.cat(emu), torch.cat(full[trainable]), dim=0))
                    for i, (e, f) in enumerate(zip(emu, full[trainable])):
                        sums[name][i + 1] += float(cos(e, f, dim=0))
                    bar.update()
    finally:
        for p, flag in requires.items():
            p.requires_grad_(flag)
    n = len(stack.batches)
    return {name: GradientAgreement(sums[name][0] / n,
                                    {layer: sums[name][i + 1] / n for i, layer in enumerate(spec.plan.trainable)}, n)
            for name, spec in specs.items()}
