"""``crashlm train``: adapter layers on an emulator, or full fine-tuning.

``train`` also runs under ``accelerate launch``, e.g. ``accelerate launch --config_file
configs/accelerate_cpu_2proc.yaml -m crashlm train ...`` (recipes in configs/README.md). Only
the main process prints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from crashlm.cli import app
from crashlm.cli._common import print_main
from crashlm.cli._settings import with_settings
from crashlm.core.errors import UsageError
from crashlm.core.io import read_json
from crashlm.core.models import load_model
from crashlm.emulators.bundle import load_emulator
from crashlm.emulators.finetune import train_adapter
from crashlm.emulators.plugin import ADAPTER_META
from crashlm.training.checkpoint import checkpoint_dir
from crashlm.training.config import TrainConfig
from crashlm.training.full import TRAINING_META, train_full


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
        print_main(f"resuming from {checkpoint_dir(out)}")
    if emulator is not None:
        emu = load_emulator(emulator)
        train_adapter(emu, config, out, resume=resume)
        meta_name, what = ADAPTER_META, f"adapter layers {sorted(emu.adapter_layers())} of {emulator}"
    else:
        full_model, tokenizer = load_model(model)
        train_full(full_model, tokenizer, config, out, resume=resume)
        meta_name, what = TRAINING_META, f"all weights of {model}"
    record = read_json(out / meta_name, "training record")["training"]
    print_main(
        f"trained {what} on {config.task}: {record['steps']} steps x {record['num_processes']} process(es), "
        f"{record['train_examples']} training / {record['val_examples']} validation docs, "
        f"{record['tokens_per_second']:.0f} tokens/s ({'bf16 autocast' if record['mixed_precision'] == 'bf16' else 'fp32'})"
    )
    print_main(
        f"validation loss {record['initial_val_loss']:.4f} at step 0, best {record['best_val_loss']:.4f} at step "
        f"{record['best_step']} (kept); wrote {out}"
    )
