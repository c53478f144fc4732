"""``crashlm lens``: per-layer lens statistics and the trajectory figure, and ``crashlm lens train`` (a tuned lens)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import List, Optional

import typer

from crashlm.analysis.lens import emulator_depth, lens_statistics, trajectory
from crashlm.analysis.tuned_lens import LensTrainConfig, train_tuned_lens
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
from crashlm.cli._settings import with_settings
from crashlm.core.assets import DEFAULT_MODEL
from crashlm.core.errors import UsageError
from crashlm.core.io import atomic_files, check_output_dir, write_json
from crashlm.emulators.bundle import read_manifest
from crashlm.outputs.plotting import plot_lens_curves, plot_trajectory

LENS_FILE = "lens.json"
DEFAULT_PROMPT = "The capital of France is Paris, and the capital of Germany is Berlin."
PROMPT_TOKENS = 32  # the trajectory figure shows at most this many prompt tokens

lens_app = typer.Typer(
    help="Logit / tuned lens: what every layer predicts. Without a subcommand: statistics and figures.",
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(lens_app, name="lens")

def _file_stem(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("_") or "emulator"


def _stats_line(stats) -> str:
    agree = next((d for d, a in zip(stats.depth, stats.top1_agreement) if a >= 0.5), None)
    return (
        f"{stats.model}: {stats.lens} lens, {stats.samples} samples, {stats.tokens} tokens; perplexity "
        f"{stats.perplexity[-1]:.3g} at the output; mean KL to the output {sum(stats.kl_to_final[:-1]) / stats.num_layers:.3f} "
        f"nats over the earlier states; top-1 agrees with the output on half the tokens "
        + (f"from layer {agree}" if agree is not None else "only at the output")
    )


@lens_app.callback(invoke_without_command=True)
def lens(
    ctx: typer.Context,
    model: str = typer.Option(DEFAULT_MODEL, "--model", help="Full model: alias, HF directory, .gguf file or hub id."),
    emulators: Optional[List[Path]] = typer.Option(
        None, "--emulator", help="Emulator bundle from `crashlm emulator`, compared with the full model (repeatable)."
    ),
    lens_kind: str = typer.Option("logit", "--lens", help=LENS_HELP),
    lens_path: Optional[Path] = typer.Option(None, "--lens-path", help=LENS_PATH_HELP),
    task: str = typer.Option("piqa", "--task", help=TASK_HELP.format(split="validation")),
    text: Optional[Path] = typer.Option(None, "--text", help=TEXT_HELP),
    samples: int = typer.Option(32, "--samples", help="Number of texts the statistics average over."),
    prompt: str = typer.Option(
        DEFAULT_PROMPT, "--prompt", help=f"Prompt of the trajectory figure (first {PROMPT_TOKENS} tokens)."
    ),
    max_length: int = typer.Option(512, "--max-length", help="Truncate texts to this many tokens."),
    batch_size: int = typer.Option(8, "--batch-size", help="Texts per forward pass."),
    device: Optional[str] = typer.Option(None, "--device", help=DEVICE_HELP),
    out: Path = typer.Option(Path("runs/lens"), "--out", help="Output directory: lens.json, trajectory*.png, lens_curves.png."),
) -> None:
    """Per-layer lens statistics and the trajectory figure, for the full model and emulators.

    KL to the output, top-1 agreement with it and next-token perplexity of every layer's lens
    distribution; emulators are plotted at their layers' full-model depth.
    """
    if ctx.invoked_subcommand is not None:
        return
    positive(max_length, "--max-length", allow_none=False)
    positive(batch_size, "--batch-size", allow_none=False)
    if not prompt.strip():
        raise UsageError("--prompt is empty")
    check_output_dir(out, (LENS_FILE,))
    for path in emulators or []:
        read_manifest(path)  # a wrong path fails before the full model's work
    tuned = read_lens(lens_kind, lens_path)
    texts, source = read_texts(task, text, samples, "validation")
    settings = dict(batch_size=batch_size, max_length=max_length)

    full, tokenizer, base = load_full(model, device, tuned)
    stats = [lens_statistics(full, tokenizer, texts, tuned, name=model, **settings)]
    paths = [trajectory(full, tokenizer, prompt, tuned, name=model, max_length=PROMPT_TOKENS)]
    del full
    for path in emulators or []:
        emulator = load_emulator(path, device, base, tuned)
        name, depth = emulator_name(path, emulator), emulator_depth(emulator)
        stats.append(lens_statistics(emulator.model, emulator.tokenizer, texts, tuned, name=name, depth=depth, **settings))
        paths.append(trajectory(emulator.model, emulator.tokenizer, prompt, tuned, name=name,
                                max_length=PROMPT_TOKENS, depth=depth))
        del emulator

    # Everything is computed before anything is written: a failure leaves no partial output.
    record = {
        "settings": {
            "model": model, "emulators": [str(p) for p in emulators or []], "lens": lens_kind,
            "lens_path": str(lens_path) if lens_path else None, "source": source, "samples": len(texts),
            "prompt": prompt, "prompt_tokens": PROMPT_TOKENS, **settings,
        },
        "models": [item.to_dict() for item in stats],
        "trajectories": [item.to_dict() for item in paths],
    }
    with atomic_files(out, (LENS_FILE,)) as staging:  # all files or none
        names = [write_json(staging / LENS_FILE, record).name, plot_trajectory(paths[0], staging / "trajectory.png").name]
        for path, item in zip(emulators or [], paths[1:]):
            names.append(plot_trajectory(item, staging / f"trajectory_{_file_stem(path.name)}.png").name)
        names.append(plot_lens_curves(stats, staging / "lens_curves.png").name)
    written = [out / name for name in names]
    for item in stats:
        print_text(_stats_line(item))
    print_text("wrote " + ", ".join(str(p) for p in written))


@lens_app.command("train")
@with_settings(LensTrainConfig)
def train(
    ctx: typer.Context,
    model: str = typer.Option(DEFAULT_MODEL, "--model", help="Model the lens is for: alias, HF directory, .gguf file or hub id."),
    task: str = typer.Option("boolq", "--task", help=TASK_HELP.format(split="TRAIN") + " BoolQ: Wikipedia passages."),
    text: Optional[Path] = typer.Option(None, "--text", help=TEXT_HELP),
    samples: int = typer.Option(2000, "--samples", help="Number of training texts (a seeded shuffle of the train split)."),
    device: Optional[str] = typer.Option(None, "--device", help=DEVICE_HELP),
    out: Path = typer.Option(Path("runs/tuned-lens"), "--out", help="Lens directory to write: lens.safetensors + lens.json."),
    *,
    config: LensTrainConfig,
) -> None:
    """Train a tuned lens for a model on offline text.

    One residual affine translator per layer, zero-initialised (so it starts as the logit lens),
    minimising KL(model output || lens).
    """
    if ctx.get_parameter_source("warmup_steps").name != "COMMANDLINE":  # by name: typer vendors click
        config = replace(config, warmup_steps=min(config.warmup_steps, config.steps // 10))
    seed, steps = config.seed, config.steps
    texts, source = read_texts(task, text, samples, "train", seed=seed)
    full, tokenizer, base = load_full(model, device, None)
    tuned, losses = train_tuned_lens(full, tokenizer, texts, config, name=model, base_fingerprint=base)
    tuned.training_config.update(source=source, losses=losses)
    tuned.save(out)
    print_text(f"tuned lens for {model}: {tuned.num_layers} translators, {steps} steps on {len(texts)} texts from {source}; "
               f"mean KL to the output {losses[0]:.4f} -> {losses[-1]:.4f} nats")
    print_text(f"wrote {out}")
