"""OFT's knowledge distillation of an emulator from its full model (Xiao et al. 2023).

Loss = 1.0 * LM + 30 * KD: the emulator's next-token loss on plain text, plus the distance
between the full model's and the emulator's hidden state entering the first top adapter layer
(:func:`kd_loss`). Only the emulator's non-adapter layers train (the ones frozen during
fine-tuning); the adapter layers, embeddings and head do not. It runs on the training loop
(:mod:`crashlm.training.loop`): the entry points train on the calibration text's ``distill``
slice and validate on its ``heldout`` slice (:mod:`crashlm.core.calibration`), so the kept
weights, and hence the step count, are those of the lowest held-out LM loss. Given an output
directory the run checkpoints into ``<out>.partial`` and resumes from it.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Sequence

import torch
from torch import nn

from crashlm.core.attention import training_attention
from crashlm.core.calibration import calibration_texts
from crashlm.core.errors import UsageError
from crashlm.core.models import capture_layer_io, fingerprint, held_in_bf16
from crashlm.core.scoring import IGNORE_INDEX, batch_answer_loss, next_token_targets, text_batches
from crashlm.core.settings import Settings, setting
from crashlm.emulators.bundle import save_bundle
from crashlm.emulators.emulator import Emulator
from crashlm.emulators.fidelity import FIDELITY_TEXTS, emulator_fidelity
from crashlm.training.checkpoint import CheckpointStore, check_output
from crashlm.training.loop import TrainingLoop, warmup_schedule
from crashlm.training.runtime import accelerator, use_bf16

LM_WEIGHT, KD_WEIGHT = 1.0, 30.0
# OFT's optimisation: AdamW, cosine schedule after 6 % warmup, gradient norm clipped at 1.0.
WARMUP_RATIO, GRAD_CLIP = 0.06, 1.0


@dataclass
class DistillConfig(Settings):
    """How an emulator is distilled (``crashlm distill``, and the "+ KD" rows of ``crashlm offsite``)."""

    what: ClassVar[str] = "distillation"

    steps: int = setting(100, "Optimizer steps at most; the weights kept are those of the best validation.")
    batch_size: int = setting(8, "Texts per step.")
    lr: float = setting(1e-4, "Peak learning rate of AdamW (cosine schedule, 6 % warmup).")
    eval_every: int = setting(25, "Validate (and checkpoint) every this many steps, and at the last.")
    val_texts: int = setting(64, "Held-out calibration paragraphs of the validation LM loss.")
    max_length: int = setting(256, "Truncate texts to this many tokens.")
    seed: int = setting(1, "Seed of the text order.")
    bf16: bool = setting(True, "bf16 autocast where the device computes bf16 natively, else fp32.")

    def validate(self) -> None:
        self.check_positive("steps", "batch_size", "eval_every", "val_texts")
        self.check_positive("max_length", minimum=8)
        self.check_number("lr", open_low=True)


def calibration_inputs(config: DistillConfig) -> tuple[list[str], list[str]]:
    """(training texts, validation texts): the calibration ``distill`` slice and the last
    ``config.val_texts`` paragraphs of its ``heldout`` slice."""
    # The last held-out paragraphs: fidelity is measured on the first ones, so the step is not chosen on them.
    heldout = calibration_texts("heldout")
    if config.val_texts > len(heldout) - FIDELITY_TEXTS:
        raise UsageError(f"val_texts can be at most {len(heldout) - FIDELITY_TEXTS}: the first {FIDELITY_TEXTS} "
                         "held-out paragraphs are fidelity's")
    return calibration_texts("distill"), heldout[len(heldout) - config.val_texts:]


def kd_loss(teacher_state: torch.Tensor, student_state: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """OFT's ``mean(((T - S) / rms(T))^2)`` over the non-pad tokens, rms over all of T's values."""
    keep = mask.bool()
    teacher, student = teacher_state[keep].float(), student_state[keep].float()
    return ((teacher - student) ** 2).mean() / teacher.pow(2).mean()


def _middle_positions(emulator: Emulator) -> tuple[int, int]:
    """(teacher state, emulator state) of the KD target, indexed as :func:`capture_layer_io`'s states.

    The target is the input of the first trainable layer of the adapter's upper half: the output
    of the distilled middle. A sharing emulator's positions are the full model's layers, so the
    teacher's state is that position's; without sharing it is the input of the layer placed there.
    Where no distilled module comes before that layer (e.g. one trainable layer at the bottom),
    KD could not reach the middle, so the target is the stack's output instead.
    """
    slots, trainable = emulator.slots, emulator.plan.trainable
    top = trainable[len(trainable) // 2]
    position = next(slot.position for slot in slots if slot.trainable and slot.source == top)
    if all(slot.trainable for slot in slots[:position]):
        return emulator.plan.num_layers, len(slots)
    return (position if emulator.spec.shares else top), position


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
        count = len(self.texts)
        chunk = []
        for item in range((step - 1) * self.batch_size, step * self.batch_size):
            index, taken = divmod(item, count)
            chunk.append(self.texts[self._pass(index)[count - 1 - taken]])
        return next(text_batches(self.tokenizer, chunk, len(chunk), self.max_length))


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
        batch = {"input_ids": input_ids, "attention_mask": mask, "targets": next_token_targets(input_ids, mask)}
        with capture_layer_io(student) as states:
            lm = batch_answer_loss(student if forward is None else forward, batch)
    return lm, kd_loss(target, states[position], mask)


@torch.no_grad()
def distillation_loss(teacher, emulator: Emulator, texts: Sequence[str], config: DistillConfig) -> dict[str, float]:
    """Mean LM and KD losses of ``emulator`` on ``texts`` (one pass, in order), e.g. before and after distilling."""
    device = next(emulator.model.parameters()).device
    bf16 = use_bf16(config.bf16, device)
    positions = _middle_positions(emulator)
    steps = math.ceil(len(texts) / config.batch_size)
    lm = kd = 0.0
    for batch in text_batches(emulator.tokenizer, texts, config.batch_size, config.max_length):
        a, b = _distill_losses(teacher, emulator.model, positions, batch["input_ids"].to(device),
                               batch["attention_mask"].to(device), bf16)
        lm, kd = lm + float(a), kd + float(b)
    return {"lm": lm / steps, "kd": kd / steps}


@torch.no_grad()
def lm_loss(model: nn.Module, tokenizer, texts: Sequence[str], config: DistillConfig) -> float:
    """The next-token loss of ``model`` on ``texts``, a mean over all their predicted tokens."""
    device = next(model.parameters()).device
    bf16 = use_bf16(config.bf16, device)
    total, count = 0.0, 0
    for batch in text_batches(tokenizer, texts, config.batch_size, config.max_length):
        batch = {k: v.to(device) for k, v in batch.items()}
        batch["targets"] = next_token_targets(batch["input_ids"], batch["attention_mask"])
        tokens = int((batch["targets"] != IGNORE_INDEX).sum())
        if not tokens:
            continue
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            total += float(batch_answer_loss(model, batch)) * tokens
        count += tokens
    if not count:
        raise UsageError("the validation texts hold no token to predict")
    return total / count


def _digest(texts: Sequence[str]) -> str:
    return hashlib.sha256("\0".join(texts).encode()).hexdigest()[:16]


def distill_emulator(teacher: nn.Module, emulator: Emulator, texts: Sequence[str], config: DistillConfig, *,
                     val_texts: Sequence[str] | None = None, out_dir: str | Path | None = None,
                     fidelity: bool = False) -> dict:
    """Distil the full model into the emulator's middle (OFT + KD), in place; returns the record.

    At most ``config.steps`` optimizer steps of ``config.batch_size`` texts (:class:`TextBatches`,
    seeded by ``config.seed``); with ``val_texts`` the emulator's LM loss on them is measured
    every ``config.eval_every`` steps and the best step's weights are kept, else the last step's.
    With ``out_dir`` the run resumes ``<out_dir>.partial`` when there is one (refusing other
    settings) and writes the bundle there, the record under ``distillation`` in its
    ``crashlm.json`` (and, with ``fidelity``, the distilled emulator's fidelity).
    """
    if not texts:
        raise UsageError("distillation needs at least one text")
    config.validate()
    if out_dir is not None:
        check_output(out_dir, resume=True)
    base = fingerprint(teacher)
    if emulator.base_fingerprint and emulator.base_fingerprint != base:
        raise UsageError(f"the teacher is not this emulator's base model (fingerprint {base}, "
                         f"emulator made from {emulator.base_fingerprint})")
    torch.manual_seed(config.seed)
    acc = accelerator(bf16=False)  # the loss autocasts itself, teacher included
    device = acc.device
    bf16 = use_bf16(config.bf16, device)
    teacher.to(device).eval()
    student = emulator.model.to(device)
    start = fingerprint(student)
    student.requires_grad_(False)
    for module in emulator.frozen_modules():
        module.requires_grad_(True)
    params = {name: p for name, p in student.named_parameters() if p.requires_grad}
    if not params:
        raise UsageError("this emulator has no layers outside its adapter: nothing to distil")
    positions = _middle_positions(emulator)
    texts_by_step = TextBatches(emulator.tokenizer, texts, config.batch_size, config.max_length, config.seed)
    probe = list(val_texts) if val_texts else list(texts[: config.batch_size])

    def batches_of(step: int) -> list[dict[str, torch.Tensor]]:
        return [{k: v.to(device) for k, v in texts_by_step.batch(step).items()}]

    def loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        lm, kd = _distill_losses(teacher, student, positions, batch["input_ids"], batch["attention_mask"], bf16, model)
        return LM_WEIGHT * lm + KD_WEIGHT * kd

    def validate(model: nn.Module) -> float:
        return lm_loss(acc.unwrap_model(model), emulator.tokenizer, val_texts, config)

    store = None
    if out_dir is not None:
        identity = {"kind": "distillation", "teacher": base, "start_fingerprint": start,
                    "spec": emulator.spec.to_dict(), "texts": _digest(texts), "val_texts": _digest(val_texts or [])}
        store = CheckpointStore(out_dir, acc, config.to_dict(), identity)
    before = distillation_loss(teacher, emulator, probe, config)
    loop = TrainingLoop(acc, student, params, loss, batches_of, config.steps, lr=config.lr,
                        schedule=warmup_schedule("cosine", WARMUP_RATIO), grad_clip=GRAD_CLIP,
                        validate=validate if val_texts else None, eval_every=config.eval_every, store=store,
                        checkpoint_every=config.eval_every, name="distillation")
    try:
        # The teacher never trains; the student's adapter layers are frozen while its middle learns.
        with held_in_bf16(teacher, bf16, frozen_only=False), held_in_bf16(student, bf16), \
                training_attention(student, bf16):
            result = loop.run()
    finally:
        student.eval()
        emulator.freeze()
    record = {"config": config.to_dict(), "texts": len(texts), "val_texts": len(val_texts or []),
              "chosen_step": result.record.get("best_step", config.steps), "validation_curve": result.curve,
              "before": before, "after": distillation_loss(teacher, emulator, probe, config),
              "before_after_on": "validation texts" if val_texts else "the first batch of training texts",
              "training": result.record}
    if out_dir is not None:
        extra = {"distillation": record}
        if fidelity:
            extra["fidelity"] = emulator_fidelity(teacher, emulator, bf16=config.bf16).to_dict()
        save_bundle(emulator, out_dir, extra=extra)
        store.remove()
    return record
