"""What the lens and divergence commands share: their texts, their lens, and their models."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from crashlm.analysis.lens import LENS_KINDS, TunedLens
from crashlm.cli._common import positive
from crashlm.core.errors import UsageError
from crashlm.core.io import read_text_lines
from crashlm.core.models import default_device
from crashlm.core.settings import check_choice
from crashlm.core.tasks import load_examples
from crashlm.emulators.targets import resolve_target

TASK_HELP = "Task whose {split} examples (context + gold answer) are the texts."
TEXT_HELP = "UTF-8 text file, one sample per non-empty line (instead of --task)."
LENS_HELP = "logit (final norm + unembedding) or tuned (needs --lens-path)."
LENS_PATH_HELP = "Tuned lens directory from `crashlm lens train` (with --lens tuned)."
DEVICE_HELP = "Torch device (default: cuda if available, else cpu)."


def read_texts(task: str, text: Optional[Path], samples: int, split: str, seed: int | None = None) -> tuple[list[str], str]:
    """The samples and a label of where they came from: ``text:<file>`` or the task name."""
    positive(samples, "--samples", allow_none=False)
    if text is not None:
        return read_text_lines(text, "--text file")[:samples], f"text:{text.name}"
    return [example.text for example in load_examples(task, split, limit=samples, seed=seed)], task


def read_lens(kind: str, path: Optional[Path]):
    """The tuned lens of ``--lens tuned --lens-path P``, or None for the logit lens."""
    check_choice(kind, LENS_KINDS, "lens")
    if kind == "logit":
        if path is not None:
            raise UsageError("--lens-path applies to --lens tuned")
        return None
    if path is None:
        raise UsageError("--lens tuned needs --lens-path (a directory from `crashlm lens train`)")
    return TunedLens.load(path)


def load_full(spec: str, device: Optional[str], lens):
    """``(model, tokenizer, base fingerprint)`` of ``--model``, refusing a lens trained on another model."""
    target = resolve_target(model=spec, device=device or default_device())
    if lens is not None:
        lens.check_base(target.base_fingerprint)
        lens.to(next(target.model.parameters()).device)
    return target.model, target.tokenizer, target.base_fingerprint


def load_emulator(path: Path, device: Optional[str], base: str | None, lens):
    """An emulator bundle made from the full model with fingerprint ``base`` (when given)."""
    emulator = resolve_target(emulator=str(path), device=device or default_device()).emulator
    if base is not None and emulator.base_fingerprint not in (None, base):
        raise UsageError(f"emulator {path} was built from another model (fingerprint {emulator.base_fingerprint}, "
                         f"the full model's {base})")
    if lens is not None:
        lens.check_base(emulator.base_fingerprint)
        lens.to(next(emulator.model.parameters()).device)
    return emulator


def emulator_name(path: Path, emulator) -> str:
    return f"{path.name} ({emulator.strategy}, {len(emulator.slots)} positions)"
