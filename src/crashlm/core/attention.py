"""Attention for bf16 training on a CPU: explicit products for short sequences, SDPA otherwise.

PyTorch's fused CPU attention (``scaled_dot_product_attention``'s flash kernel) is fast forward,
but its bf16 backward is slow on short sequences (its time even falls from 160 to 192 tokens: 30.2
to 24.1 ms below, the kernel blocks its work differently there). On a 2-core AMX Xeon (torch 2.13,
one thread; ``benchmarks/bench_attention.py``, SmolLM2-135M's heads on a batch of 8) its forward +
backward took 18.5 / 26.0 ms at 96 / 128 tokens, against 9.3 / 15.6 ms for the explicit products
(``softmax(q k^T) v``, the softmax in fp32, as transformers' eager attention); from 192 tokens on
the fused kernel is the faster one (24.1 against 32.2 ms at 192, 98.6 against 324.2 at 512).
Forward only, without a backward, the fused kernel is faster at every length (1.5 against 3.4 ms at
128).

So :func:`training_attention` switches a model to :func:`attention_forward` for a block of training:
a call whose query needs a gradient, in bf16, on a CPU, with fewer than
:data:`EXPLICIT_BELOW_TOKENS` key tokens, runs the explicit products; every other call
(validation, evaluation, long sequences, fp32, GPUs) runs transformers' own SDPA path, with the
same masks, which the implementation borrows from ``sdpa``. Both compute the same attention;
only the rounding differs (the explicit scores are rounded to bf16 before the softmax, as
transformers' eager attention does).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

IMPLEMENTATION = "crashlm_training"
# Where the fused kernel's backward becomes the faster one, on 1 and 2 threads alike (measured by
# benchmarks/bench_attention.py: see the module docstring and benchmarks/results/bench_attention.md).
EXPLICIT_BELOW_TOKENS = 192
# Arguments of transformers' attention functions that the explicit path does not implement.
_SDPA_ONLY = ("position_bias", "s_aux", "sinks", "softcap")


def explicit_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                       is_causal: bool | None = None) -> torch.Tensor:
    """``softmax(q k^T * scaling + mask) v`` with the softmax in fp32: the attention SDPA computes, for
    the same arguments (a boolean mask keeps True, a float mask is added; no mask means causal
    where the module is). Returns [batch, query tokens, heads, head size], as transformers expects."""
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    q_len, k_len = query.shape[2], key.shape[2]
    if attention_mask is None and q_len > 1 and (is_causal if is_causal is not None else getattr(module, "is_causal", True)):
        # Upper-left aligned, as SDPA's is_causal.
        attention_mask = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril()
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    elif attention_mask is not None:
        scores = scores + attention_mask
    # The softmax in fp32 at least, as transformers' eager attention (fp64 stays fp64).
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous()


def _in_bf16(query: torch.Tensor) -> bool:
    """Whether attention on ``query`` computes in bf16: bf16 inputs, or bf16 autocast (which casts
    fp32 inputs, e.g. a query that met fp32 rotary tables, to bf16 at the products)."""
    device = query.device.type
    return query.dtype == torch.bfloat16 or (torch.is_autocast_enabled(device)
                                             and torch.get_autocast_dtype(device) == torch.bfloat16)


def uses_explicit(query: torch.Tensor, key: torch.Tensor, **kwargs) -> bool:
    """Whether :func:`attention_forward` runs the explicit products for this call."""
    return (query.requires_grad and query.device.type == "cpu" and _in_bf16(query)
            and key.shape[2] < EXPLICIT_BELOW_TOKENS and all(kwargs.get(k) is None for k in _SDPA_ONLY))


def attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: the explicit products where :func:`uses_explicit`, SDPA elsewhere."""
    if uses_explicit(query, key, **kwargs):
        return explicit_attention(module, query, key, value, attention_mask, dropout, scaling, is_causal), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


AttentionInterface.register(IMPLEMENTATION, attention_forward)
AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


@contextlib.contextmanager
def training_attention(model: nn.Module, enabled: bool) -> Iterator[str]:
    """Inside the block, a model that runs SDPA attention runs :func:`attention_forward` instead; its own
    implementation comes back after, also when the block raises. Yields the implementation in use.

    ``enabled``: the block trains in bf16 (on a GPU every call still runs SDPA). A model on another
    implementation (eager, flex) or that cannot switch keeps its own."""
    inner = getattr(model, "module", model)  # DDP wraps the model
    config = getattr(inner, "config", None)
    before = getattr(config, "_attn_implementation", None)
    if not enabled or before != "sdpa" or not hasattr(inner, "set_attn_implementation"):
        yield before
        return
    inner.set_attn_implementation(IMPLEMENTATION)
    try:
        yield config._attn_implementation
    finally:
        inner.set_attn_implementation(before)
