"""``crashlm distill``: OFT's knowledge distillation of an emulator from its full model."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from crashlm.cli import app
from crashlm.cli._common import print_main
from crashlm.cli._settings import with_settings
from crashlm.core.assets import DEFAULT_MODEL
from crashlm.core.errors import UsageError
from crashlm.core.models import load_model
from crashlm.emulators.bundle import load_emulator, save_bundle
from crashlm.emulators.distill import DistillConfig, distill_emulator, distillation_loss, distillation_texts


@app.command()
@with_settings(DistillConfig)
def distill(
    emulator: Path = typer.Option(..., "--emulator", help="Emulator bundle to distil (its non-adapter layers train)."),
    out: Path = typer.Option(..., "--out", help="New emulator bundle directory to write."),
    model: Optional[str] = typer.Option(
        None, "--model", help=f"The full model (teacher). Default: the model named in the bundle's plan, else {DEFAULT_MODEL}."
    ),
    *,
    config: DistillConfig,
) -> None:
    """OFT knowledge distillation of an emulator from the full model: 1.0 * LM + 30 * KD (Xiao et al. 2023)."""
    if out.exists():
        raise UsageError(f"{out} already exists; choose another --out or remove it")
    config.validate()
    emu = load_emulator(emulator)
    texts = distillation_texts(config)
    spec = model or emu.plan.model or DEFAULT_MODEL
    teacher, _ = load_model(spec)
    probe = texts[: config.batch_size]
    before = distillation_loss(teacher, emu, probe, config)
    distill_emulator(teacher, emu, texts, config)
    after = distillation_loss(teacher, emu, probe, config)
    save_bundle(emu, out)
    print_main(f"distilled {emulator} from {spec}: {config.steps} steps on {len(texts)} {config.text_task} texts; on the "
               f"first batch KD {before['kd']:.4f} -> {after['kd']:.4f}, LM {before['lm']:.4f} -> {after['lm']:.4f}; wrote {out}")
