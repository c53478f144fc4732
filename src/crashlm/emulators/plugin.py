"""Adapters: the trained layers the data owner sends back, and plugging them into a model.

An adapter directory holds ``adapter.safetensors`` (keys ``layers.<source>.<name inside the
layer>``: the trainable layers only, any LoRA already merged) and ``adapter.json`` (format,
source layers, the base model's fingerprint, the plan, the training configuration and
validation curve, and the sha256 of the tensor file). Source indices are layer indices of the
FULL model, so the same adapter loads into the emulator it was trained on (its adapter layers)
and into the full model (its original positions) without any translation table. Which model
a command-line argument names (a ``SPEC+ADAPTER_DIR`` among them): :mod:`crashlm.emulators.targets`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from crashlm.core.assets import DEFAULT_MODEL
from crashlm.core.errors import UsageError
from crashlm.core.io import (
    atomic_dir,
    load_tensors,
    read_artifact_meta,
    save_tensors,
    write_json,
)
from crashlm.core.models import fingerprint, get_layers, load_model
from crashlm.emulators.emulator import Emulator
from crashlm.emulators.plans import LayerPlan

ADAPTER_FORMAT = "crashlm-adapter"
ADAPTER_VERSION = 1
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_META = "adapter.json"
PLUGIN_META = "crashlm_plugin.json"


@dataclass
class Adapter:
    """Trained layer weights by FULL-model layer index, and their metadata (``adapter.json``)."""

    sources: list[int]
    state: dict[int, dict[str, torch.Tensor]]
    meta: dict

    @property
    def base_fingerprint(self) -> str | None:
        return self.meta.get("base_fingerprint")

    @property
    def plan(self) -> LayerPlan | None:
        return LayerPlan.from_dict(self.meta["plan"]) if self.meta.get("plan") else None


def save_adapter(
    layers: dict[int, nn.Module],
    out_dir: str | Path,
    base_fingerprint: str | None,
    plan: LayerPlan | dict | None,
    training: dict | None = None,
    validation_curve: list | None = None,
) -> Path:
    """Write ``layers`` (source index -> trained layer) as an adapter directory, atomically."""
    if not layers:
        raise ValueError("an adapter needs at least one layer")
    tensors = {}
    for source, layer in sorted(layers.items()):
        for name, tensor in layer.state_dict().items():
            if "lora_" in name or ".base_layer." in name:
                raise ValueError(f"layer {source} still holds LoRA modules ({name}): merge them before saving")
            tensors[f"layers.{source}.{name}"] = tensor
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        digest = save_tensors(tmp / ADAPTER_WEIGHTS, tensors)
        write_json(tmp / ADAPTER_META, {
            "format": ADAPTER_FORMAT,
            "version": ADAPTER_VERSION,
            "sources": sorted(layers),
            "base_fingerprint": base_fingerprint,
            "plan": plan.to_dict() if isinstance(plan, LayerPlan) else plan,
            "training": training or {},
            "validation_curve": validation_curve or [],
            "sha256": {ADAPTER_WEIGHTS: digest},
        })
    return out_dir


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_META).is_file()


def load_adapter(path: str | Path) -> Adapter:
    """Read and verify an adapter directory (UsageError when missing, corrupt or not an adapter)."""
    path = Path(path)
    meta = read_artifact_meta(path, ADAPTER_META, "adapter", ADAPTER_FORMAT, ADAPTER_VERSION)
    expected = meta.get("sha256", {}).get(ADAPTER_WEIGHTS)
    if expected is None:
        raise UsageError(f"{path}: {ADAPTER_META} records no sha256 for {ADAPTER_WEIGHTS}")
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in load_tensors(path / ADAPTER_WEIGHTS, expected).items():
        prefix, source, name = (key.split(".", 2) + ["", ""])[:3]
        if prefix != "layers" or not source.isdigit() or not name:
            raise UsageError(f"{path / ADAPTER_WEIGHTS}: unexpected tensor name {key!r} (want layers.<index>.<name>)")
        state.setdefault(int(source), {})[name] = tensor
    sources = sorted(state)
    if sources != sorted(meta.get("sources", [])):
        raise UsageError(f"{path}: {ADAPTER_META} lists layers {meta.get('sources')} but the tensors hold {sources}")
    adapter = Adapter(sources, state, meta)
    if adapter.plan is not None and sources != adapter.plan.trainable:
        raise UsageError(f"{path}: the adapter holds layers {sources} but its plan trains {adapter.plan.trainable}")
    return adapter


# ---------------------------------------------------------------------------------------------
# Applying


def _check_base(adapter: Adapter, base: str | None) -> None:
    if adapter.base_fingerprint and base and adapter.base_fingerprint != base:
        raise UsageError(
            f"adapter was made for another base model (adapter base {adapter.base_fingerprint}, this model {base})"
        )


def _load_layer(layer: nn.Module, state: dict[str, torch.Tensor], source: int) -> None:
    """Copy ``state`` into ``layer`` after checking names and shapes (one-line UsageError)."""
    own = layer.state_dict()
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or extra:
        what = f"lacks {missing[0]}" if missing else f"has unknown tensor {extra[0]}"
        raise UsageError(f"adapter layer {source} does not fit this model: it {what}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(own[name].shape):
            raise UsageError(
                f"adapter layer {source} does not fit this model: {name} has shape {tuple(tensor.shape)}, "
                f"the model's has {tuple(own[name].shape)}"
            )
    layer.load_state_dict(state)


def apply_adapter(target: nn.Module | Emulator, adapter: Adapter) -> None:
    """Load ``adapter`` into a full model (at its source layers) or into an emulator's adapter layers."""
    if isinstance(target, Emulator):
        _check_base(adapter, target.base_fingerprint)
        layers = target.adapter_layers()
        outside = [s for s in adapter.sources if s not in layers]
        if outside:
            raise UsageError(
                f"adapter trains layers {outside} that are not adapter layers of this emulator ({sorted(layers)})"
            )
    else:
        _check_base(adapter, fingerprint(target))
        stack = get_layers(target)
        outside = [s for s in adapter.sources if s >= len(stack)]
        if outside:
            raise UsageError(f"adapter trains layers {outside} but this model has {len(stack)} layers")
        layers = dict(enumerate(stack))
    for source in adapter.sources:
        _load_layer(layers[source], adapter.state[source], source)


def plug_in(
    model_spec: str | None, adapter_dir: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float32
) -> Path:
    """Plug an adapter into the full model and write a normal HF model directory, atomically.

    ``model_spec`` None means the model named in the adapter's plan (else the default model).
    The directory also holds ``crashlm_plugin.json``: which base, which adapter, which layers.
    """
    adapter = load_adapter(adapter_dir)
    model_spec = model_spec or (adapter.plan.model if adapter.plan else None) or DEFAULT_MODEL
    model, tokenizer = load_model(model_spec, dtype=dtype)
    apply_adapter(model, adapter)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / PLUGIN_META, {
            "base_model": model_spec,
            "base_fingerprint": adapter.base_fingerprint,
            "adapter": str(Path(adapter_dir).resolve()),
            "adapter_sha256": adapter.meta["sha256"][ADAPTER_WEIGHTS],
            "sources": adapter.sources,
        })
    return out_dir
