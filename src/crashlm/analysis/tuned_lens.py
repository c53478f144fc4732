"""Training a tuned lens (Belrose et al. 2023) on the training loop.

The translators of a :class:`~crashlm.analysis.lens.TunedLens` learn to make each state's
decoded distribution match the model's final one: AdamW on KL(final || lens), summed over the
translators, with the model frozen and in eval mode.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import ClassVar, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from crashlm.analysis.lens import TunedLens, batch_states, decode, encode_texts
from crashlm.core.errors import UsageError
from crashlm.core.settings import Settings, setting
from crashlm.training.loop import TrainingLoop
from crashlm.training.runtime import accelerator


@dataclass
class LensTrainConfig(Settings):
    """How a tuned lens is trained: AdamW on KL(final || lens), summed over the translators.

    The defaults fit a CPU: a few hundred short batches. The learning rate warms up linearly
    over ``warmup_steps`` and then decays with a cosine to zero.
    """

    what: ClassVar[str] = "lens training"

    steps: int = setting(200, "Optimizer steps.")
    lr: float = setting(1e-3, "Peak AdamW learning rate (linear warm-up, cosine decay).")
    weight_decay: float = setting(0.0, "AdamW weight decay.")
    batch_size: int = setting(4, "Texts per step.")
    max_length: int = setting(128, "Truncate texts to this many tokens.")
    warmup_steps: int = setting(20, "Steps of linear learning-rate warmup (at most a tenth of --steps on the command line).")
    max_grad_norm: float = setting(1.0, "Gradient norm clipping.")
    seed: int = setting(0, "Seed of the text shuffle and the batch order.")

    def __post_init__(self) -> None:
        self.check_positive("steps", "batch_size", "max_length")
        self.check_positive("warmup_steps", minimum=0)
        self.check_number("lr", open_low=True)
        self.check_number("weight_decay")
        self.check_number("max_grad_norm", open_low=True)


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
