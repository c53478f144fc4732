"""Adapter training: the emulator's adapter layers train on a task, the rest stays frozen.

It runs on the task training of :mod:`crashlm.training.task` and writes an adapter directory
(:func:`crashlm.emulators.plugin.save_adapter`) with the best weights by validation loss.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from torch import nn
from transformers.pytorch_utils import Conv1D

from crashlm.core.models import fingerprint
from crashlm.emulators.emulator import Emulator
from crashlm.emulators.plugin import save_adapter
from crashlm.training.config import TrainConfig
from crashlm.training.loop import TrainResult
from crashlm.training.task import train_on_task


def _lora_targets(model: nn.Module, layers: Sequence[nn.Module]) -> list[str]:
    """Full names of the linear modules (nn.Linear, GPT-2's Conv1D) inside ``layers``."""
    wanted = {id(layer) for layer in layers}
    targets = []
    for name, module in model.named_modules():  # a shared layer is listed once, under its first position
        if id(module) in wanted:
            targets += [f"{name}.{sub}" for sub, child in module.named_modules() if isinstance(child, (nn.Linear, Conv1D))]
    return targets


def train_adapter(emulator: Emulator, config: TrainConfig, out_dir: str | Path, resume: bool = False) -> Path:
    """Train the emulator's adapter layers on ``config.task``; write the adapter directory.

    Everything but the adapter layers stays frozen (shared positions keep their one module).
    With ``config.lora`` the adapter layers get LoRA weights instead, merged into the layers
    before saving, so the adapter file always holds plain layer weights.
    ``resume=True`` continues ``<out_dir>.partial`` (or starts one when there is none).
    """
    emulator.freeze()
    model = emulator.model
    start = fingerprint(model)
    lora = {}

    def prepare() -> None:
        if config.lora:
            targets = _lora_targets(model, list(emulator.adapter_layers().values()))
            # here: peft costs every crashlm command 1.8 s at start-up (measured), and only --lora uses it
            from peft import LoraConfig, LoraModel

            lora_config = LoraConfig(r=config.lora, lora_alpha=2 * config.lora, lora_dropout=0.0, target_modules=targets)
            lora["model"] = LoraModel(model, lora_config, "default")  # injects in place; only LoRA weights train

    def write(result: TrainResult) -> None:
        if "model" in lora:
            lora["model"].merge_and_unload()  # the layers' own modules again, with the LoRA update merged
        save_adapter(emulator.adapter_layers(), out_dir, emulator.base_fingerprint, emulator.plan,
                     training=dict(result.record, lora_alpha=2 * config.lora if config.lora else None),
                     validation_curve=result.curve)

    try:
        return train_on_task(model, emulator.tokenizer, config, out_dir, resume, "adapter", start, write, prepare)
    finally:
        if "model" in lora and any("lora_" in name for name, _ in model.named_parameters()):
            lora["model"].unload()  # a failed run leaves the emulator without LoRA modules
        emulator.freeze()
