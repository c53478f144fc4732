"""OFT's knowledge distillation of an emulator from its full model (Xiao et al. 2023).

Loss = 1.0 * LM + 30 * KD: the emulator's next-token loss on plain text, plus the distance
between the full model's and the emulator's hidden state entering the first top adapter layer
(:func:`kd_loss`). Only the emulator's non-adapter layers train (the ones frozen during
fine-tuning); the adapter layers, embeddings and head do not. It runs on the training loop
(:mod:`crashlm.training.loop`) without validation or checkpoints: the result is the last step's.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch
from torch import nn

from crashlm.core.errors import UsageError
from crashlm.core.models import capture_layer_io, fingerprint
from crashlm.core.scoring import (
    IGNORE_INDEX,
    answer_loss,
    encode_text,
    pad_batch,
    pad_token_id,
)
from crashlm.core.settings import Settings, setting
from crashlm.core.tasks import get_task, load_examples
from crashlm.emulators.emulator import Emulator
from crashlm.training.loop import TrainingLoop, warmup_schedule
from crashlm.training.runtime import accelerator, use_bf16

LM_WEIGHT, KD_WEIGHT = 1.0, 30.0
# OFT's optimisation: AdamW, cosine schedule after 6 % warmup, gradient norm clipped at 1.0.
WARMUP_RATIO, GRAD_CLIP = 0.06, 1.0


@dataclass
class DistillConfig(Settings):
    """How an emulator is distilled (``crashlm distill``, and the OFT + KD row of ``crashlm offsite``)."""

    what: ClassVar[str] = "distillation"

    steps: int = setting(100, "Optimizer steps.")
    batch_size: int = setting(8, "Texts per step.")
    lr: float = setting(1e-4, "Peak learning rate of AdamW (cosine schedule, 6 % warmup).")
    text_task: str = setting("boolq", "Task whose TRAIN contexts are the distillation text (BoolQ: Wikipedia passages).")
    max_length: int = setting(256, "Truncate texts to this many tokens.")
    seed: int = setting(1, "Seed of the text order.")
    bf16: bool = setting(True, "bf16 autocast where the device computes bf16 natively, else fp32.")

    def validate(self) -> None:
        get_task(self.text_task)
        self.check_positive("steps", "batch_size")
        self.check_positive("max_length", minimum=8)
        self.check_number("lr", open_low=True)


def distillation_texts(config: DistillConfig) -> list[str]:
    """The texts of one distillation: ``steps x batch_size`` contexts of the text task's train split."""
    return [ex.context for ex in load_examples(config.text_task, "train", limit=config.steps * config.batch_size)]


def kd_loss(teacher_state: torch.Tensor, student_state: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """OFT's ``mean(((T - S) / rms(T))^2)`` over the non-pad tokens, rms over all of T's values."""
    keep = mask.bool()
    teacher, student = teacher_state[keep].float(), student_state[keep].float()
    return ((teacher - student) ** 2).mean() / teacher.pow(2).mean()


def _middle_positions(emulator: Emulator) -> tuple[int, int]:
    """(teacher layer index, emulator position) whose INPUT is the middle block's output: the first top adapter layer."""
    trainable = emulator.plan.trainable
    top = trainable[len(trainable) // 2]
    return top, next(slot.position for slot in emulator.slots if slot.trainable and slot.source == top)


class TextBatches:
    """Padded batches of ``batch_size`` texts, cycling through them in a new seeded order each pass.

    ``batch(step)`` (1-based) is the step-th batch of that stream whatever order it is asked in.
    """

    def __init__(self, tokenizer, texts: Sequence[str], batch_size: int, max_length: int, seed: int):
        self.tokenizer, self.texts, self.batch_size, self.max_length = tokenizer, texts, batch_size, max_length
        self._rng = random.Random(seed)
        self._passes: list[list[int]] = []

    def _pass(self, index: int) -> list[int]:
        """The order of pass ``index``, drawn in turn from one generator; texts are taken from its end."""
        while len(self._passes) <= index:
            order = list(range(len(self.texts)))
            self._rng.shuffle(order)
            self._passes.append(order)
        return self._passes[index]

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        count, pad_id = len(self.texts), pad_token_id(self.tokenizer)
        chunk = []
        for item in range((step - 1) * self.batch_size, step * self.batch_size):
            index, taken = divmod(item, count)
            chunk.append(self.texts[self._pass(index)[count - 1 - taken]])
        return pad_batch([encode_text(self.tokenizer, t, self.max_length) or [pad_id] for t in chunk], pad_id)


def _distill_losses(teacher: nn.Module, student: nn.Module, positions: tuple[int, int], input_ids: torch.Tensor,
                    mask: torch.Tensor, bf16: bool, forward: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(LM loss of the student on the text, KD loss of its middle block against the teacher's).

    ``forward`` is what runs the student (the training loop's prepared model; default the student
    itself), hooked at the student's own layers. Both models run under one autocast: the teacher
    is no model the accelerator prepares.
    """
    layer, position = positions
    with torch.autocast(input_ids.device.type, dtype=torch.bfloat16, enabled=bf16):
        with torch.no_grad(), capture_layer_io(teacher) as states:
            teacher(input_ids=input_ids, attention_mask=mask, use_cache=False, logits_to_keep=1)
        target = states[layer]
        with capture_layer_io(student) as states:
            logits = (student if forward is None else forward)(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
    targets = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE_INDEX)
    return answer_loss(logits[:, :-1], targets), kd_loss(target, states[position], mask)


@torch.no_grad()
def distillation_loss(teacher, emulator: Emulator, texts: Sequence[str], config: DistillConfig) -> dict[str, float]:
    """Mean LM and KD losses of ``emulator`` on ``texts`` (one pass, in order), e.g. before and after distilling."""
    device = next(emulator.model.parameters()).device
    bf16 = use_bf16(config.bf16, device)
    batch_size, max_length = config.batch_size, config.max_length
    positions = _middle_positions(emulator)
    steps = math.ceil(len(texts) / batch_size)
    lm = kd = 0.0
    for i in range(steps):
        chunk = texts[i * batch_size : (i + 1) * batch_size]
        batch = TextBatches(emulator.tokenizer, chunk, len(chunk), max_length, 0).batch(1)
        a, b = _distill_losses(teacher, emulator.model, positions, batch["input_ids"].to(device),
                               batch["attention_mask"].to(device), bf16)
        lm, kd = lm + float(a), kd + float(b)
    return {"lm": lm / steps, "kd": kd / steps}


def distill_emulator(teacher: nn.Module, emulator: Emulator, texts: list[str], config: DistillConfig) -> Emulator:
    """Distil the full model into the emulator's middle (OFT + KD), in place; returns the emulator.

    ``config.steps`` optimizer steps of ``config.batch_size`` texts (:class:`TextBatches`, seeded
    by ``config.seed``); bf16 autocast as in :func:`~crashlm.training.runtime.use_bf16`.
    """
    if not texts:
        raise UsageError("distillation needs at least one text")
    config.validate()
    steps, batch_size, lr, seed = config.steps, config.batch_size, config.lr, config.seed
    base = fingerprint(teacher)
    if emulator.base_fingerprint and emulator.base_fingerprint != base:
        raise UsageError(f"the teacher is not this emulator's base model (fingerprint {base}, "
                         f"emulator made from {emulator.base_fingerprint})")
    torch.manual_seed(seed)
    acc = accelerator(bf16=False)  # the loss autocasts itself, teacher included
    device = acc.device
    bf16 = use_bf16(config.bf16, device)
    teacher.to(device).eval()
    student = emulator.model.to(device)
    student.requires_grad_(False)
    for module in emulator.frozen_modules():
        module.requires_grad_(True)
    params = {name: p for name, p in student.named_parameters() if p.requires_grad}
    if not params:
        raise UsageError("this emulator has no layers outside its adapter: nothing to distil")
    positions = _middle_positions(emulator)
    texts_by_step = TextBatches(emulator.tokenizer, texts, batch_size, config.max_length, seed)

    def batches(step: int) -> list[dict[str, torch.Tensor]]:
        return [{k: v.to(device) for k, v in texts_by_step.batch(step).items()}]

    def loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        lm, kd = _distill_losses(teacher, student, positions, batch["input_ids"], batch["attention_mask"], bf16, model)
        return LM_WEIGHT * lm + KD_WEIGHT * kd

    loop = TrainingLoop(acc, student, params, loss, batches, steps, lr=lr,
                        schedule=warmup_schedule("cosine", WARMUP_RATIO), grad_clip=GRAD_CLIP, name="distillation")
    try:
        loop.run()
    finally:
        student.eval()
        emulator.freeze()
    return emulator
