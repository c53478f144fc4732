"""One encoding, lm-eval's: crashlm's log-likelihoods equal lm-eval's own HFLM on tokenizers that
add a BOS; training, validation and evaluation encode and truncate a pair the same way; analysis
inputs are independent of the padding side; the last layer state is output_hidden_states'."""

from __future__ import annotations

import json

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from crashlm.analysis.lens import token_states
from crashlm.analysis.similarity import collect_pooled_states
from crashlm.core.models import load_model, num_layers
from crashlm.core.scoring import (
    IGNORE_INDEX,
    encode_example,
    encode_pair,
    encode_request,
    encode_text,
    mean_answer_loss,
)
from crashlm.core.tasks import Example
from crashlm.evaluation.lm import CrashlmLM, model_max_length
from crashlm.training.config import TrainConfig
from crashlm.training.data import split_examples
from crashlm.training.full import train_full
from tests.tiny import TINY_LAYOUTS, tiny_model, tiny_tokenizer

REQUESTS = [
    ("The capital of France", " is Paris."),
    ("The capital of France", " is Rome"),
    ("Water boils at ", "one hundred degrees"),  # a trailing space moves to the continuation
    ("", "Water boils at sea level"),  # an empty context: the prefix token stands for it
    ("<s>Question: What is two plus two? Answer:", " four"),  # starts with BOS's text: no second BOS
    ("Layers of a language model can be removed, shared or clustered. " * 4, " Paris"),  # truncated at 32
]
MAX_LENGTH = 32


def _instances(requests):
    return [Instance("loglikelihood", {}, request, i) for i, request in enumerate(requests)]


def _hflm(model, tok, **kwargs) -> HFLM:
    return HFLM(pretrained=model, tokenizer=tok, batch_size=4, **kwargs)


@pytest.mark.parametrize("add_bos", [True, False])
def test_requests_are_encoded_as_hflm_encodes_them(add_bos):
    model, tok = tiny_model("llama", add_bos=add_bos)
    reference = _hflm(model, tok)
    for context, continuation in REQUESTS:
        ours = encode_request(tok, context, continuation)
        if context:
            assert ours == reference._encode_pair(context, continuation)
        else:
            ids = tok.encode(continuation, add_special_tokens=False)
            assert ours == ([reference.prefix_token_id], ids)
    assert (encode_request(tok, "The capital", " x")[0][0] == tok.bos_token_id) == add_bos


@pytest.mark.parametrize("arch", TINY_LAYOUTS)
def test_loglikelihoods_equal_hflm_with_a_bos_tokenizer_on_every_architecture(arch):
    model, tok = tiny_model(arch, add_bos=True)
    assert tok("Hello").input_ids[0] == tok.bos_token_id
    instances = _instances(REQUESTS)
    expected = _hflm(model, tok, max_length=MAX_LENGTH).loglikelihood(instances, disable_tqdm=True)
    lm = CrashlmLM(model, tok, batch_size=4, dtype=torch.float32, progress=False, max_length=MAX_LENGTH)
    ours = lm.loglikelihood(instances, disable_tqdm=True)
    assert [v for v, _ in ours] == pytest.approx([v for v, _ in expected], abs=1e-4)
    assert [g for _, g in ours] == [g for _, g in expected]
    assert lm.truncated == 1


def test_the_model_limit_is_found_as_lm_eval_finds_it():
    model, tok = tiny_model("gpt2", add_bos=True)
    assert model_max_length(model.config, tok) == _hflm(model, tok).max_length == 128
    assert CrashlmLM(model, tok, progress=False).max_length == 128


@pytest.mark.parametrize("add_bos", [True, False])
def test_training_pairs_are_the_evaluation_encoding_truncated_the_same_way(add_bos):
    model, tok = tiny_model("llama", add_bos=add_bos)
    for context, continuation in REQUESTS:
        context_ids, answer_ids = encode_request(tok, context, continuation)
        whole = context_ids + answer_ids
        pair = encode_pair(tok, context, continuation, MAX_LENGTH)
        # lm-eval keeps the last max_length + 1 tokens; the model reads all but the last.
        assert pair.input_ids == whole[-(MAX_LENGTH + 1):]
        assert pair.labels[-len(answer_ids):] == answer_ids
        assert set(pair.labels[: -len(answer_ids)]) <= {IGNORE_INDEX}
        assert pair.truncated == (len(whole) > MAX_LENGTH + 1)


def test_validation_loss_scores_what_evaluation_scores():
    """Mean answer loss over examples = minus the summed log-likelihood of the gold requests
    (same encoding, same truncation) over their answer tokens."""
    model, tok = tiny_model("qwen2", add_bos=True)
    examples = [Example(c, (x.lstrip(),), 0, i) for i, (c, x) in enumerate(REQUESTS) if c and not c.endswith(" ")]
    loss = mean_answer_loss(model, tok, examples, batch_size=2, max_length=MAX_LENGTH)
    lm = CrashlmLM(model, tok, dtype=torch.float32, progress=False, max_length=MAX_LENGTH)
    scores = lm.loglikelihood(_instances([(ex.context, ex.target) for ex in examples]), disable_tqdm=True)
    tokens = sum(encode_pair(tok, ex.context, ex.target, MAX_LENGTH).num_answer_tokens for ex in examples)
    assert loss == pytest.approx(-sum(v for v, _ in scores) / tokens, abs=1e-5)


def test_an_answer_longer_than_max_length_keeps_its_end_in_training_and_evaluation():
    model, tok = tiny_model("llama", add_bos=True)
    context, answer = "Q", " a b c d e f g h i j k l m n o p q r s t u v w x y z" * 2
    pair = encode_pair(tok, context, answer, 16)
    assert len(pair.input_ids) == 17 and pair.num_answer_tokens == 16
    lm = CrashlmLM(model, tok, dtype=torch.float32, progress=False, max_length=16)
    (value, _), = lm.loglikelihood(_instances([(context, answer)]), disable_tqdm=True)
    loss = mean_answer_loss(model, tok, [Example(context, (answer.lstrip(),), 0, 0)], max_length=16)
    assert value == pytest.approx(-16 * loss, abs=1e-4)


# ---------------------------------------------------------------------------------------------
# Analysis inputs


TEXTS = [
    "The capital of France is Paris.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "Question: What is two plus two? Answer: four.",
    "A small model fine-tunes an adapter.",
    "The quick brown fox jumps over the lazy dog.",
]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "gemma3_text", "bloom"])
def test_pooled_and_token_states_do_not_depend_on_the_padding_side(arch):
    model, _ = tiny_model(arch, add_bos=True)
    right, left = tiny_tokenizer(True, "right"), tiny_tokenizer(True, "left")
    for pooling in ("mean_weighted", "last"):
        a = collect_pooled_states(model, right, TEXTS, pooling, 2)
        b = collect_pooled_states(model, left, TEXTS, pooling, 2)
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(token_states(model, right, TEXTS).states, token_states(model, left, TEXTS).states)
    assert encode_text(left, TEXTS[0])[0] == left.bos_token_id


@pytest.mark.parametrize("arch", TINY_LAYOUTS)
def test_the_states_are_output_hidden_states_all_l_plus_one_of_them(arch):
    model, tok = tiny_model(arch, add_bos=True)
    ours = collect_pooled_states(model, tok, TEXTS, "mean", 8)
    raw = collect_pooled_states(model, tok, TEXTS, "mean", 8, last_state="raw")
    assert ours.shape[0] == num_layers(model) + 1
    projected = arch == "opt-350m"  # no final norm; its last hidden state is projected to another width
    reference = []
    with torch.no_grad():
        for text in TEXTS:
            ids = torch.tensor([encode_text(tok, text)])
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
            assert len(hidden) == num_layers(model) + 1
            reference.append(torch.stack([h[0].mean(0) for h in hidden[: -1 if projected else None]]))
    reference = torch.stack(reference, dim=1)  # [L + 1, N, D]
    if projected:
        torch.testing.assert_close(ours, raw)  # nothing to normalise
        ours = ours[:-1]
    else:
        assert float((raw[-1] - reference[-1]).abs().max()) > 1e-3  # the final norm changes the last state
        torch.testing.assert_close(raw[:-1], reference[:-1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)


@pytest.mark.integration
def test_training_records_how_many_examples_max_length_truncated(tiny_llama_dir, tmp_path):
    model, tok = load_model(str(tiny_llama_dir))
    config = TrainConfig(task="piqa", train_samples=8, val_samples=4, max_steps=1, batch_size=4, max_length=40)
    train, _ = split_examples(config)
    expected = sum(encode_example(tok, ex, 40).truncated for ex in train)
    assert 0 < expected < len(train)  # the slice holds PIQA items longer and shorter than 41 tokens
    out = train_full(model, tok, config, tmp_path / "full")
    record = json.loads((out / "training.json").read_text())["training"]
    assert record["truncated_train_examples"] == expected

