"""The configuration of a training run: everything that decides what it produces, recorded with its output."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from crashlm.core.settings import Settings, setting
from crashlm.core.tasks import SOURCES, get_task

SCHEDULES = ("cosine", "linear")
# Micro-batches per window sorted by length (larger: less padding, less random batch composition).
LENGTH_GROUP_BATCHES = 16


@dataclass
class TrainConfig(Settings):
    """Everything that decides what a training run produces (recorded with its output)."""

    what: ClassVar[str] = "training"

    task: str = setting("", "Task whose TRAIN split is the training data (validation docs held out from it).")
    train_samples: int | None = setting(None, "At most this many training docs. Default: all but the validation docs.")
    val_samples: int = setting(
        200, "Training docs held out for the validation loss (a fixed permutation, the same for every seed)."
    )
    epochs: int = setting(1, "Passes over the training docs (ignored when --max-steps is given).")
    max_steps: int | None = setting(None, "Optimizer steps (instead of --epochs).")
    lr: float = setting(1e-4, "Peak learning rate of AdamW.")
    batch_size: int = setting(8, "Examples per micro-batch and process.")
    grad_accum: int = setting(1, "Micro-batches accumulated per optimizer step.")
    group_by_length: bool = setting(
        True, f"Batch examples of similar length together (sorted within windows of {LENGTH_GROUP_BATCHES} batches "
              "of the seeded order, the batches then shuffled): less padding, faster steps."
    )
    seed: int = setting(1, "Seed of data order and initialisation (not of the validation split).")
    max_length: int = setting(256, "Tokens the model reads per example at most; a longer one loses the start of its "
                                   "context, as evaluation with the same --max-length does.")
    weight_decay: float = setting(0.0, "AdamW weight decay.")
    warmup_ratio: float = setting(0.06, "Share of the steps spent warming up the learning rate.")
    schedule: str = setting("cosine", "Learning-rate schedule after warmup: cosine or linear.")
    grad_clip: float = setting(1.0, "Gradient norm clipping (0: off).")
    eval_every: int | None = setting(None, "Validation loss every K optimizer steps. Default: at the end of each epoch.")
    lora: int | None = setting(None, "Train LoRA weights of this rank on the adapter layers, merged before saving. Default: off.")
    bf16: bool = setting(True, "bf16 autocast where the device computes bf16 natively (GPUs, CPUs with AVX512-BF16/AMX), "
                               "else fp32; trainable weights and AdamW state stay fp32, frozen weights are held in "
                               "bf16 during the run.")
    data_source: str = setting("offline", "Where task data comes from: offline (the embedded data) or hub.")
    checkpoint_every: int = setting(100, "Resumable checkpoint every N optimizer steps (also at every validation).")

    def validate(self) -> None:
        get_task(self.task)
        self.check_choice("data_source", SOURCES)
        self.check_positive("val_samples", "epochs", "batch_size", "grad_accum", "checkpoint_every")
        self.check_positive("train_samples", "max_steps", "eval_every", "lora", optional=True)
        self.check_positive("max_length", minimum=8)
        self.check_number("lr", open_low=True)
        self.check_number("weight_decay")
        self.check_number("grad_clip")
        self.check_number("warmup_ratio", 0.0, 1.0, open_high=True)
        self.check_choice("schedule", SCHEDULES)
