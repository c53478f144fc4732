"""lm-eval evaluation: CrashlmLM's packed scoring equals plain scoring, lm-eval's numbers equal
our own direct scoring (crashlm.core.scoring) on the same items, the result JSON and the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from lm_eval.api.instance import Instance

from crashlm.cli import main
from crashlm.core.errors import UsageError
from crashlm.core.models import get_layers, native_bf16, set_layers
from crashlm.core.scoring import choice_loglikelihoods
from crashlm.core.tasks import get_task, load_examples
from crashlm.evaluation.lm import PACKABLE_ARCHITECTURES, CrashlmLM, compute_dtype
from crashlm.evaluation.run import EvalResult, evaluate, resolve_splits
from tests.tiny import TINY_LAYOUTS, save_tiny, tiny_model

# Requests sharing contexts, with one-token and multi-token answers.
REQUESTS = [
    ("The capital of France", " is Paris."),
    ("The capital of France", " is Rome"),
    ("The capital of France", " x"),
    ("Water boils at", " one hundred degrees"),
    ("Water boils at", " zero"),
    ("Q", " a b c d e f"),
]
LONG_POSITIONS = dict(max_position_embeddings=1024)  # byte-level tiny tokens: task items run long


def _accuracy(examples, loglikelihoods, norm: bool = False) -> float:
    """Argmax accuracy; ``norm``: lm-eval's acc_norm (log-likelihood per character of the choice)."""
    scores, hits = iter(loglikelihoods), 0
    for ex in examples:
        values = [next(scores) / (len(choice) if norm else 1) for choice in ex.choices]
        hits += int(int(np.argmax(values)) == ex.gold)
    return hits / len(examples)


def _requests(examples) -> list[tuple[str, str]]:
    return [(ex.context, " " + choice) for ex in examples for choice in ex.choices]


# ---------------------------------------------------------------------------------------------
# CrashlmLM on tiny models


@pytest.mark.parametrize("arch", TINY_LAYOUTS)
def test_scores_equal_direct_scoring_on_every_architecture(arch):
    model, tok = tiny_model(arch)
    lm = CrashlmLM(model, tok, batch_size=2, dtype=torch.float32, progress=False)
    encoded = [lm.encode(c, x) for c, x in REQUESTS]
    config = model.config
    window = getattr(config, "sliding_window", None)  # 4 in tiny models: shorter than the requests
    expect_pack = config.model_type in PACKABLE_ARCHITECTURES and not getattr(config, "alibi", False) and window is None
    assert lm.can_pack(encoded) == expect_pack
    reference = choice_loglikelihoods(model, tok, REQUESTS, batch_size=3)
    scored = lm.score(encoded, progress=False)
    assert [value for value, _ in scored] == pytest.approx(reference, abs=1e-4)
    assert lm.score(encoded, pack=False, progress=False) == [
        (pytest.approx(value, abs=1e-4), greedy) for value, greedy in scored
    ]


def test_counts_say_what_was_computed():
    model, tok = tiny_model("llama")
    lm = CrashlmLM(model, tok, batch_size=4, dtype=torch.float32, progress=False)
    encoded = [lm.encode(c, x) for c, x in REQUESTS]
    answers = sum(len(x) for _, x in encoded)
    unpacked = sum(len(c) + len(x) - 1 for c, x in encoded)
    lm.score(encoded, pack=False, progress=False)
    assert lm.counts["unembedded"] == answers and lm.counts["tokens"] == unpacked
    assert lm.counts["positions"] >= lm.counts["tokens"]
    lm.score(encoded, pack=True, progress=False)  # each shared context once
    contexts = {tuple(c): len(c) for c, _ in encoded}
    assert lm.counts["tokens"] == sum(contexts.values()) + sum(len(x) - 1 for _, x in encoded)
    assert lm.counts["unembedded"] == answers


@pytest.mark.parametrize("arch", ["mistral", "gemma2", "gemma3_text"])
def test_packing_with_a_sliding_window_longer_than_the_requests(arch):
    model, tok = tiny_model(arch, sliding_window=64)
    lm = CrashlmLM(model, tok, batch_size=4, dtype=torch.float32, progress=False)
    encoded = [lm.encode(c, x) for c, x in REQUESTS]
    assert lm.can_pack(encoded)
    reference = choice_loglikelihoods(model, tok, REQUESTS)
    assert [v for v, _ in lm.score(encoded, progress=False)] == pytest.approx(reference, abs=1e-4)


def test_packing_with_shared_layers():
    """Emulators with sharing hold one module at several positions (and no KV cache)."""
    model, tok = tiny_model("llama")
    layers = list(get_layers(model))
    sources = [0, 1, 1, 1, 4, 5]
    set_layers(model, [layers[s] for s in sources], sources)
    lm = CrashlmLM(model, tok, dtype=torch.float32, progress=False)
    encoded = [lm.encode(c, x) for c, x in REQUESTS]
    assert lm.can_pack(encoded)
    reference = choice_loglikelihoods(model, tok, REQUESTS)
    assert [v for v, _ in lm.score(encoded, progress=False)] == pytest.approx(reference, abs=1e-4)


def test_greedy_flag_and_empty_context():
    model, tok = tiny_model("llama")
    lm = CrashlmLM(model, tok, dtype=torch.float32, progress=False)
    context = tok("The capital of France is", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        greedy_next = int(model(torch.tensor([context])).logits[0, -1].argmax())
    other = (greedy_next + 1) % len(tok)
    model.train()  # dropout off while scoring, and the training mode given back afterwards
    results = lm.score([(context, [greedy_next]), (context, [other])], progress=False)
    assert [greedy for _, greedy in results] == [True, False] and model.training
    # An empty context is lm-eval's prefix token (BOS here).
    ctx, cont = lm.encode("", "The capital")
    assert ctx == [tok.bos_token_id] and cont == tok("The capital", add_special_tokens=False)["input_ids"]


def test_long_contexts_are_truncated_from_the_left():
    model, tok = tiny_model("llama")  # 128 positions
    lm = CrashlmLM(model, tok, dtype=torch.float32, progress=False)
    long_context, answer = list(range(10, 210)), [5, 6, 7]
    (value, _), = lm.score([(long_context, answer)], progress=False)
    (expected, _), = lm.score([(long_context[-(lm.max_length + 1 - len(answer)):], answer)], progress=False)
    assert value == pytest.approx(expected, abs=1e-5)
    # An answer longer than the model reads keeps its last max_length tokens, as training keeps them.
    answer = list(range(10, 140))
    (value, _), = lm.score([([1], answer)], progress=False)
    assert lm.truncated == 1
    (expected, _), = lm.score([(answer[-(lm.max_length + 1):][:1], answer[-lm.max_length:])], progress=False)
    assert value == pytest.approx(expected, abs=1e-5) and lm.truncated == 0


def test_rolling_loglikelihood_and_generation():
    model, tok = tiny_model("llama")
    lm = CrashlmLM(model, tok, dtype=torch.float32, progress=False)
    text = "The quick brown fox jumps over the lazy dog."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    (total,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([[tok.bos_token_id] + ids])).logits[0, :-1], -1)
    assert total == pytest.approx(float(logp.gather(-1, torch.tensor(ids)[:, None]).sum()), abs=1e-4)
    with pytest.raises(NotImplementedError, match="multiple-choice"):
        lm.generate_until([Instance("generate_until", {}, ("Q", {"until": ["\n"]}), 0)])


def test_dtype_choice():
    model, tok = tiny_model("llama")
    expected = torch.bfloat16 if native_bf16(torch.device("cpu")) else torch.float32
    assert compute_dtype(model) == expected
    bf16 = CrashlmLM(model, tok, dtype=torch.bfloat16, progress=False)
    assert bf16.autocast and bf16.dtype == torch.bfloat16
    fp32 = CrashlmLM(model, tok, dtype=torch.float32, progress=False)
    encoded = [fp32.encode(c, x) for c, x in REQUESTS]
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    low = [v for v, _ in bf16.score(encoded, progress=False)]
    # The bf16 pass held the weights in bf16 and gave the fp32 values back.
    assert all(p.dtype == torch.float32 and torch.equal(p, weights[name]) for name, p in model.named_parameters())
    assert low == pytest.approx([v for v, _ in fp32.score(encoded, progress=False)], rel=0.05)
    with pytest.raises(UsageError, match="float32 weights"):
        compute_dtype(model.to(torch.bfloat16), torch.float32)


# ---------------------------------------------------------------------------------------------
# evaluate() on a tiny model and a real task slice


@pytest.fixture(scope="module")
def tiny_long():
    return tiny_model("llama", **LONG_POSITIONS)


@pytest.mark.integration
def test_evaluate_equals_direct_scoring(tiny_long, tmp_path):
    model, tok = tiny_long
    examples = load_examples("piqa", "validation", 8)
    result = evaluate(model, tok, ["piqa"], limit=8, dtype=torch.float32, progress=False)
    scores = result.scores["piqa"]
    direct = choice_loglikelihoods(model, tok, _requests(examples))
    assert scores["n"] == 8 and result.config["splits"] == {"piqa": "validation"}
    assert scores["acc"] == _accuracy(examples, direct, norm=False)
    assert scores["acc_norm"] == _accuracy(examples, direct, norm=True)
    assert scores["acc_stderr"] > 0
    logged = [value for item in result.items["piqa"] for value in item["loglikelihoods"]]
    assert logged == pytest.approx(direct, abs=1e-4)
    assert [item["gold"] for item in result.items["piqa"]] == [ex.gold for ex in examples]
    assert result.config["packed"] is True and result.config["dtype"] == "float32"
    assert result.lm_eval["results"]["crashlm_piqa"]["acc,none"] == scores["acc"]

    path = result.save(tmp_path / "r.json")
    assert EvalResult.load(path) == result
    (tmp_path / "bad.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(UsageError, match="not a crashlm evaluation result"):
        EvalResult.load(tmp_path / "bad.json")


def test_bad_requests_are_usage_errors(tiny_long):
    model, tok = tiny_long
    assert resolve_splits(["piqa", "arc_easy"]) == {"piqa": "validation", "arc_easy": get_task("arc_easy").eval_split}
    for tasks, split, match in [
        (["nope"], None, "unknown task"),
        (["sciq"], "train", "no 'train' split"),
        (["piqa", "piqa"], None, "listed twice"),
        ([], None, "at least one task"),
    ]:
        with pytest.raises(UsageError, match=match):
            resolve_splits(tasks, split)
    with pytest.raises(UsageError, match="limit"):
        evaluate(model, tok, ["piqa"], limit=0)
    with pytest.raises(UsageError, match="batch size"):
        evaluate(model, tok, ["piqa"], limit=2, batch_size=0)


# ---------------------------------------------------------------------------------------------
# CLI


@pytest.fixture(scope="module")
def tiny_long_dir(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("tiny-long"), **LONG_POSITIONS)


@pytest.mark.integration
def test_cli_writes_results(tiny_long_dir, tmp_path, capsys):
    out = tmp_path / "results.json"
    main(["eval", "--model", str(tiny_long_dir), "--tasks", "arc_easy,piqa", "--limit", "3", "--dtype", "float32",
          "--out", str(out)])
    data = json.loads(out.read_text())
    assert set(data["scores"]) == {"arc_easy", "piqa"}
    assert 0.0 <= data["scores"]["arc_easy"]["acc"] <= 1.0 and data["scores"]["piqa"]["n"] == 3
    assert data["config"]["limit"] == 3 and data["config"]["model"]["source"] == str(tiny_long_dir)
    printed = capsys.readouterr().out
    assert "arc_easy" in printed and "acc_norm" in printed


@pytest.mark.parametrize("args, message", [
    (["--tasks", "nope"], "unknown task 'nope'"),
    (["--tasks", "sciq", "--split", "train"], "no 'train' split"),
    (["--tasks", "piqa", "--limit", "0"], "--limit must be a positive integer"),
    (["--tasks", "piqa", "--dtype", "fp8"], "unknown dtype"),
])
def test_cli_usage_errors(tiny_long_dir, tmp_path, capsys, args, message):
    out = tmp_path / "r.json"
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--model", str(tiny_long_dir), *args, "--out", str(out)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# The real model


@pytest.fixture(scope="module")
def real_model():
    from crashlm.core.models import load_model

    return load_model("smollm2-135m", dtype=torch.float32)


@pytest.fixture(scope="module")
def real_fp32(real_model):
    model, tok = real_model
    return evaluate(model, tok, ["piqa", "arc_easy"], limit=20, dtype=torch.float32, progress=False)


@pytest.mark.integration
@pytest.mark.parametrize("task", ["piqa", "arc_easy"])
def test_real_model_lm_eval_equals_direct_scoring(real_model, real_fp32, task):
    model, tok = real_model
    examples = load_examples(task, get_task(task).eval_split, 20)
    direct = choice_loglikelihoods(model, tok, _requests(examples), batch_size=16)
    logged = [value for item in real_fp32.items[task] for value in item["loglikelihoods"]]
    assert logged == pytest.approx(direct, abs=1e-4)
    assert real_fp32.scores[task]["acc"] == _accuracy(examples, direct)
    assert real_fp32.scores[task]["acc_norm"] == _accuracy(examples, direct, norm=True)
    assert real_fp32.scores[task]["n"] == 20


@pytest.mark.integration
def test_real_model_bf16_within_one_point_of_fp32(real_model, real_fp32):
    """bf16 autocast on 10 arc_easy items (bf16 is emulated, hence slow, on AVX2-only CPUs;
    benchmarks/results/bench_eval.md compares larger slices)."""
    model, tok = real_model
    bf16 = evaluate(model, tok, ["arc_easy"], limit=10, dtype=torch.bfloat16, progress=False)
    fp32_acc = float(np.mean([item["acc"] for item in real_fp32.items["arc_easy"][:10]]))
    assert bf16.config["dtype"] == "bfloat16" and bf16.config["autocast"] is True
    assert abs(bf16.scores["arc_easy"]["acc"] - fp32_acc) <= 0.01
    fp32_ll = [v for item in real_fp32.items["arc_easy"][:10] for v in item["loglikelihoods"]]
    bf16_ll = [v for item in bf16.items["arc_easy"] for v in item["loglikelihoods"]]
    assert all(math.isfinite(v) for v in bf16_ll)
    assert bf16_ll == pytest.approx(fp32_ll, abs=1.0)
