"""Emulators: the compressed stand-in for the full model that the data owner fine-tunes on.

An emulator is the full model with its decoder stack replaced by ``spec.slots`` (see
:mod:`crashlm.emulators.plans`): for every position, the module of the slot's kind. An
``ADAPTER`` slot is layer s itself and trains; ``FROZEN`` is layer s, frozen; ``COPY`` is a
frozen copy of trainable layer s's pretrained weights (what the original CRaSh puts where a
removed position's nearest kept layer trains). Positions with the same slot key hold the *same*
module object, so sharing costs no memory and a shared layer is stored once. Saving and loading
bundles: :mod:`crashlm.emulators.bundle`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Iterable

from torch import nn

from crashlm.core.errors import UsageError
from crashlm.core.models import fingerprint, get_layers, num_layers, set_layers
from crashlm.emulators.plans import EmulatorSpec, LayerPlan, Sharing, Slot, SlotKind
from crashlm.emulators.strategies import strategy_name


def modules_by_key(model: nn.Module, slots: Iterable[Slot]) -> dict[str, nn.Module]:
    """The module of each slot key in ``model``'s stack, in order of first position."""
    layers = get_layers(model)
    unique: dict[str, nn.Module] = {}
    for slot in slots:
        unique.setdefault(slot.key, layers[slot.position])
    return unique


@dataclass
class Emulator:
    """A runnable causal LM whose decoder stack is ``spec.slots``."""

    model: nn.Module
    tokenizer: Any
    spec: EmulatorSpec
    base_fingerprint: str | None = None

    @property
    def plan(self) -> LayerPlan:
        return self.spec.plan

    @property
    def sharing(self) -> Sharing:
        return self.spec.sharing

    @property
    def slots(self) -> list[Slot]:
        return self.spec.slots

    @property
    def strategy(self) -> str:
        """The registered strategy this emulator is (``crash-share`` for a shared crash plan)."""
        return strategy_name(self.spec)

    def modules_by_key(self) -> dict[str, nn.Module]:
        """Each unique module once, by slot key, in order of first position."""
        return modules_by_key(self.model, self.slots)

    def layers(self, kind: SlotKind) -> dict[int, nn.Module]:
        """Source layer index -> the module of ``kind`` made from it, in order of first position."""
        layers = get_layers(self.model)
        found: dict[int, nn.Module] = {}
        for slot in self.slots:
            if slot.kind is kind:
                found.setdefault(slot.source, layers[slot.position])
        return found

    def adapter_layers(self) -> dict[int, nn.Module]:
        """Source layer index -> the trainable module at that layer's position(s)."""
        return self.layers(SlotKind.ADAPTER)

    def frozen_modules(self) -> list[nn.Module]:
        """Every unique module outside the adapter (frozen layers and copies), in order of first
        position: what distillation trains."""
        layers = get_layers(self.model)
        unique: dict[str, nn.Module] = {}
        for slot in self.slots:
            if not slot.trainable:
                unique.setdefault(slot.key, layers[slot.position])
        return list(unique.values())

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The adapter layers' parameters that require grad (after :meth:`freeze`: all of them;
        with LoRA injected into the adapter layers: the LoRA weights)."""
        return [p for layer in self.adapter_layers().values() for p in layer.parameters() if p.requires_grad]

    def freeze(self) -> None:
        """Only the adapter layers train: embeddings, frozen layers, copies, norm and head do not."""
        self.model.requires_grad_(False)
        for layer in self.adapter_layers().values():
            layer.requires_grad_(True)

    def summary(self) -> dict[str, int]:
        """Positions, unique layers and parameter counts (shared modules counted once)."""
        return {
            "positions": len(self.slots),
            "unique_layers": len(self.modules_by_key()),
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "trainable_parameters": sum(p.numel() for layer in self.adapter_layers().values() for p in layer.parameters()),
        }


def check_plan(model: nn.Module, plan: LayerPlan) -> str:
    """The model's fingerprint, after checking that ``plan`` was made for this model."""
    depth = num_layers(model)
    if plan.num_layers != depth:
        raise UsageError(f"the plan is for a {plan.num_layers}-layer model but this model has {depth} layers")
    base = fingerprint(model)
    plan.check_base(base)
    return base


def build_emulator(model: nn.Module, tokenizer, spec: EmulatorSpec) -> Emulator:
    """Turn the FULL ``model`` into the emulator of ``spec``, in place.

    ``model`` is consumed: its layer stack is replaced and the removed layers are released, so
    no second full copy is ever held (load a fresh model to keep the full one). Only ``COPY``
    modules are deep-copied; the model's config object is shared with the copies, not cloned.
    """
    base = check_plan(model, spec.plan)
    slots = spec.slots
    layers = get_layers(model)
    modules: dict[str, nn.Module] = {}
    for slot in slots:
        if slot.key not in modules:
            layer = layers[slot.source]
            # Copies are made before the stack changes, so they hold pretrained weights.
            modules[slot.key] = copy.deepcopy(layer, {id(model.config): model.config}) \
                if slot.kind is SlotKind.COPY else layer
    set_layers(model, [modules[slot.key] for slot in slots], [slot.source for slot in slots])
    emulator = Emulator(model, tokenizer, spec, base)
    emulator.freeze()
    return emulator
