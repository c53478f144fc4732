"""What a model argument names: a model spec, an emulator bundle, or either with an adapter.

Every command that takes a model (eval, lens, divergence, landscape) and the offsite pipeline
resolve it here, so a bundle directory and the ``SPEC+ADAPTER_DIR`` syntax mean the same
everywhere: ``smollm2-135m+runs/adapter`` is the plugged model in memory, ``emu/+runs/adapter``
the emulator with its tuned adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from crashlm.core.assets import DEFAULT_MODEL
from crashlm.core.errors import UsageError
from crashlm.core.models import fingerprint, load_model
from crashlm.emulators.bundle import is_bundle, load_emulator
from crashlm.emulators.emulator import Emulator
from crashlm.emulators.plugin import apply_adapter, is_adapter, load_adapter


@dataclass
class Target:
    """A loaded model argument, in eval mode.

    ``base_fingerprint`` is the full model's that this model is, or was made from (an adapter's
    recorded base, an emulator's); ``description`` is what an evaluation records about it.
    """

    model: nn.Module
    tokenizer: Any
    name: str
    base_fingerprint: str | None
    description: dict
    emulator: Emulator | None = None


def split_target(spec: str) -> tuple[str, str | None]:
    """``SPEC+ADAPTER_DIR`` -> (SPEC, ADAPTER_DIR), split at the last '+' only when the right
    side is an adapter directory (a model path may itself contain '+')."""
    head, plus, tail = spec.rpartition("+")
    if plus and head and is_adapter(tail):
        return head, tail
    return spec, None


def resolve_target(
    model: str | None = None,
    emulator: str | None = None,
    adapter: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> Target:
    """Load what command-line arguments name.

    ``model`` is a model spec (alias, HF directory, .gguf, hub id), an emulator bundle
    directory, or ``SPEC+ADAPTER_DIR``; ``emulator`` a bundle directory; neither: the default
    model. ``adapter`` is plugged into the full model, or loaded into the emulator's adapter layers.
    """
    if model and emulator:
        raise UsageError("give a model or an emulator, not both")
    if model:
        model, inline = split_target(model)
        if inline and adapter:
            raise UsageError(f"two adapters given: {inline} (after '+') and {adapter}")
        adapter = adapter or inline
        if is_bundle(model):
            model, emulator = None, model
    if not model and not emulator:
        model = DEFAULT_MODEL
    loaded = load_adapter(adapter) if adapter else None
    emu = None
    if emulator:
        emu = load_emulator(emulator, dtype=dtype, device=device)
        if loaded:
            apply_adapter(emu, loaded)
        module, tokenizer, base = emu.model, emu.tokenizer, emu.base_fingerprint
        description = {"kind": "emulator", "source": str(emulator), "strategy": emu.strategy,
                       "sharing": emu.spec.shares, "positions": len(emu.slots), "base_fingerprint": base}
    else:
        module, tokenizer = load_model(model, dtype=dtype, device=device)
        base = loaded.base_fingerprint if loaded and loaded.base_fingerprint else fingerprint(module)
        if loaded:
            apply_adapter(module, loaded)  # checks the base: afterwards the weights are no longer it
        description = {"kind": "model", "source": model, "base_fingerprint": base}
    description["adapter"] = str(adapter) if adapter else None
    description["name"] = description["source"] + (f"+{adapter}" if adapter else "")
    module.eval()
    return Target(module, tokenizer, description["name"], base, description, emu)
