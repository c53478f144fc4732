"""``crashlm similarity``: layer-by-layer CKA of one model, or of several side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from crashlm.analysis.similarity import (
    ESTIMATORS,
    KERNELS,
    POOLINGS,
    SimilarityResult,
    compute_similarity,
)
from crashlm.cli import app
from crashlm.cli._common import parse_dtype, parse_list, print_text
from crashlm.core.assets import DEFAULT_MODEL
from crashlm.core.errors import UsageError
from crashlm.core.io import atomic_files, check_output_dir, read_text_lines
from crashlm.core.settings import check_choice
from crashlm.core.tasks import ANALYSIS_SPLIT
from crashlm.outputs.plotting import (
    layer_labels,
    plot_adjacent_cka,
    plot_cka_grid,
    plot_cka_heatmap,
)

DTYPE_CHOICES = ("float32", "bfloat16")
# What marks --out as an earlier similarity output (one model, or --models side by side).
OUT_MARKERS = ("similarity.json", "*/similarity.json", "plan.json")


def _model_name(spec: str) -> str:
    """A directory name for a model spec: the alias, or the last path / hub-id component."""
    path = Path(spec)
    return path.stem if path.suffix == ".gguf" else (path.name or spec)


def _summary(result: SimilarityResult) -> str:
    labels = layer_labels(result.num_layers)
    pairs = {f"{labels[i]}-{labels[i + 1]}": value for i, value in enumerate(result.adjacent)}
    most = max(pairs, key=pairs.get)
    least = min(pairs, key=pairs.get)
    mean = sum(result.adjacent) / len(result.adjacent)
    return (
        f"{result.model}: {result.num_layers} layers, {result.samples} samples; adjacent CKA mean {mean:.3f}, "
        f"most similar {most} ({pairs[most]:.3f}), least similar {least} ({pairs[least]:.3f})"
    )


@app.command()
def similarity(
    model: str = typer.Option(DEFAULT_MODEL, "--model", help="Model alias, local HF directory, .gguf file or hub id."),
    models: Optional[str] = typer.Option(
        None, "--models", help="Comma-separated models compared side by side (replaces --model); each writes OUT/<name>/."
    ),
    task: str = typer.Option("piqa", "--task", help="Task whose examples (context + gold answer) are the samples."),
    split: str = typer.Option(
        ANALYSIS_SPLIT, "--split", help="The task's split the samples come from (default train: no evaluation item)."
    ),
    text: Optional[Path] = typer.Option(
        None, "--text", help="UTF-8 text file, one sample per non-empty line (used instead of --task)."
    ),
    samples: int = typer.Option(512, "--samples", help="Number of text samples (at least 4)."),
    pooling: str = typer.Option("mean_weighted", "--pooling", help=f"Token pooling: {', '.join(POOLINGS)}."),
    estimator: Optional[str] = typer.Option(
        None, "--estimator", help=f"HSIC estimator: {', '.join(ESTIMATORS)} (default biased; unbiased with --minibatch)."
    ),
    kernel: str = typer.Option(
        "linear", "--kernel", help=f"CKA kernel: {', '.join(KERNELS)} (rbf: sigma by the median heuristic)."
    ),
    last_state: str = typer.Option(
        "norm", "--last-state", help="Last layer's state: norm (final-norm output, as output_hidden_states and the paper) or raw."
    ),
    minibatch: Optional[int] = typer.Option(
        None, "--minibatch", help="Minibatch CKA with this many samples per batch (memory bounded by it)."
    ),
    batch_size: int = typer.Option(16, "--batch-size", help="Texts per forward pass."),
    dtype: str = typer.Option("float32", "--dtype", help=f"Weights / autocast dtype: {', '.join(DTYPE_CHOICES)}."),
    max_length: int = typer.Option(512, "--max-length", help="Truncate texts to this many tokens."),
    device: Optional[str] = typer.Option(None, "--device", help="Torch device (default: cuda if available, else cpu)."),
    device_map: Optional[str] = typer.Option(
        None, "--device-map", help="Spread a large model over the GPUs (and CPU): 'auto' (needs accelerate). Default: off."
    ),
    out: Path = typer.Option(Path("runs/similarity"), "--out", help="Output directory."),
) -> None:
    """CKA between every pair of layers: similarity.json, cka_heatmap.png, adjacent_cka.png."""
    check_choice(dtype, DTYPE_CHOICES, "dtype")
    specs = parse_list(models, "--models") if models is not None else [model]
    names = [_model_name(spec) for spec in specs]
    if len(set(names)) != len(names):
        raise UsageError(f"--models gives two models the same output name: {', '.join(names)}")
    check_output_dir(out, OUT_MARKERS)  # before any work
    texts = read_text_lines(text, "--text file") if text is not None else None
    settings = dict(
        task=f"text:{text.name}" if text is not None else task,
        texts=texts,
        samples=samples,
        pooling=pooling,
        estimator=estimator or ("unbiased" if minibatch is not None else "biased"),
        minibatch=minibatch,
        split=split,
        kernel=kernel,
        last_state=last_state,
        batch_size=batch_size,
        dtype=parse_dtype(dtype),
        device=device,
        device_map=device_map,
        max_length=max_length,
    )
    # Everything is computed, then written to a staging directory that lands in OUT only when
    # complete: a failure (bad input, full disk) leaves no partial output.
    results = [compute_similarity(spec, **settings) for spec in specs]
    with atomic_files(out, OUT_MARKERS) as staging:
        for name, result in zip(names, results):
            folder = Path() if len(results) == 1 else Path(name)
            result.save(staging / folder)
            plot_cka_heatmap(result, staging / folder / "cka_heatmap.png")
            plot_adjacent_cka(result, staging / folder / "adjacent_cka.png")
        if len(results) > 1:
            plot_cka_grid(results, staging / "cka_grid.png")
        written = sorted(str(out / path.relative_to(staging)) for path in staging.rglob("*") if path.is_file())
    for result in results:
        print_text(_summary(result))
    print_text("wrote " + ", ".join(written))
