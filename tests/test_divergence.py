"""Layer-to-layer divergence: hand-computed values on probabilities, properties, streaming, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from crashlm.analysis.divergence import (
    MEASURES,
    SYMMETRIC,
    DivergenceAccumulator,
    DivergenceResult,
    adjacent_similarity,
    compute_divergence,
)
from crashlm.analysis.lens import emulator_depth, lens_statistics
from crashlm.core.errors import UsageError
from crashlm.core.models import fingerprint
from crashlm.emulators.bundle import save_bundle
from crashlm.emulators.emulator import build_emulator
from crashlm.emulators.plans import EmulatorSpec, LayerPlan, uniform_plan
from tests.cli import run_cli
from tests.tiny import tiny_model

# Three distributions over a vocabulary of three tokens, with values worked out by hand below.
P0, P1, P2 = [0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [1 / 3, 1 / 3, 1 / 3]
TEXTS = [
    "The capital of France is Paris.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The quick brown fox jumps over the lazy dog.",
]


def pairwise_divergences(log_probs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every measure between the S distributions of [S, n, V] log-probabilities, in one update."""
    accumulator = DivergenceAccumulator()
    accumulator.update(log_probs)
    return accumulator.compute()


def as_log_probs(*distributions: list[float]) -> torch.Tensor:
    """[S, 1, V] log-probabilities of S distributions at one token."""
    return torch.tensor(distributions, dtype=torch.float64).log()[:, None, :]


def reference(p: torch.Tensor, q: torch.Tensor) -> dict[str, float]:
    """The textbook definitions on probability vectors, in float64, one pair at a time."""
    m = (p + q) / 2
    kl = lambda a, b: float((a * (a / b).log()).sum())  # noqa: E731
    return {
        "kl": kl(p, q),
        "js": (kl(p, m) + kl(q, m)) / 2,
        "hellinger": float(((p.sqrt() - q.sqrt()) ** 2).sum().sqrt() / math.sqrt(2)),
        "l2": float((p - q).norm()),
        "cosine": float(1 - (p @ q) / (p.norm() * q.norm())),
    }


# ---------------------------------------------------------------------------------------------
# Values and properties


def test_hand_computed_values_on_probabilities():
    result = pairwise_divergences(as_log_probs(P0, P1, P2))
    # KL(P0 || P2) = sum p log(3 p), by hand.
    assert result["kl"][0, 2] == pytest.approx(0.7 * math.log(2.1) + 0.2 * math.log(0.6) + 0.1 * math.log(0.3), abs=1e-6)
    assert result["kl"][0, 2] == pytest.approx(0.296794, abs=1e-6)
    assert result["kl"][2, 0] == pytest.approx(sum(math.log(1 / 3 / p) / 3 for p in P0), abs=1e-6)
    # Hellinger: sqrt(1 - Bhattacharyya), BC(P0, uniform) = (sqrt .7 + sqrt .2 + sqrt .1) / sqrt 3.
    bc = (math.sqrt(0.7) + math.sqrt(0.2) + math.sqrt(0.1)) / math.sqrt(3)
    assert result["hellinger"][0, 2] == pytest.approx(math.sqrt(1 - bc), abs=1e-6)
    assert result["hellinger"][0, 2] == pytest.approx(0.276009, abs=1e-6)
    # L2(P0, P1) = sqrt(.6^2 + .1^2 + .5^2); cosine distance(P0, uniform) = 1 - (1/3) / (|P0| |u|).
    assert result["l2"][0, 1] == pytest.approx(math.sqrt(0.62), abs=1e-6)
    assert result["cosine"][0, 2] == pytest.approx(1 - (1 / 3) / (math.sqrt(0.54) * math.sqrt(1 / 3)), abs=1e-6)
    # JS(P0, uniform) = (KL(P0 || m) + KL(u || m)) / 2 with m = (.5167, .2667, .2167).
    m = [(p + 1 / 3) / 2 for p in P0]
    js = (sum(p * math.log(p / q) for p, q in zip(P0, m)) + sum(math.log(1 / 3 / q) / 3 for q in m)) / 2
    assert result["js"][0, 2] == pytest.approx(js, abs=1e-6)
    assert result["js"][0, 2] == pytest.approx(0.0748064, abs=1e-6)
    for i, j in [(0, 1), (1, 0), (0, 2), (2, 0), (1, 2), (2, 1)]:
        expected = reference(torch.tensor(P0 if i == 0 else P1 if i == 1 else P2, dtype=torch.float64),
                             torch.tensor(P0 if j == 0 else P1 if j == 1 else P2, dtype=torch.float64))
        for name in MEASURES:
            assert float(result[name][i, j]) == pytest.approx(expected[name], abs=1e-6), (name, i, j)


def test_measures_average_over_tokens():
    one = pairwise_divergences(as_log_probs(P0, P1, P2))
    other = pairwise_divergences(as_log_probs(P2, P0, P1))
    both = pairwise_divergences(torch.cat([as_log_probs(P0, P1, P2), as_log_probs(P2, P0, P1)], dim=1))
    for name in MEASURES:
        torch.testing.assert_close(both[name], (one[name] + other[name]) / 2)


def test_zero_diagonal_symmetry_and_bounds_on_random_distributions():
    gen = torch.Generator().manual_seed(0)
    log_probs = (3 * torch.randn(7, 5, 300, generator=gen)).log_softmax(-1)
    result = pairwise_divergences(log_probs)
    for name, matrix in result.items():
        assert torch.equal(matrix.diagonal(), torch.zeros(7, dtype=torch.float64)), name
        assert (matrix >= 0).all(), name
        if name in SYMMETRIC:
            assert torch.equal(matrix, matrix.T), name
    assert not torch.allclose(result["kl"], result["kl"].T)  # KL keeps its direction
    # On probabilities every bounded measure stays in range (the original log-prob bug broke this).
    assert result["js"].max() <= math.log(2) and result["hellinger"].max() <= 1.0
    assert result["l2"].max() <= math.sqrt(2) and result["cosine"].max() <= 1.0


def test_probabilities_are_refused_where_log_probabilities_are_expected():
    with pytest.raises(ValueError, match="not normalised log-probabilities"):
        pairwise_divergences(torch.tensor([P0, P1])[:, None, :])  # probabilities, not their logs
    with pytest.raises(ValueError, match="states, tokens, vocab"):
        DivergenceAccumulator().update(torch.zeros(3, 4))


def test_float32_work_matches_a_float64_reference_on_peaked_distributions():
    gen = torch.Generator().manual_seed(1)
    base = 6 * torch.randn(3, 2048, generator=gen)
    drift = torch.stack([base + 0.1 * i * torch.randn(3, 2048, generator=gen) for i in range(5)])
    log_probs = drift.log_softmax(-1)  # [5 states, 3 tokens, 2048]: peaked, neighbours close
    result = pairwise_divergences(log_probs)
    p = log_probs.double().exp()
    for i in range(5):
        for j in range(5):
            if i == j:
                continue
            expected = [reference(p[i, t], p[j, t]) for t in range(3)]
            for name in MEASURES:
                mean = sum(e[name] for e in expected) / 3
                assert float(result[name][i, j]) == pytest.approx(mean, abs=2e-5, rel=1e-3), (name, i, j)


def test_streaming_accumulator_equals_the_one_shot_computation():
    gen = torch.Generator().manual_seed(2)
    log_probs = (2 * torch.randn(6, 17, 50, generator=gen)).log_softmax(-1)
    once = pairwise_divergences(log_probs)
    streamed = DivergenceAccumulator(budget_bytes=1)  # forces one token per chunk
    for start, stop in [(0, 3), (3, 10), (10, 17)]:
        streamed.update(log_probs[:, start:stop])
    assert streamed.tokens == 17
    for name, matrix in streamed.compute().items():
        torch.testing.assert_close(matrix, once[name], rtol=1e-6, atol=1e-6)  # float32 work, chunked differently
    with pytest.raises(ValueError, match="before any token"):
        DivergenceAccumulator().compute()


# ---------------------------------------------------------------------------------------------
# Models


def test_compute_divergence_on_a_tiny_model_is_independent_of_batching():
    model, tokenizer = tiny_model("gpt_neox", initializer_range=0.2)
    a = compute_divergence(model, tokenizer, TEXTS, batch_size=3, name="tiny", task="text")
    b = compute_divergence(model, tokenizer, TEXTS, batch_size=1, budget_bytes=400_000)  # 3-token chunks
    tokens = sum(len(tokenizer(t)["input_ids"]) for t in TEXTS)
    assert (a.tokens, a.samples, a.num_layers, a.depth) == (tokens, 3, 6, list(range(7)))
    for name in MEASURES:
        assert a.matrix(name).shape == (7, 7)
        torch.testing.assert_close(a.matrix(name), b.matrix(name), rtol=1e-4, atol=1e-6)
    assert a.matrix("js")[0, 6] > a.matrix("js")[5, 6]  # embeddings are farther from the output than layer 5


def test_kl_to_the_output_agrees_with_the_lens_statistics():
    """Two modules, one quantity: KL(P_L || P_l) is column l of the last row of the KL matrix."""
    model, tokenizer = tiny_model("llama", initializer_range=0.2)
    kl = compute_divergence(model, tokenizer, TEXTS).matrix("kl")
    stats = lens_statistics(model, tokenizer, TEXTS)
    assert kl[-1].tolist() == pytest.approx(stats.kl_to_final, rel=1e-4, abs=1e-5)


def test_divergence_of_an_emulator_records_its_depth():
    model, tokenizer = tiny_model("llama", initializer_range=0.2)
    plan = uniform_plan(6, k=4, trainable=2, base_fingerprint=fingerprint(model))
    emulator = build_emulator(model, tokenizer, EmulatorSpec(plan))
    result = compute_divergence(emulator.model, tokenizer, TEXTS[:1], depth=emulator_depth(emulator))
    assert result.num_layers == 4 and result.depth == [0, *(s + 1 for s in plan.kept)]


def test_result_round_trip_and_malformed_files(tmp_path):
    model, tokenizer = tiny_model("llama")
    result = compute_divergence(model, tokenizer, TEXTS[:1], task="text")
    result.settings = {"max_length": 512}
    result.save(tmp_path)
    assert DivergenceResult.load(tmp_path) == DivergenceResult.load(tmp_path / "divergence.json") == result
    data = result.to_dict()
    data["measures"]["js"] = data["measures"]["js"][:-1]
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(UsageError, match="7 x 7"):
        DivergenceResult.load(tmp_path / "bad.json")
    with pytest.raises(UsageError, match="not found"):
        DivergenceResult.load(tmp_path / "missing.json")
    with pytest.raises(UsageError, match="unknown divergence measure"):
        result.matrix("wasserstein")


def test_adjacent_similarity_scales_each_measure_to_zero_one():
    size = 4  # embeddings + 3 layers: two adjacent layer pairs (1, 2) and (2, 3)
    matrix = [[0.0] * size for _ in range(size)]
    matrix[1][2] = matrix[2][1] = 0.25
    matrix[2][3] = 0.5
    matrix[3][2] = 1.5
    matrix[0][1] = matrix[1][0] = 9.0  # the embedding pair is not a layer pair: ignored
    result = DivergenceResult(model="m", lens="logit", task="t", samples=1, tokens=1, num_layers=3,
                              measures={name: matrix for name in MEASURES})
    assert adjacent_similarity(result, "js") == pytest.approx([1 - 0.25 / math.log(2), 1 - 0.5 / math.log(2)])
    assert adjacent_similarity(result, "hellinger") == pytest.approx([0.75, 0.5])
    assert adjacent_similarity(result, "l2") == pytest.approx([1 - 0.25 / math.sqrt(2), 1 - 0.5 / math.sqrt(2)])
    assert adjacent_similarity(result, "kl") == pytest.approx([math.exp(-0.25), math.exp(-1.0)])
    with pytest.raises(UsageError, match="unknown divergence measure"):
        adjacent_similarity(result, "emd")


# ---------------------------------------------------------------------------------------------
# Command line


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "texts.txt"
    path.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    return path


def test_cli_divergence_of_a_model_and_of_an_emulator(tiny_llama_dir, text_file, tmp_path, capsys):
    out = tmp_path / "div"
    code, stdout, err = run_cli(["divergence", "--model", str(tiny_llama_dir), "--text", str(text_file),
                                 "--samples", "2", "--out", str(out)], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == sorted(["divergence.json", *(f"divergence_{m}.png" for m in MEASURES)])
    result = DivergenceResult.load(out)
    assert (result.samples, result.num_layers, result.task, result.lens) == (2, 6, "text:texts.txt", "logit")
    assert "7 states" in " ".join(stdout.split())

    model, tokenizer = tiny_model("llama")  # the weights of tiny_llama_dir
    plan = uniform_plan(6, k=4, trainable=2, base_fingerprint=fingerprint(model))
    save_bundle(build_emulator(model, tokenizer, EmulatorSpec(plan)), tmp_path / "emu")
    code, _, err = run_cli(["divergence", "--emulator", str(tmp_path / "emu"), "--text", str(text_file),
                            "--out", str(tmp_path / "div-emu")], capsys)
    assert code == 0, err
    result = DivergenceResult.load(tmp_path / "div-emu")
    assert result.num_layers == 4 and result.depth == [0, *(s + 1 for s in plan.kept)]
    assert result.settings["emulator"] == str(tmp_path / "emu")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--lens", "fancy"], "unknown lens 'fancy'"),
        (["--lens", "tuned", "--lens-path", "NOWHERE"], "tuned lens not found"),
        (["--emulator", "NOWHERE"], "give --model or --emulator, not both"),
        (["--text", "EMPTY"], "has no non-empty line"),
        (["--max-length", "0"], "--max-length must be a positive integer"),
    ],
)
def test_cli_divergence_bad_inputs_exit_2_with_one_line(tiny_llama_dir, tmp_path, capsys, args, message):
    (tmp_path / "empty.txt").write_text("\n")
    args = [str(tmp_path / "empty.txt") if a == "EMPTY" else str(tmp_path / "x") if a == "NOWHERE" else a for a in args]
    code, _, err = run_cli(["divergence", "--model", str(tiny_llama_dir), *args, "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in " ".join(err.split())
    assert not (tmp_path / "out").exists()


@pytest.mark.integration
def test_cli_cluster_by_lens_divergence(tiny_llama_dir, tmp_path, capsys):
    code, _, err = run_cli(["cluster", "--model", str(tiny_llama_dir), "--similarity-source", "lens", "--k", "4",
                            "--trainable", "2", "--samples", "3", "--out", str(tmp_path)], capsys)
    assert code == 0, err
    plan = LayerPlan.load(tmp_path / "plan.json")
    assert plan.k == 4 and plan.similarity == {"source": "lens", "measure": "js", "task": "piqa", "split": "train", "samples": 3}


# ---------------------------------------------------------------------------------------------
# The real model


@pytest.mark.integration
def test_cli_divergence_on_the_real_model(tmp_path, capsys):
    code, _, err = run_cli(["divergence", "--samples", "2", "--max-length", "32", "--out", str(tmp_path)], capsys)
    assert code == 0, err
    result = DivergenceResult.load(tmp_path)
    js = result.matrix("js")
    assert result.num_layers == 30 and js.shape == (31, 31)
    assert js.max() <= math.log(2) and (result.matrix("kl") >= 0).all()
    # The last two layers predict alike; the embeddings predict nothing like the output.
    assert js[29, 30] < 0.5 * js[0, 30]
