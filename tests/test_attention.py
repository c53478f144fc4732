"""Attention for bf16 training on a CPU: the explicit products equal SDPA, and the switch is scoped."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from crashlm.core import attention
from crashlm.core.attention import EXPLICIT_BELOW_TOKENS, IMPLEMENTATION, explicit_attention, training_attention, uses_explicit
from tests.tiny import TINY_ARCHS, batch, tiny_model


class _Attention(nn.Module):
    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups, self.is_causal = groups, True


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 3), kv_heads=st.integers(1, 3), groups=st.integers(1, 3), tokens=st.integers(1, 12),
       head=st.sampled_from([4, 8]), mask=st.sampled_from(["causal", "bool", "float"]),
       scaling=st.one_of(st.none(), st.floats(0.05, 2.0)), seed=st.integers(0, 2**16))
def test_explicit_attention_equals_sdpa_forward_and_backward(rows, kv_heads, groups, tokens, head, mask, scaling, seed):
    gen = torch.Generator().manual_seed(seed)
    shape_q, shape_kv = (rows, kv_heads * groups, tokens, head), (rows, kv_heads, tokens, head)
    inputs = [torch.randn(s, generator=gen, dtype=torch.float64, requires_grad=True) for s in (shape_q, shape_kv, shape_kv)]
    attention_mask = None
    if mask != "causal":
        # Causal with random holes, each query keeping itself (a padding mask never empties a row).
        allowed = torch.ones(tokens, tokens, dtype=torch.bool).tril() & (torch.rand(rows, 1, tokens, tokens, generator=gen) > 0.3)
        allowed |= torch.eye(tokens, dtype=torch.bool)
        attention_mask = allowed if mask == "bool" else torch.zeros(allowed.shape, dtype=torch.float64).masked_fill(
            ~allowed, torch.finfo(torch.float64).min)
    module = _Attention(groups).eval()
    outputs = []
    for fn in (explicit_attention, lambda *a: sdpa_attention_forward(*a)[0]):
        out = fn(module, *inputs, attention_mask, 0.0, scaling, None)
        grads = torch.autograd.grad(out.square().sum(), inputs)
        outputs.append((out, *grads))
    assert outputs[0][0].shape == (rows, tokens, kv_heads * groups, head)
    for mine, reference in zip(*outputs):
        torch.testing.assert_close(mine, reference, rtol=1e-9, atol=1e-9)


def test_explicit_products_only_where_the_fused_backward_is_slow():
    def q(tokens=8, dtype=torch.bfloat16, grad=True):
        return torch.zeros(1, 2, tokens, 4, dtype=dtype, requires_grad=grad)

    k = torch.zeros(1, 2, 8, 4, dtype=torch.bfloat16)
    assert uses_explicit(q(), k)
    assert not uses_explicit(q(grad=False), k)  # validation, evaluation: forward only
    assert not uses_explicit(q(dtype=torch.float32), k)  # fp32 without autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert uses_explicit(q(dtype=torch.float32), k)  # autocast computes the products in bf16
    long_k = torch.zeros(1, 2, EXPLICIT_BELOW_TOKENS, 4, dtype=torch.bfloat16)
    assert not uses_explicit(q(EXPLICIT_BELOW_TOKENS), long_k)
    assert not uses_explicit(q(), k, position_bias=torch.zeros(1))  # what only SDPA's path implements
    assert uses_explicit(q(), k, position_ids=torch.zeros(1), sinks=None)


def _loss_and_grads(model, inputs, bf16: bool) -> tuple[float, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    return float(loss.detach()), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_training_attention_trains_as_sdpa_does_and_gives_the_implementation_back(arch, monkeypatch):
    model, tokenizer = tiny_model(arch)
    model.eval()  # no dropout: the runs below differ by their attention alone
    inputs = batch(tokenizer)
    before = model.config._attn_implementation
    calls = []
    monkeypatch.setattr(attention, "explicit_attention",
                        lambda *a, **k: calls.append(1) or explicit_attention(*a, **k))
    exact_loss, exact = _loss_and_grads(model, inputs, bf16=False)
    sdpa_loss, sdpa = _loss_and_grads(model, inputs, bf16=True)
    with pytest.raises(KeyboardInterrupt), training_attention(model, True) as used:
        loss, grads = _loss_and_grads(model, inputs, bf16=True)
        raise KeyboardInterrupt  # an interrupted run gives the implementation back too
    assert model.config._attn_implementation == before
    if before != "sdpa":  # eager-only architectures (ALiBi, soft-capping) keep their own
        assert used == before and not calls
        return
    assert used == IMPLEMENTATION and len(calls) == model.config.num_hidden_layers
    # bf16 rounding apart, the same training signal as the fused kernel's.
    assert abs(loss - exact_loss) <= 2 * abs(sdpa_loss - exact_loss) + 1e-2
    assert (grads - exact).norm() <= 2 * (sdpa - exact).norm() + 1e-2 * exact.norm()
    with training_attention(model, False) as used:
        assert used == "sdpa" and model.config._attn_implementation == "sdpa"
