"""Emulator bundles: what the model owner sends, saved, verified, loaded and audited.

A bundle is a directory::

    crashlm.json        format, version, spec (plan + sharing mode), base fingerprint, summary,
                        versions, sha256 of every tensor file
    config.json         the emulator's config (num_hidden_layers = number of positions)
    tokenizer files
    no sharing:         model.safetensors (standard names, written by save_pretrained), so the
                        bundle is also a plain HF model directory
    sharing:            layers.safetensors (each unique module once, keys
                        ``modules.<slot key>.<param>``) + base.safetensors (embeddings, final
                        norm, unembedding with their HF names; tied embeddings once)

A sharing bundle is not written in the transformers layout because that format stores every
position's weights separately: shared layers would be duplicated on disk and untied on load.
The manifest stores each fact once: slots, strategy name and file layout follow from the spec.
Version 1 manifests (which also recorded strategy, sharing flags, slots and layout) still load.
No tensor of a removed layer is ever written; :func:`leaked_tensors` checks a bundle against
the full model.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
import transformers
from safetensors import SafetensorError
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from crashlm import __version__
from crashlm.core.errors import UsageError
from crashlm.core.io import (
    atomic_dir,
    load_tensors,
    read_artifact_meta,
    read_json,
    save_tensors,
    sha256_file,
    write_json,
)
from crashlm.core.models import (
    arch_spec,
    get_layers,
    load_tokenizer,
    num_layers,
    set_layers,
)
from crashlm.emulators.emulator import Emulator, modules_by_key
from crashlm.emulators.plans import EmulatorSpec, LayerPlan, Sharing, Slot

try:
    from transformers.initialization import no_init_weights
except ImportError:  # transformers 4.x
    from transformers.modeling_utils import no_init_weights

BUNDLE_FORMAT = "crashlm-emulator"
BUNDLE_VERSION = 2
MANIFEST = "crashlm.json"
LAYER_WEIGHTS = "layers.safetensors"
BASE_WEIGHTS = "base.safetensors"


@dataclass(frozen=True)
class Manifest:
    """The facts of a bundle's ``crashlm.json`` that loading needs."""

    spec: EmulatorSpec
    base_fingerprint: str | None
    sha256: dict[str, str]


def _owned_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """``state_dict`` without aliases: a tied tensor appears once, under its first name."""
    owned = {name for name, _ in module.named_parameters()} | {name for name, _ in module.named_buffers()}
    return {name: tensor for name, tensor in module.state_dict().items() if name in owned}


def _layer_prefix(model: nn.Module) -> str:
    return arch_spec(model).layers + "."


def _layout(spec: EmulatorSpec) -> str:
    return "deduplicated" if spec.shares else "transformers"


# ---------------------------------------------------------------------------------------------
# Writing and reading the manifest


def save_bundle(emulator: Emulator, out_dir: str | Path, extra: dict | None = None) -> Path:
    """Write what the model owner sends: see the module docstring for the layout. Atomic.

    ``extra`` adds records to ``crashlm.json`` (``fidelity``, ``distillation``); it cannot
    replace the keys the format itself writes."""
    out_dir = Path(out_dir)
    model = emulator.model
    with atomic_dir(out_dir) as tmp:
        if emulator.spec.shares:
            layer_tensors = {f"modules.{key}.{name}": tensor for key, module in emulator.modules_by_key().items()
                             for name, tensor in module.state_dict().items()}
            prefix = _layer_prefix(model)
            base_tensors = {name: t for name, t in _owned_state(model).items() if not name.startswith(prefix)}
            hashes = {LAYER_WEIGHTS: save_tensors(tmp / LAYER_WEIGHTS, layer_tensors),
                      BASE_WEIGHTS: save_tensors(tmp / BASE_WEIGHTS, base_tensors)}
            model.config.save_pretrained(tmp)
        else:
            model.save_pretrained(tmp)
            hashes = {path.name: sha256_file(path) for path in sorted(tmp.glob("*.safetensors"))}
        emulator.tokenizer.save_pretrained(tmp)
        manifest = {
            "format": BUNDLE_FORMAT,
            "version": BUNDLE_VERSION,
            "spec": emulator.spec.to_dict(),
            "base_fingerprint": emulator.base_fingerprint,
            "summary": emulator.summary(),
            "crashlm_version": __version__,
            "transformers_version": transformers.__version__,
            "torch_version": torch.__version__,
            "sha256": hashes,
        }
        clash = sorted(set(extra or {}) & set(manifest))
        if clash:
            raise ValueError(f"bundle records {clash} are the format's own")
        write_json(tmp / MANIFEST, {**manifest, **(extra or {})})
    return out_dir


def read_records(path: str | Path) -> dict:
    """The whole ``crashlm.json`` of a bundle (its ``fidelity`` and ``distillation`` records included)."""
    return read_json(Path(path) / MANIFEST, "bundle manifest")


def is_bundle(path: str | Path) -> bool:
    """Whether ``path`` is a directory holding an emulator bundle's manifest."""
    manifest = Path(path) / MANIFEST
    if not manifest.is_file():
        return False
    try:
        return read_json(manifest, "bundle manifest").get("format") == BUNDLE_FORMAT
    except (UsageError, AttributeError):
        return False


def _spec_v1(path: Path, data: dict) -> EmulatorSpec:
    """The spec of a version 1 manifest, checked against the slots and layout it also recorded."""
    missing = [key for key in ("layout", "plan", "sharing", "share_trainable", "slots") if key not in data]
    if missing:
        raise UsageError(f"{path}: incomplete bundle manifest (missing: {', '.join(missing)})")
    sharing = (Sharing.TIED if data["share_trainable"] else Sharing.COPIES) if data["sharing"] else Sharing.NONE
    spec = EmulatorSpec(LayerPlan.from_dict(data["plan"]), sharing)
    if data["slots"] != [{"position": s.position, "source": s.source, "module": s.key} for s in spec.slots]:
        raise UsageError(f"{path}: the recorded slots do not follow from the bundle's plan")
    if data["layout"] != _layout(spec):
        raise UsageError(f"{path}: layout {data['layout']!r} does not match sharing={spec.shares}")
    return spec


def read_manifest(path: str | Path) -> Manifest:
    """The checked ``crashlm.json`` of a bundle (UsageError when ``path`` is not a bundle)."""
    path = Path(path)
    data = read_artifact_meta(path, MANIFEST, "emulator bundle", BUNDLE_FORMAT, BUNDLE_VERSION)
    current = data.get("version", 1) >= 2
    missing = [key for key in (("spec", "sha256") if current else ("sha256",)) if key not in data]
    if missing:
        raise UsageError(f"{path}: incomplete bundle manifest (missing: {', '.join(missing)})")
    spec = EmulatorSpec.from_dict(data["spec"]) if current else _spec_v1(path, data)
    return Manifest(spec, data.get("base_fingerprint"), data["sha256"])


def verify_bundle(path: str | Path) -> Manifest:
    """Check every tensor file against its recorded sha256; return the manifest."""
    path = Path(path)
    manifest = read_manifest(path)
    for name, expected in manifest.sha256.items():
        file = path / name
        if not file.is_file():
            raise UsageError(f"bundle file missing: {file}")
        if sha256_file(file) != expected:
            raise UsageError(f"{file} does not match its recorded sha256 (corrupted or modified)")
    return manifest


# ---------------------------------------------------------------------------------------------
# Loading


def _skeleton(path: Path, keys: list[str], slots: list[Slot], dtype: torch.dtype) -> nn.Module:
    """An uninitialised model with one layer per unique module, then stacked as ``slots``."""
    config = AutoConfig.from_pretrained(path)
    first = {}
    for slot in slots:
        first.setdefault(slot.key, slot.position)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        config.layer_types = [layer_types[first[key]] for key in keys]
    config.num_hidden_layers = len(keys)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # no_init_weights also skips tying the embeddings
    unique = dict(zip(keys, get_layers(model)))
    set_layers(model, [unique[s.key] for s in slots], [keys.index(s.key) for s in slots])
    return model


def _load_deduplicated(path: Path, slots: list[Slot], dtype: torch.dtype) -> nn.Module:
    keys = list(dict.fromkeys(slot.key for slot in slots))
    model = _skeleton(path, keys, slots, dtype)
    states: dict[str, dict[str, torch.Tensor]] = {key: {} for key in keys}
    for name, tensor in load_tensors(path / LAYER_WEIGHTS).items():
        _, kind, source, param = name.split(".", 3)
        if f"{kind}.{source}" not in states:
            raise UsageError(f"{path / LAYER_WEIGHTS} holds module {kind}.{source}, which no slot uses")
        states[f"{kind}.{source}"][param] = tensor
    base = load_tensors(path / BASE_WEIGHTS)
    prefix = _layer_prefix(model)
    expected = {name for name in _owned_state(model) if not name.startswith(prefix)}
    if set(base) != expected:
        raise UsageError(
            f"{path / BASE_WEIGHTS} does not match the config's model (differs in {sorted(set(base) ^ expected)[:3]})"
        )
    try:
        model.load_state_dict(base, strict=False)
        for key, module in modules_by_key(model, slots).items():
            module.load_state_dict(states[key], strict=True)
    except RuntimeError as exc:
        raise UsageError(f"{path}: tensors do not fit the config: {str(exc).splitlines()[0]}") from exc
    return model


def _load_transformers(path: Path, dtype: torch.dtype) -> nn.Module:
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True)
    except (OSError, ValueError, SafetensorError) as exc:
        raise UsageError(f"cannot load the emulator in {path}: {str(exc).splitlines()[0]}") from exc


def load_emulator(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None) -> Emulator:
    """Rebuild an emulator from its bundle alone (no full model), after verifying every tensor file.

    Sharing is re-created from the slot keys: positions with one key get one module object.
    Adapter layers come back trainable, everything else frozen.
    """
    path = Path(path)
    manifest = verify_bundle(path)
    slots = manifest.spec.slots
    model = _load_deduplicated(path, slots, dtype) if manifest.spec.shares else _load_transformers(path, dtype)
    if num_layers(model) != len(slots):
        raise UsageError(f"{path}: config.json has {num_layers(model)} layers but the plan has {len(slots)} positions")
    if device is not None:
        model.to(device)
    model.eval()
    emulator = Emulator(model, load_tokenizer(str(path)), manifest.spec, manifest.base_fingerprint)
    emulator.freeze()
    return emulator


# ---------------------------------------------------------------------------------------------
# Privacy check


Digest = tuple[str, tuple[int, ...], str]


def _digest(tensor: torch.Tensor) -> Digest:
    """Dtype, shape and sha256 of a tensor's bytes: equal digests mean equal tensors."""
    values = tensor.detach().to("cpu").contiguous()
    raw = values.reshape(-1).view(torch.uint8).numpy().tobytes()
    return str(values.dtype), tuple(values.shape), hashlib.sha256(raw).hexdigest()


def leaked_tensors(bundle_dir: str | Path, full_model: nn.Module, layers: Iterable[int] | None = None) -> list[str]:
    """Tensors of the full model's ``layers`` (default: those the bundle's plan removed) found in the bundle.

    Every tensor of every tensor file of the bundle is compared with every tensor of those
    layers, cast to each dtype the bundle holds (so a bfloat16 bundle is checked against a
    float32 model as exactly as a float32 one). A tensor counts only when no other part of the
    full model holds the same values, since those reveal nothing new (freshly initialised norms
    are all ones in every layer). Returns ``layers.<i>.<name>`` of every leaked tensor: an
    empty list means the bundle reveals none of those layers.
    """
    bundle_dir = Path(bundle_dir)
    manifest = verify_bundle(bundle_dir)
    plan = manifest.spec.plan
    targets = set(range(plan.num_layers)) - set(plan.kept) if layers is None else set(layers)
    stored = [t for name in manifest.sha256 for t in load_tensors(bundle_dir / name).values()]
    in_bundle = {_digest(t) for t in stored}
    dtypes = {t.dtype for t in stored}

    def digests(tensor: torch.Tensor) -> set[Digest]:
        return {_digest(tensor.to(dtype)) for dtype in dtypes}

    stack = get_layers(full_model)
    prefix = _layer_prefix(full_model)
    others = [t for name, t in _owned_state(full_model).items() if not name.startswith(prefix)]
    others += [t for i, layer in enumerate(stack) if i not in targets for t in layer.state_dict().values()]
    elsewhere = set().union(*(digests(t) for t in others))
    leaked = []
    for i in sorted(targets):
        for name, tensor in stack[i].state_dict().items():
            if (digests(tensor) & in_bundle) - elsewhere:
                leaked.append(f"layers.{i}.{name}")
    return leaked
