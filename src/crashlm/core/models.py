"""Loading models and reaching their layers, for every supported decoder architecture.

Everything else in crashlm goes through this module to find a model's decoder layers, final
norm and unembedding, and to replace the layer stack (drop, reorder, share). Architectures
differ only in attribute paths, so each is one :class:`ArchSpec` row. See docs/architectures.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from crashlm.core import assets
from crashlm.core.errors import UsageError


@dataclass(frozen=True)
class ArchSpec:
    """Where one architecture family keeps its parts (dotted attribute paths).

    The unembedding is not listed: ``get_output_embeddings()`` finds it on every family and
    transformers version (GPT-NeoX's ``embed_out`` became ``lm_head`` in transformers 5).
    A path may resolve to ``None`` on some checkpoints (OPT-350m has no final norm but a
    ``project_out``; other OPTs the reverse): such parts are skipped.
    """

    layers: str
    final_norm: str | None
    # Extra modules between the final norm and the unembedding (OPT-350m's project_out).
    post_norm: tuple[str, ...] = ()


_LLAMA_LIKE = ArchSpec(layers="model.layers", final_norm="model.norm")

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "opt": ArchSpec(layers="model.decoder.layers", final_norm="model.decoder.final_layer_norm",
                    post_norm=("model.decoder.project_out",)),
    "gpt2": ArchSpec(layers="transformer.h", final_norm="transformer.ln_f"),
    "gpt_neox": ArchSpec(layers="gpt_neox.layers", final_norm="gpt_neox.final_layer_norm"),
    "bloom": ArchSpec(layers="transformer.h", final_norm="transformer.ln_f"),
    "phi": ArchSpec(layers="model.layers", final_norm="model.final_layernorm"),
    # Every Falcon layout (7b multi-query, 40b new_decoder_architecture, rw alibi) shares these paths.
    "falcon": ArchSpec(layers="transformer.h", final_norm="transformer.ln_f"),
}


def supported_architectures() -> list[str]:
    return sorted(ARCHITECTURES)


def arch_spec(model_or_config) -> ArchSpec:
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UsageError(
            f"unsupported architecture {model_type!r}; supported: {', '.join(supported_architectures())}"
        )
    return ARCHITECTURES[model_type]


def _get_path(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _set_path(obj, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        obj = getattr(obj, part)
    setattr(obj, last, value)


# ---------------------------------------------------------------------------------------------
# Layer access


def get_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list, in order."""
    return _get_path(model, arch_spec(model).layers)


def num_layers(model: nn.Module) -> int:
    return len(get_layers(model))


def get_final_norm(model: nn.Module) -> nn.Module | None:
    spec = arch_spec(model)
    return _get_path(model, spec.final_norm) if spec.final_norm else None


def get_unembed(model: nn.Module) -> nn.Module:
    arch_spec(model)  # same UsageError as the other accessors on an unsupported model
    return model.get_output_embeddings()


def hidden_to_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Decode a residual-stream state the way the model decodes its last layer.

    Applies the final norm (the original CRaSh logit lens forgot it), any post-norm
    projection, then the unembedding, and the model's own logit soft-capping if it has one.
    """
    spec = arch_spec(model)
    norm = get_final_norm(model)
    if norm is not None:
        hidden = norm(hidden)
    for path in spec.post_norm:
        module = _get_path(model, path)
        if module is not None:
            hidden = module(hidden)
    logits = get_unembed(model)(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _renumber(layer: nn.Module, index: int) -> None:
    for module in layer.modules():
        if hasattr(module, "layer_idx") and isinstance(module.layer_idx, int):
            module.layer_idx = index


def set_layers(model: nn.Module, layers: Sequence[nn.Module], sources: Sequence[int]) -> None:
    """Replace the decoder stack with ``layers``; ``sources[i]`` is the index of ``layers[i]`` in the current stack.

    Renumbers each attention module's ``layer_idx`` (KV-cache slots), and updates
    ``config.num_hidden_layers`` and per-layer config lists (``layer_types``: which layers use
    sliding-window attention, read by the model to pick each layer's mask) so generation and
    save/reload work. A module that appears at several positions (sharing) can hold only one
    ``layer_idx``, so its positions would overwrite each other's KV cache: the model's
    ``use_cache`` is turned off, and generation recomputes the whole prefix at every step.
    """
    if len(layers) != len(sources):
        raise ValueError("layers and sources must have the same length")
    current = len(get_layers(model))
    if any(not 0 <= s < current for s in sources):
        raise ValueError(f"sources must index the current {current} layers, got {list(sources)}")
    config = model.config
    layer_types = getattr(config, "layer_types", None)
    seen: set[int] = set()
    for position, layer in enumerate(layers):
        if id(layer) not in seen:
            _renumber(layer, position)
            seen.add(id(layer))
    _set_path(model, arch_spec(model).layers, nn.ModuleList(layers))
    if layer_types is not None and len(layer_types) == current:
        config.layer_types = [layer_types[s] for s in sources]
    config.num_hidden_layers = len(layers)
    if len(seen) != len(layers):
        config.use_cache = False
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.use_cache = False


@contextlib.contextmanager
def capture_layer_io(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Record the residual stream around every decoder layer during a forward pass.

    The yielded list fills with L + 1 tensors: the input of layer 0 (the embedding output,
    position embeddings included) followed by each layer's output. Hooks rather than
    ``output_hidden_states`` give the same meaning on every architecture: some models apply
    the final norm to their last hidden state, the hooks never do.
    """
    layers = get_layers(model)
    states: list[torch.Tensor] = []

    def pre_hook(_module, args, kwargs):
        # Layer 0's module may also sit at later positions (sharing): only its first call of a
        # forward pass sees the embedding output, and it comes after a multiple of L + 1 states.
        if len(states) % (len(layers) + 1) == 0:
            states.append(args[0] if args else kwargs["hidden_states"])

    def post_hook(_module, _args, output):
        states.append(output[0] if isinstance(output, (tuple, list)) else output)

    handles = [layers[0].register_forward_pre_hook(pre_hook, with_kwargs=True)]
    # A shared module fires its hook once per position it occupies, in order.
    for layer in {id(m): m for m in layers}.values():
        handles.append(layer.register_forward_hook(post_hook))
    try:
        yield states
    finally:
        for handle in handles:
            handle.remove()


# ---------------------------------------------------------------------------------------------
# Loading


def resolve_model(spec: str) -> str:
    """Map a ``--model`` value to a local Hugging Face directory or a hub id.

    A ``.gguf`` file maps to its converted safetensors copy in the cache (made on first use)."""
    if spec in assets.MODEL_ASSETS:
        return str(assets.model_dir(spec))
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UsageError(f"GGUF file not found: {path}")
        try:
            config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        except (OSError, ValueError, KeyError, struct.error) as exc:  # struct.error: a truncated file
            raise UsageError(f"{path} is not a readable GGUF model: {(str(exc).splitlines() or [repr(exc)])[0]}") from exc
        arch_spec(config)  # an unsupported architecture fails before the long conversion
        # Parsing and de-quantising a GGUF takes tens of seconds: do it once per file content.
        return str(assets.gguf_dir(path.resolve()))
    if path.exists():
        if not (path / "config.json").is_file():
            raise UsageError(f"{path} is not a Hugging Face model directory (no config.json)")
        return str(path)
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise UsageError(f"model path not found: {spec}")
    return spec  # a hub id


def _load_config(source: str):
    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or "offline" in str(exc).lower() or "connect" in str(exc).lower()
        if offline and not Path(source).exists():
            raise UsageError(
                f"cannot load model {source!r}: not a local path or alias, and the Hugging Face hub is "
                f"not reachable (offline). Known aliases: {', '.join(assets.MODEL_ASSETS)}"
            ) from exc
        raise UsageError(f"cannot load model {source!r}: {str(exc).splitlines()[0]}") from exc


def load_config(spec: str):
    """The config of a ``--model`` value, without reading any weights: for cheap checks (supported
    architecture, depth) before a long run."""
    config = _load_config(resolve_model(spec))
    arch_spec(config)
    return config


def load_tokenizer(source: str):
    try:
        tok = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, KeyError) as exc:  # missing, malformed or mismatched tokenizer files
        raise UsageError(f"cannot load the tokenizer in {source}: {(str(exc).splitlines() or [repr(exc)])[0]}") from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    spec: str = assets.DEFAULT_MODEL,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    device_map: str | None = None,
):
    """Load ``(model, tokenizer)`` from an alias, local directory, ``.gguf`` file or hub id.

    The architecture is checked from the config before any weights are read, so an
    unsupported model fails in a second with the list of supported ones. ``device_map``
    (e.g. ``"auto"``, needs accelerate) spreads a model too large for one device over the
    GPUs and CPU instead of moving it to ``device``.
    """
    source = resolve_model(spec)
    arch_spec(_load_config(source))
    tokenizer = load_tokenizer(source)  # also before the weights: a bad one fails fast
    # Never unpickle a checkpoint (pytorch_model.bin): weights come from safetensors only.
    kwargs = {"dtype": dtype, "use_safetensors": True}
    if device_map:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except SafetensorError as exc:
        shards = sorted(Path(source).glob("*.safetensors"))
        where = shards[0] if len(shards) == 1 else f"a weights file in {source}"
        raise UsageError(f"cannot load model {spec!r}: {where} is corrupted or truncated ({exc})") from exc
    except (OSError, ValueError) as exc:
        pickled = any(Path(source).glob("*.bin"))
        hint = " (crashlm reads safetensors weights only, never pickled .bin files)" if pickled else ""
        raise UsageError(f"cannot load model {spec!r}: {str(exc).splitlines()[0]}{hint}") from exc
    if device is not None and not device_map:
        model.to(device)
    model.eval()
    return model, tokenizer


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 matmuls natively (faster than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return False


@contextlib.contextmanager
def held_in_bf16(model: nn.Module, enabled: bool, frozen_only: bool = True) -> Iterator[int]:
    """Hold ``model``'s fp32 parameters (only the frozen ones by default) in bf16 inside the block;
    the exact fp32 values come back after, also when the block raises.

    For code that runs under bf16 autocast. There a frozen fp32 weight is re-cast at every
    forward (autocast caches only weights that require grad), and the fp32 residual stream is
    cast to bf16 at every matmul; a bf16 copy made once removes both. Autocast already rounds
    every matmul's weight to bf16, so the products change only where a weight was used in fp32
    (norm weights, embeddings) and in the residual stream, which then runs in bf16. Training
    holds its frozen weights so (its trainable ones and their AdamW state stay fp32);
    evaluation holds every weight. Yields how many parameters are held in bf16.

    Memory: a weight that bf16 holds exactly (a bf16 checkpoint loaded in fp32) comes back by
    upcasting, so only its bf16 copy is kept: half its fp32 size. Any other keeps its fp32
    original too: 1.5 times its size inside the block.
    """
    originals: dict[nn.Parameter, torch.Tensor | None] = {}
    if enabled:
        for param in {id(p): p for p in model.parameters()}.values():  # a shared module counts once
            # Offloaded weights (meta here, loaded by accelerate's hooks at each forward) stay as they are.
            if param.dtype == torch.float32 and param.device.type != "meta" and not (frozen_only and param.requires_grad):
                held = param.data.to(torch.bfloat16)
                originals[param] = None if torch.equal(held.float(), param.data) else param.data
                param.data = held
    try:
        yield len(originals)
    finally:
        for param, data in originals.items():
            param.data = param.data.float() if data is None else data


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def fingerprint(model: nn.Module) -> str:
    """A cheap identity of a base model: its config plus a strided sample of every weight.

    Samples are rounded to bf16 before hashing, so the same checkpoint loaded in fp32 or
    bf16 has the same fingerprint. Used to refuse adapters and plans made for another model.
    """
    digest = hashlib.sha256()
    cfg = model.config.to_dict()
    for key in ("dtype", "torch_dtype", "use_cache", "transformers_version", "_name_or_path", "architectures"):
        cfg.pop(key, None)
    digest.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // 1024)
        sample = flat[::step][:1024].to("cpu", torch.bfloat16).view(torch.int16)
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]
