"""Training on a task's answer tokens: what adapter training and full fine-tuning share.

The loss is the mean cross-entropy over the answer tokens of the task's single formatting
(:func:`crashlm.core.scoring.encode_example`), so training sees exactly what evaluation scores.
The data follow :mod:`crashlm.training.data`, the validation loss is the same answer-token loss
on the held-out docs, and the run checkpoints into ``<out>.partial`` so it can resume.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn

from crashlm.core.attention import training_attention
from crashlm.core.models import held_in_bf16
from crashlm.core.scoring import (
    batch_answer_loss,
    collate,
    encode_example,
    mean_answer_loss,
    pad_token_id,
)
from crashlm.training.checkpoint import CheckpointStore, check_output
from crashlm.training.config import TrainConfig
from crashlm.training.data import MicroBatches, split_examples
from crashlm.training.loop import TrainingLoop, TrainResult, warmup_schedule
from crashlm.training.runtime import accelerator, sharding

# Settings that do not change a run's result: a resumed run may use other values.
VOLATILE_SETTINGS = ("checkpoint_every",)


def _validation(acc: Accelerator, shards: str | None, tokenizer, val: Sequence,
                config: TrainConfig) -> Callable[[nn.Module], float]:
    """Mean answer-token loss on the held-out docs, each process scoring its share."""
    autocast = torch.bfloat16 if acc.mixed_precision == "bf16" else None
    shard = val[acc.process_index :: acc.num_processes]
    # The weight of this process's mean: its answer tokens, the same at every validation.
    count = sum(encode_example(tokenizer, ex, config.max_length).num_answer_tokens for ex in shard)

    def validate(model: nn.Module) -> float:
        if shards == "fsdp":
            # FSDP's forward is a collective: every process scores every doc through the wrapped model.
            return mean_answer_loss(model, tokenizer, val, batch_size=config.batch_size,
                                    max_length=config.max_length, autocast_dtype=autocast)
        total = 0.0
        if shard:
            mean = mean_answer_loss(acc.unwrap_model(model), tokenizer, shard, batch_size=config.batch_size,
                                    max_length=config.max_length, autocast_dtype=autocast)
            total = mean * count
        sums = acc.reduce(torch.tensor([total, count], dtype=torch.float64, device=acc.device), "sum")
        return float(sums[0] / sums[1])

    return validate


def train_on_task(model: nn.Module, tokenizer, config: TrainConfig, out_dir: str | Path, resume: bool, kind: str,
                  start_fingerprint: str, write: Callable[[TrainResult], None],
                  prepare: Callable[[], None] | None = None) -> Path:
    """Train ``model``'s parameters that require grad on ``config.task``; ``write(result)`` writes the output.

    ``write`` runs on the main process only, after which the working directory goes. ``prepare``
    runs after seeding and before the trainable parameters are collected (LoRA injection draws
    random numbers and adds parameters). ``kind`` ("adapter", "full") is recorded with the run.
    """
    config.validate()
    out_dir = Path(out_dir)
    check_output(out_dir, resume)
    set_seed(config.seed)
    if prepare is not None:
        prepare()
    acc = accelerator(config.bf16, config.grad_accum)
    shards = sharding(acc, config.batch_size, kind)
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    train, val = split_examples(config)
    pairs = [encode_example(tokenizer, ex, config.max_length) for ex in train]
    lengths = [len(p.input_ids) for p in pairs] if config.group_by_length else None
    micro = MicroBatches(pairs, config.batch_size, config.grad_accum, acc.num_processes, acc.process_index, config.seed,
                         lengths)
    pad_id = pad_token_id(tokenizer)

    def batches(step: int) -> list[dict[str, torch.Tensor]]:
        return [{k: v.to(acc.device) for k, v in collate(chunk, pad_id).items()} for chunk in micro(step)]

    identity = {"kind": kind, "start_fingerprint": start_fingerprint, "num_processes": acc.num_processes,
                "trainable": sorted(params)}
    bf16 = acc.mixed_precision == "bf16"
    # Under DeepSpeed the engine owns the weights' dtypes; FSDP trains everything (nothing is frozen).
    with held_in_bf16(model, bf16 and shards is None) as in_bf16, training_attention(model, bf16) as attention:
        loop = TrainingLoop(
            acc, model, params, batch_answer_loss, batches, config.max_steps or config.epochs * micro.steps_per_epoch,
            lr=config.lr, weight_decay=config.weight_decay, schedule=warmup_schedule(config.schedule, config.warmup_ratio),
            grad_clip=config.grad_clip, validate=_validation(acc, shards, tokenizer, val, config),
            eval_every=config.eval_every or micro.steps_per_epoch, steps_per_epoch=micro.steps_per_epoch,
            store=CheckpointStore(out_dir, acc, config.to_dict(), identity, VOLATILE_SETTINGS),
            checkpoint_every=config.checkpoint_every, sharding=shards, name=f"{kind} training",
        )
        result = loop.run()
    result.record = {
        "kind": kind, "config": config.to_dict(), "steps": loop.total_steps, "steps_per_epoch": micro.steps_per_epoch,
        "train_examples": len(pairs), "val_examples": len(val),
        # Examples longer than max_length lose the start of their context, as in evaluation.
        "truncated_train_examples": sum(p.truncated for p in pairs), "frozen_parameters_in_bf16": in_bf16,
        "attention": attention,
        **result.record,
    }
    if acc.is_main_process:
        write(result)
        loop.store.remove()
    acc.wait_for_everyone()
    return out_dir
