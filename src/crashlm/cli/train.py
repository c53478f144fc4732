"""``crashlm train`` (adapter on an emulator, or full fine-tuning) and ``crashlm distill`` (OFT + KD).

``train`` also runs under ``accelerate launch``, e.g. ``accelerate launch --config_file
configs/accelerate_cpu_2proc.yaml -m crashlm train ...`` (recipes in configs/README.md). Only
the main process prints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import typer
from accelerate import PartialState

from crashlm.cli import app
from crashlm.cli._common import console
from crashlm.cli._settings import with_settings
from crashlm.core.assets import DEFAULT_MODEL
from crashlm.core.errors import UsageError
from crashlm.core.io import read_json
from crashlm.core.models import load_model
from crashlm.core.tasks import load_examples
from crashlm.emulators.bundle import load_emulator, save_bundle
from crashlm.emulators.plugin import ADAPTER_META
from crashlm.training.checkpoint import checkpoint_dir
from crashlm.training.config import TrainConfig


def _print(text: str) -> None:
    # The same cpu flag as the training's Accelerator: the first PartialState fixes the backend.
    if PartialState(cpu=not torch.cuda.is_available()).is_main_process:
        console.print(text, markup=False, highlight=False, soft_wrap=True)


@app.command()
@with_settings(TrainConfig, defaults={"task": ...}, exclude=("data_source",))
def train(
    ctx: typer.Context,
    out: Path = typer.Option(..., "--out", help="Directory to write: the adapter (with --emulator) or a HF model (with --full)."),
    emulator: Optional[Path] = typer.Option(None, "--emulator", help="Emulator bundle whose adapter layers train."),
    model: Optional[str] = typer.Option(None, "--model", help="Full model to fine-tune entirely (needs --full)."),
    full: bool = typer.Option(False, "--full", help="Full fine-tuning of --model (the Full FT baseline)."),
    resume: bool = typer.Option(
        False, "--resume", help="Continue the interrupted run kept in OUT.partial (starts fresh when there is none)."
    ),
    *,
    config: TrainConfig,
) -> None:
    """Train adapter layers on an emulator, or fine-tune a full model; keep the best checkpoint by validation loss."""
    # here: both pull in peft (1.5 s, via the training loop) on every command otherwise
    from crashlm.emulators.finetune import train_adapter
    from crashlm.training.full import TRAINING_META, train_full

    if (emulator is None) == (model is None):
        raise UsageError("give --emulator DIR (adapter training) or --model M --full (full fine-tuning)")
    if model is not None and not full:
        raise UsageError("--model trains every weight: add --full (to train an adapter, give --emulator)")
    if emulator is not None and full:
        raise UsageError("--full fine-tunes a full model: give --model, not --emulator")
    # By name: typer vendors its own click, whose ParameterSource is not importable publicly.
    if config.max_steps is not None and ctx.get_parameter_source("epochs").name == "COMMANDLINE":
        raise UsageError("give --epochs or --max-steps, not both")
    config.validate()  # before loading any model
    if resume and checkpoint_dir(out).exists():
        _print(f"resuming from {checkpoint_dir(out)}")
    if emulator is not None:
        emu = load_emulator(emulator)
        train_adapter(emu, config, out, resume=resume)
        meta_name, what = ADAPTER_META, f"adapter layers {sorted(emu.adapter_layers())} of {emulator}"
    else:
        full_model, tokenizer = load_model(model)
        train_full(full_model, tokenizer, config, out, resume=resume)
        meta_name, what = TRAINING_META, f"all weights of {model}"
    record = read_json(out / meta_name, "training record")["training"]
    _print(
        f"trained {what} on {config.task}: {record['steps']} steps x {record['num_processes']} process(es), "
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
    no_bf16: bool = typer.Option(
        False, "--no-bf16", help="Run in fp32. Default: bf16 autocast where the device has native bf16, else fp32."
    ),
) -> None:
    """OFT knowledge distillation of an emulator from the full model: 1.0 * LM + 30 * KD (Xiao et al. 2023)."""
    # here: crashlm.emulators.distill pulls in peft (1.5 s, via the training loop) on every command otherwise
    from crashlm.emulators.distill import distill_emulator, distillation_loss

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
