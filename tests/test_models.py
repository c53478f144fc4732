"""Layer access, layer-stack surgery, loading errors and fingerprints on every architecture.

Each test runs on tiny random models (tests/tiny.py) of every supported family, plus the
variants whose parts live elsewhere (OPT-350m, Falcon-40b, alibi Falcon).
"""

from __future__ import annotations

import math

import huggingface_hub.constants
import pytest
import torch
from torch import nn
from transformers import BertConfig, T5Config

from crashlm.core.errors import UsageError
from crashlm.core.models import (
    ARCHITECTURES,
    arch_spec,
    capture_layer_io,
    fingerprint,
    get_final_norm,
    get_layers,
    get_unembed,
    hidden_to_logits,
    load_model,
    set_layers,
)
from tests.tiny import TINY_ARCHS, TINY_LAYOUTS, batch, save_tiny, tiny_model

L = 6  # layers of every tiny model here
NEW_TOKENS = 5


def forward(model, inputs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    with torch.no_grad(), capture_layer_io(model) as states:
        logits = model(**inputs).logits
    return logits, states


def generate(model, tokenizer, use_cache: bool) -> torch.Tensor:
    inputs = batch(tokenizer, padding_side="left")
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                              do_sample=False, use_cache=use_cache)


def layer_indices(model) -> list[set[int]]:
    """Per position, the ``layer_idx`` values (KV-cache slots) of the modules in that layer."""
    return [
        {m.layer_idx for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int)}
        for layer in get_layers(model)
    ]


# ---------------------------------------------------------------------------------------------
# Parts and the residual stream


@pytest.mark.parametrize("arch", TINY_LAYOUTS)
def test_parts_decode_the_last_layer_into_the_model_logits(arch):
    model, tok = tiny_model(arch)
    inputs = batch(tok)
    with torch.no_grad():
        hidden_states = model(**inputs, output_hidden_states=True).hidden_states
    logits, states = forward(model, inputs)

    layers = get_layers(model)
    assert isinstance(layers, nn.ModuleList) and len(layers) == L == model.config.num_hidden_layers
    assert len(states) == L + 1
    # Same meaning as HF's hidden_states before the last one (which some models normalise).
    for i in range(L):
        torch.testing.assert_close(states[i], hidden_states[i])
    unembed = get_unembed(model)
    assert isinstance(unembed, nn.Linear) and unembed.out_features == model.config.vocab_size
    norm = get_final_norm(model)
    assert (norm is None) == (arch == "opt-350m")  # OPT-350m is post-LN: no final norm, a project_out
    torch.testing.assert_close(hidden_to_logits(model, states[-1]), logits, atol=1e-4, rtol=0)


def test_first_state_includes_position_embeddings():
    model, tok = tiny_model("gpt2")
    inputs = batch(tok, ["The capital of France is"])
    _, states = forward(model, inputs)
    ids = inputs["input_ids"]
    positions = torch.arange(ids.shape[1])
    expected = model.transformer.wte(ids) + model.transformer.wpe(positions)
    torch.testing.assert_close(states[0], expected)


def test_first_state_includes_gemma_embedding_scale():
    model, tok = tiny_model("gemma")
    inputs = batch(tok, ["The capital of France is"])
    _, states = forward(model, inputs)
    raw = nn.functional.embedding(inputs["input_ids"], model.model.embed_tokens.weight)
    torch.testing.assert_close(states[0], raw * math.sqrt(model.config.hidden_size))


# ---------------------------------------------------------------------------------------------
# Replacing the layer stack


@pytest.mark.parametrize("arch", TINY_LAYOUTS)
def test_dropping_layers_keeps_cache_generation_and_save_reload(arch, tmp_path):
    model, tok = tiny_model(arch)
    original = list(get_layers(model))
    layer_types = getattr(model.config, "layer_types", None)
    keep = [0, 2, L - 1]
    set_layers(model, [original[i] for i in keep], keep)

    assert [id(m) for m in get_layers(model)] == [id(original[i]) for i in keep]
    assert model.config.num_hidden_layers == len(keep)
    assert layer_indices(model) == [{0}, {1}, {2}]
    if layer_types is not None:
        assert model.config.layer_types == [layer_types[i] for i in keep]
    logits, states = forward(model, batch(tok))
    assert logits.shape[-1] == model.config.vocab_size and len(states) == len(keep) + 1
    # A wrong layer_idx makes the KV cache fail or disagree with full recomputation.
    assert model.config.use_cache
    torch.testing.assert_close(generate(model, tok, use_cache=True), generate(model, tok, use_cache=False))

    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    reloaded, _ = load_model(str(tmp_path))
    assert reloaded.config.num_hidden_layers == len(keep)
    torch.testing.assert_close(forward(reloaded, batch(tok))[0], logits)


@pytest.mark.parametrize("arch", TINY_LAYOUTS)
def test_sharing_and_reordering_layers_disables_the_cache(arch):
    model, tok = tiny_model(arch)
    original = list(get_layers(model))
    sources = [0, 0, L - 1, 2]  # layer 0's module at positions 0 and 1; L-1 before 2
    set_layers(model, [original[i] for i in sources], sources)

    layers = get_layers(model)
    assert layers[0] is layers[1] and model.config.num_hidden_layers == len(sources)
    assert layer_indices(model) == [{0}, {0}, {2}, {3}]  # a shared module keeps its first slot
    assert model.config.use_cache is False and model.generation_config.use_cache is False
    logits, states = forward(model, batch(tok))
    assert len(states) == len(sources) + 1  # one embedding state although layer 0 runs twice
    assert not torch.equal(states[1], states[2])  # the shared module really ran twice
    torch.testing.assert_close(hidden_to_logits(model, states[-1]), logits, atol=1e-4, rtol=0)
    generated = generate(model, tok, use_cache=False)
    assert generated.shape[1] == batch(tok)["input_ids"].shape[1] + NEW_TOKENS


def test_set_layers_rejects_sources_outside_the_stack():
    model, _ = tiny_model("llama")
    layers = list(get_layers(model))
    with pytest.raises(ValueError):
        set_layers(model, layers[:2], [0, L])
    with pytest.raises(ValueError):
        set_layers(model, layers[:2], [0])


# ---------------------------------------------------------------------------------------------
# Fingerprints


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_fingerprint_identifies_the_checkpoint_not_the_dtype(arch, tmp_path):
    model, _ = tiny_model(arch)
    save_tiny(arch, tmp_path)
    reloaded, _ = load_model(str(tmp_path))
    bf16, _ = load_model(str(tmp_path), dtype=torch.bfloat16)
    assert fingerprint(model) == fingerprint(reloaded) == fingerprint(bf16)

    with torch.no_grad():
        next(get_layers(reloaded)[0].parameters()).mul_(1.5)
    assert fingerprint(reloaded) != fingerprint(model)


def test_fingerprint_differs_between_models():
    base = fingerprint(tiny_model("llama")[0])
    assert fingerprint(tiny_model("llama", num_layers=4)[0]) != base
    assert fingerprint(tiny_model("mistral")[0]) != base


# ---------------------------------------------------------------------------------------------
# User errors


@pytest.mark.parametrize("config", [BertConfig(), T5Config()], ids=["bert", "t5"])
def test_unsupported_architecture_is_a_one_line_usage_error(config, tmp_path):
    with pytest.raises(UsageError) as info:
        arch_spec(config)
    message = str(info.value)
    assert "\n" not in message and config.model_type in message
    assert all(name in message for name in ARCHITECTURES)
    # load_model checks the config before reading weights (this directory has none).
    config.save_pretrained(tmp_path)
    with pytest.raises(UsageError, match="unsupported architecture"):
        load_model(str(tmp_path))


def test_missing_model_paths_are_usage_errors(tmp_path):
    for spec in (str(tmp_path / "nope"), "./no/such/model", str(tmp_path), str(tmp_path / "model.gguf")):
        with pytest.raises(UsageError) as info:
            load_model(spec)
        assert "\n" not in str(info.value)


def test_hub_id_offline_is_a_one_line_usage_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    with pytest.raises(UsageError, match="offline") as info:
        load_model("no-such-org/no-such-model")
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# The embedded real model


@pytest.mark.integration
def test_embedded_model_loads_generates_and_fingerprints():
    model, tok = load_model("smollm2-135m")
    assert len(get_layers(model)) == 30 and model.config.hidden_size == 576
    inputs = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert "Paris" in tok.decode(out[0, inputs["input_ids"].shape[1]:])
    bf16, _ = load_model("smollm2-135m", dtype=torch.bfloat16)
    assert fingerprint(model) == fingerprint(bf16)
