"""``crashlm emulator``: the model owner builds an emulator bundle from a layer plan."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from crashlm.analysis.similarity import SimilarityResult
from crashlm.cli import app
from crashlm.cli._common import DTYPES, console, parse_dtype, positive
from crashlm.core.assets import DEFAULT_MODEL
from crashlm.core.errors import UsageError
from crashlm.core.io import check_output_dir
from crashlm.core.models import load_model
from crashlm.core.tasks import ANALYSIS_SPLIT
from crashlm.emulators.bundle import save_bundle
from crashlm.emulators.emulator import build_emulator
from crashlm.emulators.plans import DEFAULT_TRAINABLE, EmulatorSpec, LayerPlan, Sharing
from crashlm.emulators.strategies import SIMILARITY, STRATEGIES, get_strategy, plan_for


@app.command()
def emulator(
    out: Path = typer.Option(..., "--out", help="Bundle directory to write (what the data owner receives)."),
    model: Optional[str] = typer.Option(
        None, "--model", help=f"Full model (alias, HF dir, .gguf, hub id). Default: the plan's model, else {DEFAULT_MODEL}."
    ),
    strategy: str = typer.Option(
        "crash-share", "--strategy",
        help="uniform (Offsite-Tuning drop), crash (CRaSh w/o sharing) or crash-share (CRaSh, full depth). "
             "With --plan it only decides sharing.",
    ),
    plan: Optional[Path] = typer.Option(None, "--plan", help="A plan.json from `crashlm cluster` (else one is made here)."),
    k: Optional[int] = typer.Option(None, "--k", help="Kept layers K. Default: half the layers, rounded."),
    trainable: int = typer.Option(DEFAULT_TRAINABLE, "--trainable", help="Trainable (adapter) layers among the K."),
    share_trainable: bool = typer.Option(
        False, "--share-trainable",
        help="crash-share: removed positions next to a trainable layer reuse it (tied) instead of a frozen copy.",
    ),
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
    entry = get_strategy(strategy)
    check_output_dir(out)  # refuse a directory that is not ours before any work
    positive(k, "--k")
    positive(trainable, "--trainable", allow_none=False)
    positive(samples, "--samples", allow_none=False)
    torch_dtype = parse_dtype(dtype)
    if share_trainable and not entry.shares:
        sharers = " or ".join(name for name, s in STRATEGIES.items() if s.shares)
        raise UsageError(f"--share-trainable applies to --strategy {sharers} only")
    if similarity is not None and SIMILARITY not in entry.needs:
        readers = ", ".join(name for name, s in STRATEGIES.items() if SIMILARITY in s.needs)
        raise UsageError(f"--similarity applies to the crash strategies ({readers}); {strategy} ignores layer similarity")
    if plan is not None and (k is not None or similarity is not None):
        raise UsageError("--plan already fixes the layers: drop --k and --similarity")
    layer_plan = LayerPlan.load(plan) if plan is not None else None
    sim = None
    if similarity is not None:
        sim = SimilarityResult.load(similarity)
    spec = model or (layer_plan.model if layer_plan else None) or DEFAULT_MODEL

    full_model, tokenizer = load_model(spec)  # fp32: the plan does not depend on the bundle's dtype
    full_parameters = sum(p.numel() for p in full_model.parameters())
    if layer_plan is None:
        layer_plan = plan_for(full_model, strategy, k, trainable, sim, task=task, samples=samples,
                              pooling=pooling, model_name=spec, split=split, tokenizer=tokenizer)
    full_model.to(torch_dtype)
    sharing = Sharing.TIED if share_trainable else entry.sharing
    emu = build_emulator(full_model, tokenizer, EmulatorSpec(layer_plan, sharing))
    save_bundle(emu, out)

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
    console.print(f"wrote {out}")
