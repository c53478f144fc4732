"""``crashlm cluster``: a CRaSh or uniform layer plan for a model."""

from __future__ import annotations

from pathlib import Path

import typer

from crashlm.analysis.similarity import SimilarityResult, compute_similarity
from crashlm.cli import app
from crashlm.cli._common import console, parse_dtype, parse_k, positive
from crashlm.core.assets import DEFAULT_MODEL
from crashlm.core.errors import UsageError
from crashlm.core.io import atomic_files, check_output_dir
from crashlm.core.models import load_config, load_model
from crashlm.core.tasks import ANALYSIS_SPLIT
from crashlm.emulators import plans
from crashlm.emulators.strategies import (
    DEFAULT_MAX_LOSS_INCREASE,
    SIMILARITY,
    SIMILARITY_SOURCES,
    STRATEGIES,
    get_strategy,
    plan_for,
)
from crashlm.outputs.plotting import plot_clusters

# What marks --out as crashlm's: an earlier plan, or the similarity the plan is made from.
OUT_MARKERS = ("plan.json", "similarity.json")


@app.command()
def cluster(
    out: Path = typer.Option(..., "--out", help="Output directory (plan.json, clusters.png)."),
    model: str = typer.Option(
        None, "--model",
        help=f"Model (alias, HF dir, .gguf, hub id). Default: the similarity file's model, else {DEFAULT_MODEL}.",
    ),
    k: str = typer.Option(
        None, "--k", help="Number of kept layers K, or 'auto' (the smallest K within --max-loss-increase of the full "
                          "model's calibration loss). Default: half the layers, rounded (the paper's emulator size).",
    ),
    max_loss_increase: float = typer.Option(
        DEFAULT_MAX_LOSS_INCREASE, "--max-loss-increase", help="--k auto: allowed relative increase of the calibration loss.",
    ),
    strategy: str = typer.Option("crash", "--strategy", help=f"{', '.join(STRATEGIES)} (docs/emulators.md)."),
    trainable: int = typer.Option(plans.DEFAULT_TRAINABLE, "--trainable", help="Number of trainable (adapter) layers."),
    auto: bool = typer.Option(False, "--auto", help="Pick K at the largest gap of the adjacent-layer dissimilarities."),
    similarity: Path = typer.Option(None, "--similarity", help="A similarity.json from `crashlm similarity` (else computed)."),
    similarity_source: str = typer.Option(
        "cka", "--similarity-source",
        help="cka (linear CKA) or lens (1 - normalised JS divergence of logit-lens distributions).",
    ),
    task: str = typer.Option("piqa", "--task", help="Task whose examples drive the similarity."),
    split: str = typer.Option(
        ANALYSIS_SPLIT, "--split", help="The task's split they come from (default train: no evaluation item)."
    ),
    samples: int = typer.Option(512, "--samples", help="Number of examples for the similarity."),
    pooling: str = typer.Option("mean_weighted", "--pooling", help="Token pooling for CKA: mean, mean_weighted, last, max."),
    batch_size: int = typer.Option(16, "--batch-size", help="Forward batch size."),
    dtype: str = typer.Option("float32", "--dtype", help="Weights / autocast dtype: float32 or bfloat16 (same fingerprint)."),
) -> None:
    """Cluster layers by similarity and keep one per cluster (CRaSh), or drop uniformly (OFT)."""
    reads_similarity = SIMILARITY in get_strategy(strategy).needs
    if similarity_source not in SIMILARITY_SOURCES:
        raise UsageError(f"unknown similarity source {similarity_source!r}; choose {' or '.join(SIMILARITY_SOURCES)}")
    k = parse_k(k)
    positive(trainable, "--trainable", allow_none=False)
    positive(samples, "--samples", allow_none=False)
    torch_dtype = parse_dtype(dtype)
    if auto and k is not None:
        raise UsageError("give either --k or --auto, not both")
    check_output_dir(out, OUT_MARKERS)

    sim = SimilarityResult.load(similarity) if reads_similarity and similarity is not None else None
    model_spec = model or (sim.model if sim else DEFAULT_MODEL)
    if reads_similarity and sim is None and similarity_source == "cka":
        if isinstance(k, int):  # fail before any long computation
            plans.check_k(k, load_config(model_spec).num_hidden_layers, trainable)
        # Before the full model loads: compute_similarity loads its own copy.
        sim = compute_similarity(model_spec, task=task, samples=samples, pooling=pooling, batch_size=batch_size,
                                 dtype=torch_dtype, split=split)
    full_model, tokenizer = load_model(model_spec, dtype=torch_dtype)
    plan = plan_for(full_model, strategy, "gap" if auto else k, trainable, sim, model_name=model_spec, tokenizer=tokenizer,
                    source=similarity_source, task=task, split=split, samples=samples, batch_size=batch_size,
                    max_loss_increase=max_loss_increase)
    depth, matrix = plan.num_layers, sim.cka if sim is not None else None

    with atomic_files(out, OUT_MARKERS) as staging:  # all files or none
        if sim is not None and similarity is None:
            sim.save(staging)
        plan.save(staging / "plan.json")
        plot_clusters(plan, staging / "clusters.png", matrix=matrix)
    console.print(f"{plan.strategy} plan for {model_spec}: {depth} layers -> K={plan.k} kept")
    if plan.clusters:
        console.print("clusters: " + " ".join(f"[{c[0]}-{c[-1]}]" if len(c) > 1 else f"[{c[0]}]" for c in plan.clusters))
    console.print(f"trainable: {plan.trainable}\nfrozen:    {plan.frozen}")
    console.print(f"wrote {out / 'plan.json'} and {out / 'clusters.png'}")
