"""Tiny randomly initialised models of every supported architecture, for fast offline tests.

``tiny_model(arch)`` builds a few-layer model from a config (hidden 32, 4 heads, vocab 512) and
a byte-level BPE tokenizer trained on a few sentences, so every architecture path in crashlm
runs in milliseconds without a hub. ``TINY_VARIANTS`` adds config variants whose parts live
elsewhere (OPT-350m's projections, Falcon-40b's new decoder, alibi Falcon).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from crashlm.core.models import ARCHITECTURES

VOCAB_SIZE = 512
HIDDEN = 32
HEADS = 4
SEED = 0
PAD, EOS, BOS, UNK = "<pad>", "</s>", "<s>", "<unk>"

CORPUS = [
    "The capital of France is Paris.",
    "The quick brown fox jumps over the lazy dog.",
    "Layers of a language model can be removed, shared or clustered.",
    "A small model fine-tunes an adapter that plugs into the full model.",
    "Question: What is two plus two? Answer: four.",
    "Water boils at one hundred degrees Celsius at sea level.",
]

# Shape of every tiny model; per-architecture names for the same quantities follow.
_COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=HIDDEN,
    num_attention_heads=HEADS,
    max_position_embeddings=128,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
    tie_word_embeddings=False,
    use_cache=True,
)
_RMS_DECODER = dict(intermediate_size=64, num_key_value_heads=2)
_ALTERNATING_WINDOW = dict(sliding_window=4)  # shorter than test prompts, so the window matters
# Architectures whose config lists a per-layer attention kind; tiny ones alternate sliding/full.
_LAYER_TYPED = ("gemma2", "gemma3_text")

_ARCH_CONFIG: dict[str, dict[str, Any]] = {
    "llama": _RMS_DECODER,
    "mistral": dict(_RMS_DECODER, sliding_window=4),
    "qwen2": _RMS_DECODER,
    "qwen3": dict(_RMS_DECODER, head_dim=8),
    "gemma": dict(_RMS_DECODER, head_dim=8),
    "gemma2": dict(_RMS_DECODER, **_ALTERNATING_WINDOW, head_dim=8, final_logit_softcapping=5.0,
                   attn_logit_softcapping=20.0, query_pre_attn_scalar=8),
    "gemma3_text": dict(_RMS_DECODER, **_ALTERNATING_WINDOW, head_dim=8, query_pre_attn_scalar=8),
    "phi3": _RMS_DECODER,
    "opt": dict(ffn_dim=64, word_embed_proj_dim=HIDDEN),
    "gpt2": dict(n_inner=64),
    "gpt_neox": dict(intermediate_size=64, rotary_pct=0.5),
    "bloom": dict(),
    "phi": dict(intermediate_size=64, partial_rotary_factor=0.5),
    "falcon": dict(),
}

# name -> (model_type, config overrides): layouts that move or remove parts.
TINY_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    # OPT-350m: post-LN (no final norm), embeddings projected in and out of a smaller width.
    "opt-350m": ("opt", dict(word_embed_proj_dim=16, do_layer_norm_before=False)),
    # Falcon-40b/180b: grouped KV heads and two input norms per layer.
    "falcon-new-decoder": ("falcon", dict(new_decoder_architecture=True, num_kv_heads=2)),
    # Falcon-rw: alibi instead of rotary, sequential attention/MLP.
    "falcon-alibi": ("falcon", dict(alibi=True, parallel_attn=False, multi_query=False, bias=True, num_kv_heads=HEADS)),
}

TINY_ARCHS: list[str] = sorted(ARCHITECTURES)
# Every architecture plus the variants: what layer-access tests run over.
TINY_LAYOUTS: list[str] = TINY_ARCHS + sorted(TINY_VARIANTS)


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[PAD, EOS, BOS, UNK],  # ids 0..3, matching the configs above
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok.to_str()


def tiny_tokenizer(add_bos: bool = False, padding_side: str = "right") -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (any text encodes) with pad/eos/bos. ``add_bos``: it prepends
    BOS by default, as Gemma's, Llama 3's and OPT's do; ``padding_side`` as Gemma's (left) or not."""
    tokenizer = Tokenizer.from_str(_tokenizer_json())
    if add_bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token=PAD, eos_token=EOS, bos_token=BOS, unk_token=UNK,
        padding_side=padding_side,
    )


def tiny_config(arch: str, num_layers: int = 6, **overrides: Any):
    """Config of a tiny ``arch`` (a model_type or a ``TINY_VARIANTS`` name) with ``num_layers`` layers."""
    if arch in TINY_VARIANTS:
        model_type, variant = TINY_VARIANTS[arch]
        overrides = {**variant, **overrides}
    else:
        model_type = arch
    kwargs = {**_COMMON, **_ARCH_CONFIG[model_type], "num_hidden_layers": num_layers, **overrides}
    if model_type in _LAYER_TYPED:
        # Both kinds present, and len(layer_types) == num_hidden_layers as the config requires.
        kwargs.setdefault("layer_types", [
            "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(kwargs["num_hidden_layers"])
        ])
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(arch: str, num_layers: int = 6, add_bos: bool = False, **overrides: Any):
    """``(model, tokenizer)``: a seeded, float32, eval-mode tiny model of ``arch``; ``add_bos``:
    with a tokenizer that prepends BOS."""
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, num_layers, **overrides), dtype=torch.float32)
    model.generation_config.pad_token_id = 0
    return model.eval(), tiny_tokenizer(add_bos)


def save_tiny(arch: str, path: str | Path, num_layers: int = 6, add_bos: bool = False, **overrides: Any) -> Path:
    """Write a tiny model and its tokenizer as a HF directory, for ``--model path`` in CLI tests."""
    path = Path(path)
    model, tok = tiny_model(arch, num_layers, add_bos, **overrides)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def batch(tokenizer, texts: list[str] | None = None, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """A padded batch of prompts of different lengths (so padding is exercised); pad on the
    left for generation, which continues from the last column."""
    texts = texts or ["The capital of France is", "Water boils at one hundred degrees Celsius"]
    return dict(tokenizer(texts, return_tensors="pt", padding=True, padding_side=padding_side))
