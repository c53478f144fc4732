"""``crashlm emulator``: the model owner builds an emulator bundle from a layer plan."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from crashlm.analysis.similarity import SimilarityResult
from crashlm.cli import app
from crashlm.cli._common import DTYPES, console, parse_dtype, parse_k, positive
from crashlm.core.assets import DEFAULT_MODEL
from crashlm.core.errors import UsageError
from crashlm.core.io import check_output_dir
from crashlm.core.models import load_model
from crashlm.core.settings import check_choice
from crashlm.core.tasks import ANALYSIS_SPLIT
from crashlm.emulators.bundle import save_bundle
from crashlm.emulators.emulator import build_emulator
from crashlm.emulators.fidelity import spec_fidelity
from crashlm.emulators.plans import DEFAULT_TRAINABLE, EmulatorSpec, LayerPlan, Sharing
from crashlm.emulators.strategies import (
    DEFAULT_CALIBRATION_SAMPLES,
    DEFAULT_MAX_LOSS_INCREASE,
    SHARE_SUFFIX,
    SIMILARITY,
    STRATEGIES,
    get_strategy,
    plan_for,
)

REPRESENTATIVES = ("middle", "loss")


@app.command()
def emulator(
    out: Path = typer.Option(..., "--out", help="Bundle directory to write (what the data owner receives)."),
    model: Optional[str] = typer.Option(
        None, "--model", help=f"Full model (alias, HF dir, .gguf, hub id). Default: the plan's model, else {DEFAULT_MODEL}."
    ),
    strategy: str = typer.Option(
        "crash-share", "--strategy",
        help=f"{', '.join(STRATEGIES)}; any of them with sharing as <name>-share (docs/emulators.md). "
             "With --plan it only decides sharing.",
    ),
    plan: Optional[Path] = typer.Option(None, "--plan", help="A plan.json from `crashlm cluster` (else one is made here)."),
    k: Optional[str] = typer.Option(
        None, "--k", help="Kept layers K, or 'auto': the smallest K whose untrained emulator's calibration loss is "
                          "within --max-loss-increase of the full model's. Default: half the layers, rounded.",
    ),
    max_loss_increase: float = typer.Option(
        DEFAULT_MAX_LOSS_INCREASE, "--max-loss-increase", help="--k auto: allowed relative increase of the calibration loss.",
    ),
    trainable: int = typer.Option(DEFAULT_TRAINABLE, "--trainable", help="Trainable (adapter) layers among the K."),
    share: bool = typer.Option(False, "--share", help="Fill removed positions with the nearest kept layer (any strategy)."),
    share_trainable: bool = typer.Option(
        False, "--share-trainable",
        help="With sharing: removed positions next to a trainable layer reuse it (tied) instead of a frozen copy.",
    ),
    representative: str = typer.Option(
        "middle", "--representative", help="crash strategies: each cluster keeps its middle layer, or 'loss': the member "
                                           "whose removal costs the most calibration loss.",
    ),
    calibration_samples: int = typer.Option(
        DEFAULT_CALIBRATION_SAMPLES, "--calibration-samples",
        help="Calibration paragraphs for strategies that score removals, and --k auto."
    ),
    fidelity: bool = typer.Option(True, "--fidelity/--no-fidelity", help="Measure the emulator's fidelity (crashlm.json)."),
    similarity: Optional[Path] = typer.Option(
        None, "--similarity", help="A similarity.json from `crashlm similarity` (crash strategies; else computed)."
    ),
    task: str = typer.Option("piqa", "--task", help="Task whose examples drive the similarity."),
    split: str = typer.Option(
        ANALYSIS_SPLIT, "--split", help="The task's split they come from (default train: no evaluation item)."
    ),
    samples: int = typer.Option(512, "--samples", help="Examples for the similarity (at least 4)."),
    pooling: str = typer.Option("mean_weighted", "--pooling", help="Token pooling for CKA: mean, mean_weighted, last, max."),
    dtype: str = typer.Option("float32", "--dtype", help=f"Weights dtype of the bundle: {', '.join(DTYPES)}."),
) -> None:
    """Build an emulator from a layer plan and save its bundle (no removed layer's weights)."""
    check_choice(representative, REPRESENTATIVES, "--representative")
    if representative == "loss":
        if get_strategy(strategy).rule != "crash":
            raise UsageError("--representative loss applies to the crash strategies only")
        strategy = strategy.replace("crash", "crash-loss", 1)
    if share and not strategy.endswith(SHARE_SUFFIX):
        strategy += SHARE_SUFFIX
    entry = get_strategy(strategy)
    check_output_dir(out)  # refuse a directory that is not ours before any work
    k_value = parse_k(k)
    positive(trainable, "--trainable", allow_none=False)
    positive(samples, "--samples", allow_none=False)
    positive(calibration_samples, "--calibration-samples", allow_none=False)
    torch_dtype = parse_dtype(dtype)
    if share_trainable and not entry.shares:
        raise UsageError("--share-trainable needs sharing: add --share or choose a <name>-share strategy")
    if similarity is not None and SIMILARITY not in entry.needs:
        readers = ", ".join(name for name, s in STRATEGIES.items() if SIMILARITY in s.needs)
        raise UsageError(f"--similarity applies to the crash strategies ({readers}); {strategy} ignores layer similarity")
    if plan is not None and (k_value is not None or similarity is not None):
        raise UsageError("--plan already fixes the layers: drop --k and --similarity")
    layer_plan = LayerPlan.load(plan) if plan is not None else None
    sim = None
    if similarity is not None:
        sim = SimilarityResult.load(similarity)
    spec = model or (layer_plan.model if layer_plan else None) or DEFAULT_MODEL

    full_model, tokenizer = load_model(spec)  # fp32: the plan does not depend on the bundle's dtype
    full_parameters = sum(p.numel() for p in full_model.parameters())
    if layer_plan is None:
        layer_plan = plan_for(full_model, strategy, k_value, trainable, sim, task=task, samples=samples,
                              pooling=pooling, model_name=spec, split=split, tokenizer=tokenizer,
                              max_loss_increase=max_loss_increase, calibration_samples=calibration_samples)
    sharing = Sharing.TIED if share_trainable else entry.sharing
    emulator_spec = EmulatorSpec(layer_plan, sharing)
    # Measured before building (which consumes the full model): an untrained emulator is its slots' layers.
    measured = spec_fidelity(full_model, tokenizer, {"emulator": emulator_spec})["emulator"] if fidelity else None
    full_model.to(torch_dtype)
    emu = build_emulator(full_model, tokenizer, emulator_spec)
    save_bundle(emu, out, {"fidelity": measured.to_dict()} if measured else None)

    summary = emu.summary()
    console.print(
        f"{strategy} emulator of {spec}: {summary['positions']} positions, {summary['unique_layers']} unique layers "
        f"(full model: {layer_plan.num_layers} layers)"
    )
    console.print(
        f"parameters {summary['parameters']:,} of {full_parameters:,} "
        f"({100 * summary['parameters'] / full_parameters:.1f} %), trainable {summary['trainable_parameters']:,}"
    )
    console.print(f"kept: {layer_plan.kept}\ntrainable: {layer_plan.trainable}")
    if measured is not None:
        console.print(f"fidelity on {measured.texts} held-out calibration paragraphs: loss {measured.loss:.3f} "
                      f"(full model {measured.full_loss:.3f}), KL {measured.kl:.3f}, top-1 agreement {measured.top1:.3f}")
    console.print(f"wrote {out}")
