"""``crashlm lens`` (per-layer lens statistics and the trajectory figure), ``crashlm lens train``
(our tuned lens) and ``crashlm divergence`` (layer-to-layer distances of the lens distributions)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from crashlm.analysis.divergence import MEASURES, adjacent_similarity, compute_divergence
from crashlm.analysis.divergence import RESULT_FILE as DIVERGENCE_FILE
from crashlm.analysis.lens import LENS_KINDS, TunedLens, emulator_depth, lens_statistics, trajectory
from crashlm.cli import app
from crashlm.cli._common import console, positive
from crashlm.core.assets import DEFAULT_MODEL
from crashlm.core.errors import UsageError
from crashlm.core.io import atomic_files, check_output_dir, read_text_lines, write_json
from crashlm.core.models import default_device
from crashlm.core.tasks import load_examples
from crashlm.emulators.bundle import read_manifest
from crashlm.emulators.targets import resolve_target
from crashlm.outputs.plotting import plot_divergence, plot_lens_curves, plot_trajectory

LENS_FILE = "lens.json"
DEFAULT_PROMPT = "The capital of France is Paris, and the capital of Germany is Berlin."
PROMPT_TOKENS = 32  # the trajectory figure shows at most this many prompt tokens

lens_app = typer.Typer(
    help="Logit / tuned lens: what every layer predicts. Without a subcommand: statistics and figures.",
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(lens_app, name="lens")

_TASK_HELP = "Task whose {split} examples (context + gold answer) are the texts."
_TEXT_HELP = "UTF-8 text file, one sample per non-empty line (instead of --task)."
_LENS_HELP = "logit (final norm + unembedding) or tuned (needs --lens-path)."
_LENS_PATH_HELP = "Tuned lens directory from `crashlm lens train` (with --lens tuned)."
_DEVICE_HELP = "Torch device (default: cuda if available, else cpu)."


def _print(text: str) -> None:
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def _texts(task: str, text: Optional[Path], samples: int, split: str, seed: int | None = None) -> tuple[list[str], str]:
    """The samples and a label of where they came from: ``text:<file>`` or the task name."""
    positive(samples, "--samples", allow_none=False)
    if text is not None:
        return read_text_lines(text, "--text file")[:samples], f"text:{text.name}"
    return [example.text for example in load_examples(task, split, limit=samples, seed=seed)], task


def _read_lens(kind: str, path: Optional[Path]):
    """The tuned lens of ``--lens tuned --lens-path P``, or None for the logit lens."""
    if kind not in LENS_KINDS:
        raise UsageError(f"unknown lens {kind!r}; choose one of {', '.join(LENS_KINDS)}")
    if kind == "logit":
        if path is not None:
            raise UsageError("--lens-path applies to --lens tuned")
        return None
    if path is None:
        raise UsageError("--lens tuned needs --lens-path (a directory from `crashlm lens train`)")
    return TunedLens.load(path)


def _load_full(spec: str, device: Optional[str], lens):
    """``(model, tokenizer, base fingerprint)`` of ``--model``, refusing a lens trained on another model."""
    target = resolve_target(model=spec, device=device or default_device())
    if lens is not None:
        lens.check_base(target.base_fingerprint)
        lens.to(next(target.model.parameters()).device)
    return target.model, target.tokenizer, target.base_fingerprint


def _load_emulator(path: Path, device: Optional[str], base: str | None, lens):
    """An emulator bundle made from the full model with fingerprint ``base`` (when given)."""
    emulator = resolve_target(emulator=str(path), device=device or default_device()).emulator
    if base is not None and emulator.base_fingerprint not in (None, base):
        raise UsageError(f"emulator {path} was built from another model (fingerprint {emulator.base_fingerprint}, "
                         f"the full model's {base})")
    if lens is not None:
        lens.check_base(emulator.base_fingerprint)
        lens.to(next(emulator.model.parameters()).device)
    return emulator


def _emulator_name(path: Path, emulator) -> str:
    return f"{path.name} ({emulator.strategy}, {len(emulator.slots)} positions)"


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
    lens_kind: str = typer.Option("logit", "--lens", help=_LENS_HELP),
    lens_path: Optional[Path] = typer.Option(None, "--lens-path", help=_LENS_PATH_HELP),
    task: str = typer.Option("piqa", "--task", help=_TASK_HELP.format(split="validation")),
    text: Optional[Path] = typer.Option(None, "--text", help=_TEXT_HELP),
    samples: int = typer.Option(32, "--samples", help="Number of texts the statistics average over."),
    prompt: str = typer.Option(
        DEFAULT_PROMPT, "--prompt", help=f"Prompt of the trajectory figure (first {PROMPT_TOKENS} tokens)."
    ),
    max_length: int = typer.Option(512, "--max-length", help="Truncate texts to this many tokens."),
    batch_size: int = typer.Option(8, "--batch-size", help="Texts per forward pass."),
    device: Optional[str] = typer.Option(None, "--device", help=_DEVICE_HELP),
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
    tuned = _read_lens(lens_kind, lens_path)
    texts, source = _texts(task, text, samples, "validation")
    settings = dict(batch_size=batch_size, max_length=max_length)

    full, tokenizer, base = _load_full(model, device, tuned)
    stats = [lens_statistics(full, tokenizer, texts, tuned, name=model, **settings)]
    paths = [trajectory(full, tokenizer, prompt, tuned, name=model, max_length=PROMPT_TOKENS)]
    del full
    for path in emulators or []:
        emulator = _load_emulator(path, device, base, tuned)
        name, depth = _emulator_name(path, emulator), emulator_depth(emulator)
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
        _print(_stats_line(item))
    _print("wrote " + ", ".join(str(p) for p in written))


@lens_app.command("train")
def train(
    model: str = typer.Option(DEFAULT_MODEL, "--model", help="Model the lens is for: alias, HF directory, .gguf file or hub id."),
    task: str = typer.Option("boolq", "--task", help=_TASK_HELP.format(split="TRAIN") + " BoolQ: Wikipedia passages."),
    text: Optional[Path] = typer.Option(None, "--text", help=_TEXT_HELP),
    samples: int = typer.Option(2000, "--samples", help="Number of training texts (a seeded shuffle of the train split)."),
    steps: int = typer.Option(200, "--steps", help="Optimiser steps."),
    lr: float = typer.Option(1e-3, "--lr", help="Peak AdamW learning rate (linear warm-up, cosine decay)."),
    batch_size: int = typer.Option(4, "--batch-size", help="Texts per step."),
    max_length: int = typer.Option(128, "--max-length", help="Truncate texts to this many tokens."),
    seed: int = typer.Option(0, "--seed", help="Seed of the text shuffle and the batch order."),
    device: Optional[str] = typer.Option(None, "--device", help=_DEVICE_HELP),
    out: Path = typer.Option(Path("runs/tuned-lens"), "--out", help="Lens directory to write: lens.safetensors + lens.json."),
) -> None:
    """Train a tuned lens for a model on offline text.

    One residual affine translator per layer, zero-initialised (so it starts as the logit lens),
    minimising KL(model output || lens).
    """
    # here: crashlm.analysis.tuned_lens pulls in peft (1.5 s, via the training loop) on every command otherwise
    from crashlm.analysis.tuned_lens import LensTrainConfig, train_tuned_lens

    config = LensTrainConfig(steps=steps, lr=lr, batch_size=batch_size, max_length=max_length,
                             warmup_steps=min(LensTrainConfig.warmup_steps, steps // 10), seed=seed)
    texts, source = _texts(task, text, samples, "train", seed=seed)
    full, tokenizer, base = _load_full(model, device, None)
    tuned, losses = train_tuned_lens(full, tokenizer, texts, config, name=model, base_fingerprint=base)
    tuned.training_config.update(source=source, losses=losses)
    tuned.save(out)
    _print(f"tuned lens for {model}: {tuned.num_layers} translators, {steps} steps on {len(texts)} texts from {source}; "
           f"mean KL to the output {losses[0]:.4f} -> {losses[-1]:.4f} nats")
    _print(f"wrote {out}")


@app.command()
def divergence(
    model: Optional[str] = typer.Option(
        None, "--model", help=f"Model: alias, HF directory, .gguf file or hub id (default {DEFAULT_MODEL})."
    ),
    emulator: Optional[Path] = typer.Option(None, "--emulator", help="Analyse this emulator bundle instead of --model."),
    lens_kind: str = typer.Option("logit", "--lens", help=_LENS_HELP),
    lens_path: Optional[Path] = typer.Option(None, "--lens-path", help=_LENS_PATH_HELP),
    task: str = typer.Option("piqa", "--task", help=_TASK_HELP.format(split="validation")),
    text: Optional[Path] = typer.Option(None, "--text", help=_TEXT_HELP),
    samples: int = typer.Option(16, "--samples", help="Number of texts; the cost grows with their tokens (O(L^2 V) each)."),
    max_length: int = typer.Option(512, "--max-length", help="Truncate texts to this many tokens."),
    batch_size: int = typer.Option(8, "--batch-size", help="Texts per forward pass."),
    device: Optional[str] = typer.Option(None, "--device", help=_DEVICE_HELP),
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
    tuned = _read_lens(lens_kind, lens_path)
    texts, source = _texts(task, text, samples, "validation")
    if emulator is None:
        name, depth = model or DEFAULT_MODEL, None
        target, tokenizer, _ = _load_full(name, device, tuned)
    else:
        bundle = _load_emulator(emulator, device, None, tuned)
        name, depth, target, tokenizer = _emulator_name(emulator, bundle), emulator_depth(bundle), bundle.model, bundle.tokenizer
    result = compute_divergence(target, tokenizer, texts, tuned, batch_size=batch_size, max_length=max_length,
                                name=name, task=source, depth=depth)
    result.settings = {"lens_path": str(lens_path) if lens_path else None, "emulator": str(emulator) if emulator else None,
                       "max_length": max_length, "batch_size": batch_size}

    with atomic_files(out, (DIVERGENCE_FILE,)) as staging:  # all files or none
        names = [result.save(staging).name] + [plot_divergence(result, m, staging / f"divergence_{m}.png").name for m in MEASURES]
    written = [out / name for name in names]
    adjacent = adjacent_similarity(result, "js") or [1.0]
    _print(f"{name} on {source} ({result.lens} lens, {result.samples} samples, {result.tokens} tokens): "
           f"{result.num_layers + 1} states; adjacent-layer JS similarity mean {sum(adjacent) / len(adjacent):.3f}, "
           f"min {min(adjacent):.3f}")
    _print("wrote " + ", ".join(str(p) for p in written))
