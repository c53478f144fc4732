"""Emulators: the compressed stand-in for the full model that the data owner fine-tunes on.

An emulator is the full model with its decoder stack replaced by ``plan.slots(sharing,
share_trainable)`` (see :mod:`crashlm.emulators.plans`): for every position, the module named by the
slot's key. ``adapter.<s>`` is layer s itself and trains; ``frozen.<s>`` is layer s, frozen;
``copy.<s>`` is a frozen copy of trainable layer s's pretrained weights (what the original
CRaSh puts where a removed position's nearest kept layer trains). Positions with the same key
hold the *same* module object, so sharing costs no memory and a shared layer is stored once.

The three strategies of the paper's table:

* ``uniform``: Offsite-Tuning's uniform drop, no sharing (K positions);
* ``crash``: CRaSh's clusters, each represented by its middle layer, no sharing ("CRaSh w/o
  sharing", K positions);
* ``crash-share``: the same kept layers shared over the full depth (L positions).

The bundle (what the model owner sends) is a directory::

    crashlm.json        format, version, layout, strategy, plan, sharing flags, slots, base
                        fingerprint, summary, versions, sha256 of every tensor file
    config.json         the emulator's config (num_hidden_layers = number of positions)
    tokenizer files
    layout "transformers" (no sharing): model.safetensors (standard names, written by
                        save_pretrained), so the bundle is also a plain HF model directory
    layout "deduplicated" (sharing): layers.safetensors (each unique module once, keys
                        ``modules.<key>.<param>``) + base.safetensors (embeddings, final norm,
                        unembedding with their HF names; tied embeddings once)

A sharing bundle is not written in the transformers layout because that format stores every
position's weights separately: shared layers would be duplicated on disk and untied on load.
No tensor of a removed layer is ever written; :func:`leaked_tensors` checks a bundle against
the full model.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import torch
from safetensors import SafetensorError
from torch import nn

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
    fingerprint,
    get_layers,
    load_tokenizer,
    num_layers,
    set_layers,
)
from crashlm.core.tasks import ANALYSIS_SPLIT
from crashlm.emulators.plans import (
    DEFAULT_TRAINABLE,
    LayerPlan,
    Slot,
    check_k,
    crash_plan,
    default_k,
    uniform_plan,
)

if TYPE_CHECKING:
    from crashlm.analysis.similarity import SimilarityResult

EMULATOR_STRATEGIES = ("uniform", "crash", "crash-share")
BUNDLE_FORMAT = "crashlm-emulator"
BUNDLE_VERSION = 1
MANIFEST = "crashlm.json"
LAYOUTS = ("transformers", "deduplicated")
HF_WEIGHTS = "model.safetensors"
LAYER_WEIGHTS = "layers.safetensors"
BASE_WEIGHTS = "base.safetensors"


def check_strategy(strategy: str) -> None:
    if strategy not in EMULATOR_STRATEGIES:
        raise UsageError(f"unknown emulator strategy {strategy!r}; choose one of {', '.join(EMULATOR_STRATEGIES)}")


def strategy_shares(strategy: str) -> bool:
    """Whether a strategy fills removed positions with shared kept layers."""
    check_strategy(strategy)
    return strategy == "crash-share"


# ---------------------------------------------------------------------------------------------
# Plans


def make_plan(
    model: nn.Module,
    strategy: str,
    k: int | None = None,
    trainable: int = DEFAULT_TRAINABLE,
    similarity: SimilarityResult | None = None,
    task: str = "piqa",
    samples: int = 512,
    pooling: str = "mean_weighted",
    model_name: str | None = None,
    split: str = ANALYSIS_SPLIT,
) -> LayerPlan:
    """The layer plan of ``strategy`` for ``model``, stamped with its fingerprint and name.

    CRaSh strategies cluster by ``similarity`` (a :class:`~crashlm.analysis.similarity.SimilarityResult`).
    When it is not given it is computed on ``samples`` examples of ``task``'s ``split`` (the
    train split by default: no evaluation item shapes the plan) by
    :func:`~crashlm.analysis.similarity.compute_similarity`, which loads ``model_name`` itself; K is
    checked first, so a bad K fails before that work.
    """
    check_strategy(strategy)
    depth = num_layers(model)
    k = default_k(depth) if k is None else k
    check_k(k, depth, trainable)
    model_name = model_name or getattr(model.config, "_name_or_path", None) or None
    meta = {"base_fingerprint": fingerprint(model), "model": model_name}
    if strategy == "uniform":
        return uniform_plan(depth, k, trainable, **meta)
    if similarity is None:
        from crashlm.analysis.similarity import compute_similarity

        if model_name is None:
            raise UsageError("computing the layer similarity needs the model's name or path (model_name)")
        similarity = compute_similarity(model_name, task=task, samples=samples, pooling=pooling, split=split)
    if similarity.num_layers != depth:
        raise UsageError(f"the similarity describes {similarity.num_layers} layers but the model has {depth}")
    settings = {key: value for key, value in similarity.to_dict().items() if key not in ("cka", "adjacent")}
    return crash_plan(similarity.adjacent_layers, k, trainable, similarity=settings, **meta)


# ---------------------------------------------------------------------------------------------
# The emulator


def modules_by_key(model: nn.Module, slots: Iterable[Slot]) -> dict[str, nn.Module]:
    """The module of each slot key in ``model``'s stack, in order of first position."""
    layers = get_layers(model)
    unique: dict[str, nn.Module] = {}
    for slot in slots:
        unique.setdefault(slot.module, layers[slot.position])
    return unique


@dataclass
class Emulator:
    """A runnable causal LM whose decoder stack is ``plan.slots(sharing, share_trainable)``."""

    model: nn.Module
    tokenizer: Any
    plan: LayerPlan
    sharing: bool = False
    share_trainable: bool = False
    base_fingerprint: str | None = None

    @property
    def slots(self) -> list[Slot]:
        return self.plan.slots(self.sharing, self.share_trainable)

    @property
    def strategy(self) -> str:
        """The plan's strategy, with ``-share`` when removed positions are filled (``crash-share``)."""
        return f"{self.plan.strategy}-share" if self.sharing else self.plan.strategy

    def modules_by_key(self) -> dict[str, nn.Module]:
        """Each unique module once, by slot key, in order of first position."""
        return modules_by_key(self.model, self.slots)

    def adapter_layers(self) -> dict[int, nn.Module]:
        """Source layer index -> the trainable module at that layer's position(s)."""
        return {int(key.split(".")[1]): module for key, module in self.modules_by_key().items()
                if key.startswith("adapter.")}

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


def _check_plan(model: nn.Module, plan: LayerPlan) -> str:
    """The model's fingerprint, after checking that ``plan`` was made for this model."""
    depth = num_layers(model)
    if plan.num_layers != depth:
        raise UsageError(f"the plan is for a {plan.num_layers}-layer model but this model has {depth} layers")
    base = fingerprint(model)
    plan.check_base(base)
    return base


def build_emulator(
    model: nn.Module, tokenizer, plan: LayerPlan, sharing: bool = False, share_trainable: bool = False
) -> Emulator:
    """Turn the FULL ``model`` into the emulator of ``plan``, in place.

    ``model`` is consumed: its layer stack is replaced and the removed layers are released, so
    no second full copy is ever held (load a fresh model to keep the full one). Only ``copy.<s>``
    modules are deep-copied; the model's config object is shared with the copies, not cloned.
    """
    base = _check_plan(model, plan)
    slots = plan.slots(sharing, share_trainable)
    layers = get_layers(model)
    modules: dict[str, nn.Module] = {}
    for slot in slots:
        if slot.module not in modules:
            layer = layers[slot.source]
            # Copies are made before the stack changes, so they hold pretrained weights.
            modules[slot.module] = copy.deepcopy(layer, {id(model.config): model.config}) \
                if slot.module.startswith("copy.") else layer
    set_layers(model, [modules[slot.module] for slot in slots], [slot.source for slot in slots])
    emulator = Emulator(model, tokenizer, plan, sharing, share_trainable, base)
    emulator.freeze()
    return emulator


# ---------------------------------------------------------------------------------------------
# Bundles


def _owned_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """``state_dict`` without aliases: a tied tensor appears once, under its first name."""
    owned = {name for name, _ in module.named_parameters()} | {name for name, _ in module.named_buffers()}
    return {name: tensor for name, tensor in module.state_dict().items() if name in owned}


def _layer_prefix(model: nn.Module) -> str:
    return arch_spec(model).layers + "."


def _versions() -> dict[str, str]:
    import transformers

    return {"crashlm_version": __version__, "transformers_version": transformers.__version__,
            "torch_version": torch.__version__}


def save_bundle(emulator: Emulator, out_dir: str | Path) -> Path:
    """Write what the model owner sends: see the module docstring for the layout. Atomic."""
    out_dir = Path(out_dir)
    model = emulator.model
    with atomic_dir(out_dir) as tmp:
        if emulator.sharing:
            layout = "deduplicated"
            layer_tensors = {f"modules.{key}.{name}": tensor for key, module in emulator.modules_by_key().items()
                             for name, tensor in module.state_dict().items()}
            prefix = _layer_prefix(model)
            base_tensors = {name: t for name, t in _owned_state(model).items() if not name.startswith(prefix)}
            hashes = {LAYER_WEIGHTS: save_tensors(tmp / LAYER_WEIGHTS, layer_tensors),
                      BASE_WEIGHTS: save_tensors(tmp / BASE_WEIGHTS, base_tensors)}
            model.config.save_pretrained(tmp)
        else:
            layout = "transformers"
            model.save_pretrained(tmp)
            hashes = {path.name: sha256_file(path) for path in sorted(tmp.glob("*.safetensors"))}
        emulator.tokenizer.save_pretrained(tmp)
        write_json(tmp / MANIFEST, {
            "format": BUNDLE_FORMAT,
            "version": BUNDLE_VERSION,
            "layout": layout,
            "strategy": emulator.strategy,
            "plan": emulator.plan.to_dict(),
            "sharing": emulator.sharing,
            "share_trainable": emulator.share_trainable,
            "slots": [{"position": s.position, "source": s.source, "module": s.module} for s in emulator.slots],
            "base_fingerprint": emulator.base_fingerprint,
            "summary": emulator.summary(),
            **_versions(),
            "sha256": hashes,
        })
    return out_dir


def is_bundle(path: str | Path) -> bool:
    """Whether ``path`` is a directory holding an emulator bundle's manifest."""
    manifest = Path(path) / MANIFEST
    if not manifest.is_file():
        return False
    try:
        return read_json(manifest, "bundle manifest").get("format") == BUNDLE_FORMAT
    except (UsageError, AttributeError):
        return False


def read_manifest(path: str | Path) -> dict:
    """The checked ``crashlm.json`` of a bundle (UsageError when ``path`` is not a bundle)."""
    path = Path(path)
    manifest = read_artifact_meta(path, MANIFEST, "emulator bundle", BUNDLE_FORMAT, BUNDLE_VERSION)
    missing = [key for key in ("layout", "plan", "sharing", "share_trainable", "slots", "sha256") if key not in manifest]
    if missing or manifest["layout"] not in LAYOUTS:
        raise UsageError(f"{path}: incomplete bundle manifest (missing or bad: {', '.join(missing) or 'layout'})")
    return manifest


def verify_bundle(path: str | Path) -> dict:
    """Check every tensor file against its recorded sha256; return the manifest."""
    path = Path(path)
    manifest = read_manifest(path)
    for name, expected in manifest["sha256"].items():
        file = path / name
        if not file.is_file():
            raise UsageError(f"bundle file missing: {file}")
        if sha256_file(file) != expected:
            raise UsageError(f"{file} does not match its recorded sha256 (corrupted or modified)")
    return manifest


def _skeleton(path: Path, keys: list[str], slots: list[Slot], dtype: torch.dtype) -> nn.Module:
    """An uninitialised model with one layer per unique module, then stacked as ``slots``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights

    config = AutoConfig.from_pretrained(path)
    first = {}
    for slot in slots:
        first.setdefault(slot.module, slot.position)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        config.layer_types = [layer_types[first[key]] for key in keys]
    config.num_hidden_layers = len(keys)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # no_init_weights also skips tying the embeddings
    unique = dict(zip(keys, get_layers(model)))
    set_layers(model, [unique[s.module] for s in slots], [keys.index(s.module) for s in slots])
    return model


def _load_deduplicated(path: Path, slots: list[Slot], dtype: torch.dtype) -> nn.Module:
    keys = list(dict.fromkeys(slot.module for slot in slots))
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
        raise UsageError(f"{path / BASE_WEIGHTS} does not match the config's model (differs in {sorted(set(base) ^ expected)[:3]})")
    try:
        model.load_state_dict(base, strict=False)
        for key, module in modules_by_key(model, slots).items():
            module.load_state_dict(states[key], strict=True)
    except RuntimeError as exc:
        raise UsageError(f"{path}: tensors do not fit the config: {str(exc).splitlines()[0]}") from exc
    return model


def _load_transformers(path: Path, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

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
    plan = LayerPlan.from_dict(manifest["plan"])
    sharing, share_trainable = bool(manifest["sharing"]), bool(manifest["share_trainable"])
    slots = plan.slots(sharing, share_trainable)
    if manifest["slots"] != [asdict(slot) for slot in slots]:
        raise UsageError(f"{path}: the recorded slots do not follow from the bundle's plan")
    if manifest["layout"] != ("deduplicated" if sharing else "transformers"):
        raise UsageError(f"{path}: layout {manifest['layout']!r} does not match sharing={sharing}")
    model = _load_deduplicated(path, slots, dtype) if sharing else _load_transformers(path, dtype)
    if num_layers(model) != len(slots):
        raise UsageError(f"{path}: config.json has {num_layers(model)} layers but the plan has {len(slots)} positions")
    if device is not None:
        model.to(device)
    model.eval()
    emulator = Emulator(model, load_tokenizer(str(path)), plan, sharing, share_trainable, manifest.get("base_fingerprint"))
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
    plan = LayerPlan.from_dict(manifest["plan"])
    targets = set(range(plan.num_layers)) - set(plan.kept) if layers is None else set(layers)
    stored = [t for name in manifest["sha256"] for t in load_tensors(bundle_dir / name).values()]
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
