"""``crashlm divergence``: layer-to-layer distances between the lens distributions of a model or emulator."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from crashlm.analysis.divergence import MEASURES, adjacent_similarity, compute_divergence
from crashlm.analysis.divergence import RESULT_FILE as DIVERGENCE_FILE
from crashlm.analysis.lens import emulator_depth
from crashlm.cli import app
from crashlm.cli._common import positive, print_text
from crashlm.cli._lens_inputs import (
    DEVICE_HELP,
    LENS_HELP,
    LENS_PATH_HELP,
    TASK_HELP,
    TEXT_HELP,
    emulator_name,
    load_emulator,
    load_full,
    read_lens,
    read_texts,
)
from crashlm.core.assets import DEFAULT_MODEL
from crashlm.core.errors import UsageError
from crashlm.core.io import atomic_files, check_output_dir
from crashlm.outputs.plotting import plot_divergence


@app.command()
def divergence(
    model: Optional[str] = typer.Option(
        None, "--model", help=f"Model: alias, HF directory, .gguf file or hub id (default {DEFAULT_MODEL})."
    ),
    emulator: Optional[Path] = typer.Option(None, "--emulator", help="Analyse this emulator bundle instead of --model."),
    lens_kind: str = typer.Option("logit", "--lens", help=LENS_HELP),
    lens_path: Optional[Path] = typer.Option(None, "--lens-path", help=LENS_PATH_HELP),
    task: str = typer.Option("piqa", "--task", help=TASK_HELP.format(split="validation")),
    text: Optional[Path] = typer.Option(None, "--text", help=TEXT_HELP),
    samples: int = typer.Option(16, "--samples", help="Number of texts; the cost grows with their tokens (O(L^2 V) each)."),
    max_length: int = typer.Option(512, "--max-length", help="Truncate texts to this many tokens."),
    batch_size: int = typer.Option(8, "--batch-size", help="Texts per forward pass."),
    device: Optional[str] = typer.Option(None, "--device", help=DEVICE_HELP),
    out: Path = typer.Option(
        Path("runs/divergence"), "--out", help="Output directory: divergence.json, divergence_<measure>.png."
    ),
) -> None:
    """Layer-to-layer divergence of the lens distributions: L x L matrices and heatmaps.

    Jensen-Shannon, KL, Hellinger, L2 and cosine distance between the layers' next-token
    distributions (probabilities), averaged over every token of the texts.
    """
    if model is not None and emulator is not None:
        raise UsageError("give --model or --emulator, not both")
    check_output_dir(out, (DIVERGENCE_FILE,))
    positive(max_length, "--max-length", allow_none=False)
    positive(batch_size, "--batch-size", allow_none=False)
    tuned = read_lens(lens_kind, lens_path)
    texts, source = read_texts(task, text, samples, "validation")
    if emulator is None:
        name, depth = model or DEFAULT_MODEL, None
        target, tokenizer, _ = load_full(name, device, tuned)
    else:
        bundle = load_emulator(emulator, device, None, tuned)
        name, depth, target, tokenizer = emulator_name(emulator, bundle), emulator_depth(bundle), bundle.model, bundle.tokenizer
    result = compute_divergence(target, tokenizer, texts, tuned, batch_size=batch_size, max_length=max_length,
                                name=name, task=source, depth=depth)
    result.settings = {"lens_path": str(lens_path) if lens_path else None, "emulator": str(emulator) if emulator else None,
                       "max_length": max_length, "batch_size": batch_size}

    with atomic_files(out, (DIVERGENCE_FILE,)) as staging:  # all files or none
        names = [result.save(staging).name] + [plot_divergence(result, m, staging / f"divergence_{m}.png").name for m in MEASURES]
    written = [out / name for name in names]
    adjacent = adjacent_similarity(result, "js") or [1.0]
    print_text(f"{name} on {source} ({result.lens} lens, {result.samples} samples, {result.tokens} tokens): "
           f"{result.num_layers + 1} states; adjacent-layer JS similarity mean {sum(adjacent) / len(adjacent):.3f}, "
           f"min {min(adjacent):.3f}")
    print_text("wrote " + ", ".join(str(p) for p in written))
