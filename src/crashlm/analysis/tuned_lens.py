"""Training a tuned lens (Belrose et al. 2023) on the training loop.

The translators of a :class:`~crashlm.analysis.lens.TunedLens` learn to make each state's
decoded distribution match the model's final one: AdamW on KL(final || lens), summed over the
translators, with the model frozen and in eval mode.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, fields
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from crashlm.analysis.lens import TunedLens, batch_states, decode, encode_texts
from crashlm.core.errors import UsageError
from crashlm.training.loop import TrainingLoop
from crashlm.training.runtime import accelerator


@dataclass
class LensTrainConfig:
    """How a tuned lens is trained: AdamW on KL(final || lens), summed over the translators.

    The defaults fit a CPU: a few hundred short batches. The learning rate warms up linearly
    over ``warmup_steps`` and then decays with a cosine to zero.
    """

    steps: int = 200
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 4
    max_length: int = 128
    warmup_steps: int = 20
    max_grad_norm: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "max_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"lens training: {name} must be a positive integer, got {value!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UsageError(f"lens training: lr must be a positive number, got {self.lr}")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.max_grad_norm <= 0:
            raise UsageError("lens training: warmup_steps and weight_decay must be >= 0, max_grad_norm > 0")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> LensTrainConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise UsageError(f"lens training: unknown settings {', '.join(sorted(unknown))}")
        return cls(**data)


@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """Turn off the model's gradients for the duration (the lens trains through its unembedding)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _lr_factor(step: int, config: LensTrainConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class _TextBatches:
    """Batches of texts, reshuffled every pass with one seeded generator; batch ``step`` by step."""

    def __init__(self, tokenizer, texts: Sequence[str], batch_size: int, max_length: int, seed: int):
        self.tokenizer, self.texts, self.batch_size, self.max_length = tokenizer, texts, batch_size, max_length
        self.per_pass = math.ceil(len(texts) / batch_size)
        self._generator = torch.Generator().manual_seed(seed)
        self._passes: list[list[int]] = []

    def __call__(self, step: int) -> list[dict[str, torch.Tensor]]:
        index, start = divmod(step - 1, self.per_pass)
        while len(self._passes) <= index:
            self._passes.append(torch.randperm(len(self.texts), generator=self._generator).tolist())
        chunk = self._passes[index][start * self.batch_size : (start + 1) * self.batch_size]
        return [encode_texts(self.tokenizer, [self.texts[i] for i in chunk], self.max_length)]


def train_tuned_lens(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    config: LensTrainConfig | None = None,
    lens: TunedLens | None = None,
    name: str | None = None,
    base_fingerprint: str | None = None,
) -> tuple[TunedLens, list[float]]:
    """Train a tuned lens for ``model`` on ``texts``; return it and the loss at every step.

    The loss of step t is the mean over translators of KL(final || lens), averaged over the
    batch's real tokens. Each translator's loss is back-propagated on its own: translators do
    not interact, so this equals one backward of the sum, with one [N, V] graph alive at a time.
    The model stays frozen and in eval mode.
    """
    config = config or LensTrainConfig()
    texts = list(texts)
    if not texts:
        raise UsageError("training a tuned lens needs at least one text")
    torch.manual_seed(config.seed)
    lens = lens if lens is not None else TunedLens.for_model(model, name, base_fingerprint)
    lens.check_model(model)
    acc = accelerator(bf16=False, device_placement=False)  # the lens stays beside its model

    def kl(lens: TunedLens, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The step's loss, back-propagated translator by translator (one [N, V] graph at a time)."""
        states = batch_states(model, batch).states
        with torch.no_grad():
            final = decode(model, states[-1], lens.num_layers).log_softmax(-1)
        total = 0.0
        for index in range(lens.num_layers):
            log_q = decode(model, states[index], index, lens).log_softmax(-1)
            loss = F.kl_div(log_q, final, log_target=True, reduction="batchmean") / lens.num_layers
            acc.backward(loss)
            total += loss.item()
        return torch.tensor(total, dtype=torch.float64)

    loop = TrainingLoop(
        acc, lens, dict(lens.named_parameters()), kl,
        _TextBatches(tokenizer, texts, config.batch_size, config.max_length, config.seed), config.steps,
        lr=config.lr, weight_decay=config.weight_decay, grad_clip=config.max_grad_norm,
        schedule=lambda optimizer, _: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, config)),
        manual_backward=True, name="tuned lens training",
    )
    with _frozen(model):
        losses = loop.run().record["train_losses"]
    lens.training_config = {**lens.training_config, **config.to_dict(), "texts": len(texts), "final_loss": losses[-1]}
    return lens, losses
