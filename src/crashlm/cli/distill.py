"""``crashlm distill``: OFT's knowledge distillation of any emulator bundle from its full model."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from crashlm.cli import app
from crashlm.cli._common import print_main
from crashlm.cli._settings import with_settings
from crashlm.core.assets import DEFAULT_MODEL
from crashlm.core.models import load_model
from crashlm.emulators.bundle import load_emulator
from crashlm.emulators.distill import DistillConfig, calibration_inputs, distill_emulator
from crashlm.training.checkpoint import check_output, checkpoint_dir


@app.command()
@with_settings(DistillConfig)
def distill(
    emulator: Path = typer.Option(..., "--emulator", help="Emulator bundle to distil (its non-adapter layers train)."),
    out: Path = typer.Option(
        ..., "--out", help="New emulator bundle directory; re-running the same command continues an interrupted run."
    ),
    model: Optional[str] = typer.Option(
        None, "--model", help=f"The full model (teacher). Default: the model named in the bundle's plan, else {DEFAULT_MODEL}."
    ),
    *,
    config: DistillConfig,
) -> None:
    """OFT knowledge distillation of an emulator from the full model: 1.0 * LM + 30 * KD on calibration text."""
    config.validate()
    check_output(out, resume=True)  # before loading anything
    texts, val_texts = calibration_inputs(config)
    emu = load_emulator(emulator)
    spec = model or emu.plan.model or DEFAULT_MODEL
    teacher, _ = load_model(spec)
    if checkpoint_dir(out).exists():
        print_main(f"resuming from {checkpoint_dir(out)}")
    record = distill_emulator(teacher, emu, texts, config, val_texts=val_texts, out_dir=out, fidelity=True)
    before, after = record["before"], record["after"]
    print_main(f"distilled {emulator} from {spec} on {len(texts)} calibration paragraphs: kept step "
               f"{record['chosen_step']} of {config.steps} (best held-out LM loss on {len(val_texts)} paragraphs); "
               f"held-out KD {before['kd']:.4f} -> {after['kd']:.4f}, LM {before['lm']:.4f} -> {after['lm']:.4f}; "
               f"wrote {out}")
