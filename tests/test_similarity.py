"""Layer similarity: CKA properties, agreement with reference libraries, pooling, streaming, CLI."""

from __future__ import annotations

import json
import math

import cka as pytorch_cka  # the pytorch-cka package: unbiased HSIC_1
import ckatorch
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from crashlm.analysis.similarity import (
    ESTIMATORS,
    POOLINGS,
    MinibatchCKA,
    SimilarityResult,
    cka,
    cka_matrix,
    collect_pooled_states,
    compute_similarity,
    iter_pooled_states,
    minibatch_cka,
    pool_hidden,
    rebatch,
)
from crashlm.core.errors import UsageError
from crashlm.core.models import load_model
from tests.cli import run_cli
from tests.tiny import save_tiny, tiny_model

TEXTS = [
    "The capital of France is Paris.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "A small model fine-tunes an adapter that plugs into the full model.",
    "Question: What is two plus two? Answer: four.",
    "The quick brown fox jumps over the lazy dog.",
    "Layers of a language model can be removed, shared or clustered.",
    "Bread rises because yeast produces carbon dioxide.",
    "Rivers flow downhill towards the sea.",
]


def random_walk(layers: int, n: int, d: int, seed: int, step: float = 0.7) -> torch.Tensor:
    """Features [layers, n, d] whose similarity decays with layer distance (non-trivial CKAs)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    states = [x]
    for _ in range(layers - 1):
        x = x + step * torch.randn(n, d, generator=gen, dtype=torch.float64)
        states.append(x)
    return torch.stack(states)


def random_orthogonal(d: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


# ---------------------------------------------------------------------------------------------
# CKA properties

shapes = dict(seed=st.integers(0, 2**31 - 1), n=st.integers(6, 40), d=st.integers(1, 12))


@pytest.mark.parametrize("estimator", ESTIMATORS)
@settings(max_examples=25, deadline=None)
@given(**shapes)
def test_cka_of_a_representation_with_itself_is_one(estimator, seed, n, d):
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    assert cka(x, x, estimator) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("estimator", ESTIMATORS)
@settings(max_examples=25, deadline=None)
@given(scale=st.floats(1e-3, 1e3), **shapes)
def test_cka_is_invariant_to_orthogonal_maps_and_isotropic_scaling(estimator, scale, seed, n, d):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = x @ torch.randn(d, d + 2, generator=gen, dtype=torch.float64) + torch.randn(n, d + 2, generator=gen, dtype=torch.float64)
    transformed = scale * x @ random_orthogonal(d, gen)
    assert cka(transformed, y, estimator) == pytest.approx(cka(x, y, estimator), abs=1e-9)


def test_cka_is_not_invariant_to_a_general_invertible_linear_map():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=gen, dtype=torch.float64)
    stretch = torch.diag(torch.tensor([1.0] * 7 + [100.0], dtype=torch.float64))  # invertible
    # Population value for isotropic x: ||A||_F^2 / (sqrt(d) ||A^T A||_F) = 0.35.
    assert cka(x, x @ stretch) < 0.5
    assert cka(x, x @ random_orthogonal(8, gen)) == pytest.approx(1.0, abs=1e-12)


@settings(max_examples=25, deadline=None)
@given(layers=st.integers(2, 6), **shapes)
def test_biased_cka_matrix_is_symmetric_in_unit_interval_with_unit_diagonal(layers, seed, n, d):
    gen = torch.Generator().manual_seed(seed)
    # Independent layers, some with a large common offset (centring must remove it).
    features = (torch.randn(layers, n, d, generator=gen, dtype=torch.float64)
                + 50 * torch.rand(layers, 1, d, generator=gen, dtype=torch.float64))
    matrix = cka_matrix(features)
    assert torch.allclose(matrix, matrix.T, atol=1e-12)
    assert torch.allclose(matrix.diagonal(), torch.ones(layers, dtype=torch.float64), atol=1e-12)
    assert matrix.min() >= 0.0 and matrix.max() <= 1.0 + 1e-12


def test_cka_matrix_equals_pairwise_cka_with_any_feature_widths():
    features = random_walk(5, 40, 6, seed=1)
    for estimator in ESTIMATORS:
        matrix = cka_matrix(features, estimator)
        for i in range(5):
            for j in range(5):
                assert matrix[i, j].item() == pytest.approx(cka(features[i], features[j], estimator), abs=1e-12)
    # Layers of different widths (a list, not a stacked tensor) go through the same path.
    widths = [features[0], features[1] @ torch.randn(6, 11, dtype=torch.float64)]
    assert cka_matrix(widths)[0, 1].item() == pytest.approx(cka(*widths), abs=1e-12)


def test_cka_needs_enough_samples():
    with pytest.raises(ValueError, match="at least 4"):
        cka(torch.randn(3, 2), torch.randn(3, 2), "unbiased")
    with pytest.raises(UsageError, match="estimator"):
        cka(torch.randn(8, 2), torch.randn(8, 2), "debiased")


# ---------------------------------------------------------------------------------------------
# Agreement with reference libraries (read from their sources: ckatorch.cka_base centres grams
# with or without Kornblith's unbiased correction; ckatorch.cka_batch and pytorch-cka's
# cka_from_features both use HSIC_1, summed over batches for the former).


def test_matches_ckatorch_biased_and_unbiased():
    features = random_walk(4, 64, 12, seed=2).float()
    for estimator in ESTIMATORS:
        ours = cka_matrix(features, estimator)
        for i in range(4):
            for j in range(4):
                theirs = ckatorch.cka_base(features[i], features[j], unbiased=estimator == "unbiased")
                assert ours[i, j].item() == pytest.approx(theirs.item(), abs=1e-5)


def test_unbiased_matches_pytorch_cka():
    features = random_walk(5, 64, 12, seed=3).float()
    ours = cka_matrix(features, "unbiased")
    assert ours.min() > 0  # pytorch-cka clamps to [0, 1]; keep inside it
    theirs = pytorch_cka.cka_from_features(features.double(), features.double())
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_minibatch_matches_ckatorch_cka_batch():
    features = random_walk(3, 96, 10, seed=4)
    ours = minibatch_cka(features.split(7, dim=1), batch_size=16)  # re-batched into 6 x 16
    batches = features.reshape(3, 6, 16, 10)
    for i in range(3):
        for j in range(3):
            theirs = ckatorch.cka_batch(batches[i], batches[j])
            assert ours[i, j].item() == pytest.approx(theirs.item(), abs=1e-5)


# ---------------------------------------------------------------------------------------------
# Minibatch CKA


def test_minibatch_cka_approaches_full_unbiased_cka_as_batches_grow():
    batch_sizes = (8, 32, 128, 512)
    errors = torch.zeros(len(batch_sizes))
    for seed in range(3):
        features = random_walk(4, 2048, 16, seed=seed)
        full = cka_matrix(features, "unbiased")
        for k, size in enumerate(batch_sizes):
            errors[k] += (minibatch_cka(features.split(100, dim=1), size) - full).abs().max() / 3
        # One batch holding every sample is the full-batch estimate itself.
        assert torch.allclose(minibatch_cka(features.split(100, dim=1), 2048), full, atol=1e-12)
    assert all(errors[k + 1] < errors[k] for k in range(len(batch_sizes) - 1)), errors
    assert errors[-1] < 5e-3
    assert errors[0] < 0.05  # unbiased HSIC: even batches of 8 land near the full value


def test_rebatch_gives_exact_batches_in_order():
    chunks = [torch.arange(start, start + size).view(1, size, 1) for start, size in ((0, 5), (5, 2), (7, 9), (16, 1))]
    batches = list(rebatch(iter(chunks), 4))
    assert [b.shape[1] for b in batches] == [4, 4, 4, 4, 1]
    assert torch.equal(torch.cat(batches, dim=1).flatten(), torch.arange(17))


def test_minibatch_drops_a_last_batch_of_fewer_than_four_samples():
    features = random_walk(3, 22, 5, seed=5)
    expected = MinibatchCKA()
    for batch in features[:, :18].split(6, dim=1):
        expected.update(batch)
    assert torch.allclose(minibatch_cka([features[:, :21]], 6), expected.compute())  # 3 left over: dropped
    expected.update(features[:, 18:22])
    assert torch.allclose(minibatch_cka([features], 6), expected.compute())  # 4 left over: kept
    with pytest.raises(UsageError):
        minibatch_cka([features], 3)


# ---------------------------------------------------------------------------------------------
# Pooling

# Two sequences of lengths 3 and 2 over T = 4; the values identify (token, feature).
REAL = [torch.tensor([[1.0, 10.0], [2.0, 20.0], [4.0, 40.0]]), torch.tensor([[3.0, -1.0], [5.0, -5.0]])]


def padded(side: str) -> tuple[torch.Tensor, torch.Tensor]:
    hidden = torch.full((2, 4, 2), 1e6)  # pad positions hold junk that must never leak
    mask = torch.zeros(2, 4, dtype=torch.long)
    for row, tokens in enumerate(REAL):
        span = slice(0, len(tokens)) if side == "right" else slice(4 - len(tokens), 4)
        hidden[row, span] = tokens
        mask[row, span] = 1
    return hidden, mask


EXPECTED = {
    "mean": [[7 / 3, 70 / 3], [4.0, -3.0]],
    "mean_weighted": [[(1 + 4 + 12) / 6, (10 + 40 + 120) / 6], [(3 + 10) / 3, (-1 - 10) / 3]],
    "last": [[4.0, 40.0], [5.0, -5.0]],
    "max": [[4.0, 40.0], [5.0, -1.0]],
}


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("method", POOLINGS)
def test_pooling_uses_only_real_tokens_on_either_padding_side(method, side):
    hidden, mask = padded(side)
    pooled = pool_hidden(hidden.to(torch.bfloat16).float(), mask, method)
    assert pooled.dtype == torch.float32
    assert torch.allclose(pooled, torch.tensor(EXPECTED[method]), atol=1e-5)


def test_pooling_rejects_unknown_methods_and_empty_rows():
    hidden, mask = padded("right")
    with pytest.raises(UsageError, match="pooling"):
        pool_hidden(hidden, mask, "median")
    mask[1] = 0
    with pytest.raises(ValueError, match="real"):
        pool_hidden(hidden, mask, "mean")


# ---------------------------------------------------------------------------------------------
# Streaming collection on a tiny model


def test_pooled_states_stream_per_batch_and_do_not_depend_on_batching():
    model, tokenizer = tiny_model("llama", num_layers=3)
    chunks = list(iter_pooled_states(model, tokenizer, TEXTS[:5], "mean_weighted", batch_size=2))
    assert [c.shape for c in chunks] == [torch.Size([4, 2, 32])] * 2 + [torch.Size([4, 1, 32])]
    assert all(c.dtype == torch.float32 and c.device.type == "cpu" for c in chunks)
    one_by_one = collect_pooled_states(model, tokenizer, TEXTS[:5], "mean_weighted", batch_size=1)
    assert torch.allclose(torch.cat(chunks, dim=1), one_by_one, atol=1e-5)  # padding changes nothing
    # Index 0 is the embedding output: pooled token embeddings.
    ids = tokenizer(TEXTS[0], return_tensors="pt")["input_ids"]
    embedded = model.get_input_embeddings()(ids)
    assert torch.allclose(one_by_one[0, 0], pool_hidden(embedded, torch.ones_like(ids), "mean_weighted")[0], atol=1e-6)


def test_compute_similarity_full_and_minibatch_on_a_tiny_model(tiny_llama_dir, tmp_path):
    result = compute_similarity(str(tiny_llama_dir), task="inline", texts=TEXTS, samples=8, batch_size=3)
    matrix = result.matrix
    assert result.num_layers == 6 and matrix.shape == (7, 7) and result.samples == 8
    assert result.adjacent == [matrix[i, i + 1].item() for i in range(6)]
    assert result.adjacent_layers == result.adjacent[1:]
    minibatch = compute_similarity(str(tiny_llama_dir), texts=TEXTS, estimator="unbiased", minibatch=4, batch_size=3)
    assert minibatch.minibatch == 4 and torch.allclose(minibatch.matrix.diagonal(), torch.ones(7, dtype=torch.float64))

    assert SimilarityResult.load(result.save(tmp_path)) == result
    assert SimilarityResult.load(tmp_path) == result  # the directory works too


def _rbf_cka_reference(x, y) -> float:
    """The original code's kernel CKA, written out with an explicit centring matrix (numpy)."""
    import numpy as np

    def rbf(z):
        gram = z @ z.T
        distances = np.diag(gram) - gram + (np.diag(gram) - gram).T
        sigma = math.sqrt(np.median(distances[distances != 0]))
        return np.exp(distances * (-0.5 / (sigma * sigma)))

    def hsic(a, b):
        n = a.shape[0]
        h = np.eye(n) - np.ones((n, n)) / n
        return float(np.sum((h @ a @ h) * (h @ b @ h)))

    kx, ky = rbf(x.numpy()), rbf(y.numpy())
    return hsic(kx, ky) / math.sqrt(hsic(kx, kx) * hsic(ky, ky))


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(5, 24), d=st.integers(2, 12))
def test_rbf_cka_equals_an_independent_implementation(seed, n, d):
    states = random_walk(3, n, d, seed)
    matrix = cka_matrix(states, kernel="rbf")
    for i in range(3):
        for j in range(3):
            assert float(matrix[i, j]) == pytest.approx(_rbf_cka_reference(states[i], states[j]), abs=1e-9)
    unbiased = cka_matrix(states, "unbiased", kernel="rbf")
    assert torch.allclose(unbiased.diagonal(), torch.ones(3, dtype=torch.float64))
    assert torch.allclose(unbiased, unbiased.T, atol=1e-12)


@pytest.mark.integration
def test_similarity_samples_come_from_the_train_split_and_the_last_state_is_chosen(tiny_llama_dir):
    from crashlm.core.tasks import load_examples

    default = compute_similarity(str(tiny_llama_dir), task="piqa", samples=6, batch_size=3)
    train = [ex.text for ex in load_examples("piqa", "train", limit=6)]
    given_texts = compute_similarity(str(tiny_llama_dir), task="piqa", texts=train, batch_size=3)
    assert default.split == "train" and given_texts.split is None and default.cka == given_texts.cka
    validation = compute_similarity(str(tiny_llama_dir), task="piqa", samples=6, batch_size=3, split="validation")
    assert validation.split == "validation" and validation.cka != default.cka
    raw = compute_similarity(str(tiny_llama_dir), task="piqa", samples=6, batch_size=3, last_state="raw")
    assert default.last_state == "norm" and raw.last_state == "raw"
    # Only the last state differs: every entry not involving it is the same.
    assert torch.allclose(raw.matrix[:-1, :-1], default.matrix[:-1, :-1]) and raw.cka[-1] != default.cka[-1]
    rbf = compute_similarity(str(tiny_llama_dir), task="piqa", samples=6, batch_size=3, kernel="rbf")
    assert rbf.kernel == "rbf" and rbf.cka != default.cka
    # Files written before these settings existed read as raw last states.
    old = default.to_dict()
    for key in ("split", "kernel", "last_state"):
        old.pop(key)
    assert SimilarityResult.from_dict(old).last_state == "raw"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(samples=0), "samples"),
        (dict(pooling="median"), "pooling"),
        (dict(estimator="other"), "estimator"),
        (dict(minibatch=16), "unbiased"),
        (dict(estimator="unbiased", minibatch=2), "minibatch"),
        (dict(estimator="unbiased", minibatch=4, kernel="rbf"), "linear kernel"),
        (dict(kernel="cosine"), "kernel"),
        (dict(last_state="final"), "last state"),
        (dict(texts=["one", "two", "three"]), "at least 4"),
        (dict(texts=["one", "two", "  ", "four"]), "non-empty"),
    ],
)
def test_compute_similarity_rejects_bad_settings_before_loading(kwargs, message):
    settings = dict(model_spec="/nonexistent/model", texts=TEXTS) | kwargs
    with pytest.raises(UsageError, match=message):
        compute_similarity(**settings)


def valid_result_dict() -> dict:
    return SimilarityResult(
        model="m", task="t", samples=8, pooling="mean", estimator="biased", minibatch=None,
        num_layers=2, cka=[[1.0, 0.9, 0.5], [0.9, 1.0, 0.6], [0.5, 0.6, 1.0]], adjacent=[0.9, 0.6],
    ).to_dict()


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda d: d.pop("cka"),
        lambda d: d.update(num_layers=3),
        lambda d: d.update(adjacent=[0.9]),
        lambda d: d["cka"][1].append(0.1),
        lambda d: d["cka"][0].__setitem__(1, "high"),
        lambda d: d.update(adjacent=[0.9, math.nan]),
    ],
)
def test_loading_a_bad_similarity_file_is_a_usage_error(tmp_path, corrupt):
    data = valid_result_dict()
    corrupt(data)
    path = tmp_path / "similarity.json"
    path.write_text(json.dumps(data))
    with pytest.raises(UsageError, match="similarity.json"):
        SimilarityResult.load(path)


def test_loading_non_json_or_missing_similarity_file_is_a_usage_error(tmp_path):
    (tmp_path / "similarity.json").write_text("{not json")
    with pytest.raises(UsageError):
        SimilarityResult.load(tmp_path)
    with pytest.raises(UsageError):
        SimilarityResult.load(tmp_path / "missing.json")


# ---------------------------------------------------------------------------------------------
# CLI


def run_similarity(args: list[str], capsys) -> tuple[int, str, str]:
    return run_cli(["similarity", *args], capsys)


def test_cli_on_a_text_file_and_several_models(tiny_llama_dir, tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS[:6]) + "\n\n", encoding="utf-8")
    second = save_tiny("llama", tmp_path / "tiny-llama-3", num_layers=3)
    out = tmp_path / "out"
    code, stdout, _ = run_similarity(
        ["--models", f"{tiny_llama_dir},{second}", "--text", str(texts), "--samples", "6", "--batch-size", "4",
         "--out", str(out)],
        capsys,
    )
    assert code == 0, stdout
    assert f"{tiny_llama_dir}: 6 layers, 6 samples" in stdout
    for name, layers in ((tiny_llama_dir.name, 6), ("tiny-llama-3", 3)):
        result = SimilarityResult.load(out / name)
        assert result.num_layers == layers and result.task == "text:texts.txt"
        assert (out / name / "cka_heatmap.png").stat().st_size > 0
        assert (out / name / "adjacent_cka.png").stat().st_size > 0
    assert (out / "cka_grid.png").stat().st_size > 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--pooling", "median"], "pooling"),
        (["--samples", "0"], "samples"),
        (["--dtype", "float64"], "dtype"),
        (["--text", "MISSING"], "not found"),
        (["--text", "EMPTY"], "no non-empty line"),
        (["--text", "LATIN1"], "not UTF-8"),
        (["--kernel", "poly"], "kernel"),
        (["--last-state", "both"], "last state"),
        (["--task", "sciq"], "no 'train' split"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line_and_writes_nothing(tiny_llama_dir, tmp_path, capsys, args, message):
    files = {"MISSING": tmp_path / "missing.txt", "EMPTY": tmp_path / "empty.txt", "LATIN1": tmp_path / "latin1.txt"}
    files["EMPTY"].write_text("\n  \n", encoding="utf-8")
    files["LATIN1"].write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    args = [str(files.get(a, a)) for a in args]
    out = tmp_path / "out"
    code, _, stderr = run_similarity(["--model", str(tiny_llama_dir), "--task", "piqa", *args, "--out", str(out)], capsys)
    assert code == 2
    assert len(stderr.strip().splitlines()) == 1 and message in stderr
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# The real model


@pytest.mark.integration
def test_similarity_of_the_real_model_on_piqa():
    result = compute_similarity("smollm2-135m", task="piqa", samples=32, batch_size=16)
    matrix = result.matrix
    assert matrix.shape == (31, 31) and result.samples == 32
    assert torch.allclose(matrix.diagonal(), torch.ones(31, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(matrix, matrix.T, atol=1e-12)
    assert matrix.min() >= 0.0 and matrix.max() <= 1.0 + 1e-9
    assert len(result.adjacent_layers) == 29


@pytest.mark.integration
def test_cli_end_to_end_on_the_real_model(tmp_path, capsys):
    out = tmp_path / "similarity"
    code, stdout, _ = run_similarity(["--task", "piqa", "--samples", "8", "--out", str(out)], capsys)
    assert code == 0
    assert "smollm2-135m: 30 layers, 8 samples" in stdout
    assert SimilarityResult.load(out).num_layers == 30
    assert {p.name for p in out.iterdir()} == {"similarity.json", "cka_heatmap.png", "adjacent_cka.png"}


def test_a_loaded_model_gives_the_result_of_loading_it_by_name(tiny_llama_dir):
    """plan_for and the offsite pipeline pass the model they hold instead of loading a second copy."""
    by_name = compute_similarity(str(tiny_llama_dir), texts=TEXTS, samples=len(TEXTS))
    model, tokenizer = load_model(str(tiny_llama_dir))
    held = compute_similarity(str(tiny_llama_dir), texts=TEXTS, samples=len(TEXTS), model=model, tokenizer=tokenizer)
    assert held.to_dict() == by_name.to_dict()
    with pytest.raises(UsageError, match="needs its tokenizer"):
        compute_similarity("m", texts=TEXTS, model=model)
