"""``crashlm offsite``: the paper's comparison table from one command."""

from __future__ import annotations

from pathlib import Path

import typer

from crashlm.cli import app
from crashlm.cli._common import console, parse_int_list, parse_list
from crashlm.core.assets import DEFAULT_MODEL
from crashlm.emulators.plans import DEFAULT_TRAINABLE


@app.command()
def offsite(
    out: Path = typer.Option(..., "--out", help="Run directory; re-running with the same settings continues where it stopped."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", help="Base model (alias, HF dir, .gguf, hub id)."),
    tasks: str = typer.Option("piqa", "--tasks", help="Comma-separated tasks (need a train split)."),
    strategies: str = typer.Option("uniform,crash,crash-share", "--strategies", help="Emulator strategies: uniform, crash (w/o sharing), crash-share."),
    full_ft: bool = typer.Option(True, "--full-ft/--no-full-ft", help="Include the full fine-tuning upper baseline."),
    distill: bool = typer.Option(False, "--distill", help="Add the OFT + KD row (uniform emulator distilled on offline text)."),
    k: int = typer.Option(None, "--k", help="Kept layers per emulator (default: half the layers)."),
    trainable: int = typer.Option(DEFAULT_TRAINABLE, "--trainable", help="Trainable (adapter) layers."),
    similarity_samples: int = typer.Option(128, "--similarity-samples", help="Training examples used for the CRaSh similarity."),
    train_samples: int = typer.Option(2000, "--train-samples", help="Training examples per task."),
    val_samples: int = typer.Option(200, "--val-samples", help="Validation examples for the validation loss (checkpoint selection)."),
    epochs: int = typer.Option(1, "--epochs", help="Training epochs (ignored when --max-steps is given)."),
    max_steps: int = typer.Option(None, "--max-steps", help="Optimizer steps per training run."),
    lr: float = typer.Option(1e-4, "--lr", help="Learning rate (AdamW, cosine schedule)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Training batch size."),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Gradient accumulation steps."),
    eval_every: int = typer.Option(
        None, "--eval-every", help="Validation loss every K optimizer steps (best kept). Default: at the end of each epoch."
    ),
    eval_limit: int = typer.Option(300, "--eval-limit", help="Evaluation items per task (0 < N; omit the option for the default)."),
    eval_split: str = typer.Option(None, "--eval-split", help="Evaluation split (default: each task's paper split)."),
    seeds: str = typer.Option("1", "--seeds", help="Comma-separated seeds for the trained rows."),
    distill_steps: int = typer.Option(100, "--distill-steps", help="Distillation steps for --distill."),
    max_length: int = typer.Option(256, "--max-length", help="Tokens the model reads per example at most, in training, validation and evaluation alike."),
) -> None:
    """Plans, emulators, training, plug-in and evaluation -> RUN_DIR/table.{json,md,png}."""
    from crashlm.experiments.offsite import OffsiteConfig, run_offsite
    from crashlm.outputs.tables import table_markdown

    config = OffsiteConfig(
        model=model, tasks=parse_list(tasks, "--tasks"), strategies=parse_list(strategies, "--strategies"),
        full_ft=full_ft, distill=distill, k=k, trainable=trainable, similarity_samples=similarity_samples,
        train_samples=train_samples, val_samples=val_samples, epochs=epochs, max_steps=max_steps, lr=lr,
        batch_size=batch_size, grad_accum=grad_accum, eval_every=eval_every, eval_limit=eval_limit, eval_split=eval_split,
        seeds=parse_int_list(seeds, "--seeds"), distill_steps=distill_steps, max_length=max_length,
    )
    table = run_offsite(config, out, console)
    console.print(table_markdown(table))
    console.print(f"wrote {out / 'table.json'}, {out / 'table.md'}, {out / 'table.png'}")
