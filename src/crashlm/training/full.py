"""Full fine-tuning (the Full FT baseline): every weight trains; the output is a HF model directory."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from crashlm.core.errors import UsageError
from crashlm.core.io import atomic_dir, write_json
from crashlm.core.models import fingerprint
from crashlm.training.config import TrainConfig
from crashlm.training.loop import TrainResult
from crashlm.training.task import train_on_task

FULL_FORMAT = "crashlm-full-finetune"
TRAINING_META = "training.json"


def train_full(model: nn.Module, tokenizer, config: TrainConfig, out_dir: str | Path, resume: bool = False) -> Path:
    """Fine-tune every parameter of ``model`` on ``config.task``; write a HF model directory.

    The directory holds the best weights by validation loss (``save_pretrained``), the tokenizer
    and ``training.json`` (configuration, validation curve, summary). ``model`` ends with the
    best weights too, except under FSDP, where only the directory has them.
    ``resume=True`` continues ``<out_dir>.partial`` (or starts one when there is none).
    """
    if config.lora:
        raise UsageError("LoRA applies to adapter training; full fine-tuning trains every weight")
    start = fingerprint(model)
    model.requires_grad_(True)

    def write(result: TrainResult) -> None:
        with atomic_dir(Path(out_dir)) as tmp:
            model.save_pretrained(tmp, state_dict=result.weights)
            tokenizer.save_pretrained(tmp)
            write_json(tmp / TRAINING_META, {"format": FULL_FORMAT, "base_fingerprint": start,
                                             "training": result.record, "validation_curve": result.curve})

    return train_on_task(model, tokenizer, config, out_dir, resume, "full", start, write)
