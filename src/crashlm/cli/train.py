"""``crashlm train`` (adapter on an emulator, or full fine-tuning) and ``crashlm distill`` (OFT + KD).

``train`` also runs under ``accelerate launch``, e.g. ``accelerate launch --config_file
configs/accelerate_cpu_2proc.yaml -m crashlm train ...`` (recipes in configs/README.md). Only
the main process prints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from crashlm.cli import app
from crashlm.cli._common import console
from crashlm.core.assets import DEFAULT_MODEL
from crashlm.core.errors import UsageError


def _print(text: str) -> None:
    import torch
    from accelerate import PartialState

    # The same cpu flag as the training's Accelerator: the first PartialState fixes the backend.
    if PartialState(cpu=not torch.cuda.is_available()).is_main_process:
        console.print(text, markup=False, highlight=False, soft_wrap=True)


@app.command()
def train(
    out: Path = typer.Option(..., "--out", help="Directory to write: the adapter (with --emulator) or a HF model (with --full)."),
    task: str = typer.Option(..., "--task", help="Task whose TRAIN split is the training data (validation docs held out from it)."),
    emulator: Optional[Path] = typer.Option(None, "--emulator", help="Emulator bundle whose adapter layers train."),
    model: Optional[str] = typer.Option(None, "--model", help="Full model to fine-tune entirely (needs --full)."),
    full: bool = typer.Option(False, "--full", help="Full fine-tuning of --model (the Full FT baseline)."),
    train_samples: Optional[int] = typer.Option(None, "--train-samples", help="At most this many training docs. Default: all."),
    val_samples: int = typer.Option(200, "--val-samples", help="Training docs held out for the validation loss."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Passes over the training docs. Default: 1."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Optimizer steps (instead of --epochs)."),
    lr: float = typer.Option(1e-4, "--lr", help="Peak learning rate of AdamW."),
    batch_size: int = typer.Option(8, "--batch-size", help="Examples per micro-batch and process."),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Micro-batches accumulated per optimizer step."),
    seed: int = typer.Option(1, "--seed", help="Seed of data order and initialisation (not of the validation split)."),
    lora: Optional[int] = typer.Option(None, "--lora", help="Train LoRA weights of this rank on the adapter layers, merged before saving. Default: off."),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", help="Validation loss every K optimizer steps. Default: at the end of each epoch."),
    max_length: int = typer.Option(256, "--max-length", help="Tokens the model reads per example at most; a longer one loses the start of its context, as evaluation with the same --max-length does."),
    weight_decay: float = typer.Option(0.0, "--weight-decay", help="AdamW weight decay."),
    warmup_ratio: float = typer.Option(0.06, "--warmup-ratio", help="Share of the steps spent warming up the learning rate."),
    schedule: str = typer.Option("cosine", "--schedule", help="Learning-rate schedule after warmup: cosine or linear."),
    grad_clip: float = typer.Option(1.0, "--grad-clip", help="Gradient norm clipping (0: off)."),
    checkpoint_every: int = typer.Option(100, "--checkpoint-every", help="Resumable checkpoint every N steps (also at every validation)."),
    no_bf16: bool = typer.Option(False, "--no-bf16", help="Train in fp32. Default: bf16 autocast where the device has native bf16 (GPUs, CPUs with AVX512-BF16/AMX), else fp32."),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted run kept in OUT.partial (starts fresh when there is none)."),
) -> None:
    """Train adapter layers on an emulator, or fine-tune a full model; keep the best checkpoint by validation loss."""
    from crashlm.core.io import read_json
    from crashlm.emulators.plugin import ADAPTER_META
    from crashlm.training.loop import (
        TRAINING_META,
        TrainConfig,
        checkpoint_dir,
        train_adapter,
        train_full,
    )

    if (emulator is None) == (model is None):
        raise UsageError("give --emulator DIR (adapter training) or --model M --full (full fine-tuning)")
    if model is not None and not full:
        raise UsageError("--model trains every weight: add --full (to train an adapter, give --emulator)")
    if emulator is not None and full:
        raise UsageError("--full fine-tunes a full model: give --model, not --emulator")
    if epochs is not None and max_steps is not None:
        raise UsageError("give --epochs or --max-steps, not both")
    config = TrainConfig(
        task=task, train_samples=train_samples, val_samples=val_samples, epochs=epochs or 1, max_steps=max_steps,
        lr=lr, batch_size=batch_size, grad_accum=grad_accum, seed=seed, max_length=max_length,
        weight_decay=weight_decay, warmup_ratio=warmup_ratio, schedule=schedule, grad_clip=grad_clip,
        eval_every=eval_every, lora=lora, bf16=not no_bf16, checkpoint_every=checkpoint_every,
    )
    config.validate()  # before loading any model
    if resume and checkpoint_dir(out).exists():
        _print(f"resuming from {checkpoint_dir(out)}")
    if emulator is not None:
        from crashlm.emulators.emulator import load_emulator

        emu = load_emulator(emulator)
        train_adapter(emu, config, out, resume=resume)
        meta_name, what = ADAPTER_META, f"adapter layers {sorted(emu.adapter_layers())} of {emulator}"
    else:
        from crashlm.core.models import load_model

        full_model, tokenizer = load_model(model)
        train_full(full_model, tokenizer, config, out, resume=resume)
        meta_name, what = TRAINING_META, f"all weights of {model}"
    record = read_json(out / meta_name, "training record")["training"]
    _print(
        f"trained {what} on {task}: {record['steps']} steps x {record['num_processes']} process(es), "
        f"{record['train_examples']} training / {record['val_examples']} validation docs, "
        f"{record['tokens_per_second']:.0f} tokens/s ({'bf16 autocast' if record['mixed_precision'] == 'bf16' else 'fp32'})"
    )
    _print(
        f"validation loss {record['initial_val_loss']:.4f} at step 0, best {record['best_val_loss']:.4f} at step "
        f"{record['best_step']} (kept); wrote {out}"
    )


@app.command()
def distill(
    emulator: Path = typer.Option(..., "--emulator", help="Emulator bundle to distil (its non-adapter layers train)."),
    out: Path = typer.Option(..., "--out", help="New emulator bundle directory to write."),
    model: Optional[str] = typer.Option(
        None, "--model", help=f"The full model (teacher). Default: the model named in the bundle's plan, else {DEFAULT_MODEL}."
    ),
    steps: int = typer.Option(100, "--steps", help="Optimizer steps."),
    batch_size: int = typer.Option(8, "--batch-size", help="Texts per step."),
    lr: float = typer.Option(1e-4, "--lr", help="Peak learning rate of AdamW (cosine schedule, 6 % warmup)."),
    text_task: str = typer.Option("boolq", "--text-task", help="Task whose TRAIN contexts are the distillation text."),
    max_length: int = typer.Option(256, "--max-length", help="Truncate texts to this many tokens."),
    seed: int = typer.Option(1, "--seed", help="Seed of the text order."),
    no_bf16: bool = typer.Option(False, "--no-bf16", help="Run in fp32. Default: bf16 autocast where the device has native bf16, else fp32."),
) -> None:
    """OFT knowledge distillation of an emulator from the full model: 1.0 * LM + 30 * KD (Xiao et al. 2023)."""
    from crashlm.core.models import load_model
    from crashlm.core.tasks import load_examples
    from crashlm.emulators.emulator import load_emulator, save_bundle
    from crashlm.training.loop import distill_emulator, distillation_loss

    if out.exists():
        raise UsageError(f"{out} already exists; choose another --out or remove it")
    if steps <= 0 or batch_size <= 0 or max_length < 8:
        raise UsageError("--steps and --batch-size must be positive and --max-length at least 8")
    emu = load_emulator(emulator)
    texts = [ex.context for ex in load_examples(text_task, "train", limit=steps * batch_size)]
    spec = model or emu.plan.model or DEFAULT_MODEL
    teacher, _ = load_model(spec)
    probe = texts[:batch_size]
    before = distillation_loss(teacher, emu, probe, batch_size, max_length, bf16=not no_bf16)
    distill_emulator(teacher, emu, texts, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                     max_length=max_length, bf16=not no_bf16)
    after = distillation_loss(teacher, emu, probe, batch_size, max_length, bf16=not no_bf16)
    save_bundle(emu, out)
    _print(f"distilled {emulator} from {spec}: {steps} steps on {len(texts)} {text_task} texts; on the first batch "
           f"KD {before['kd']:.4f} -> {after['kd']:.4f}, LM {before['lm']:.4f} -> {after['lm']:.4f}; wrote {out}")
