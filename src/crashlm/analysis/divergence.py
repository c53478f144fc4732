"""Layer-to-layer divergence: how far apart the next-token distributions of two layers are.

Every state's residual stream is decoded to a next-token distribution with a lens
(:mod:`crashlm.analysis.lens`: logit lens, or a tuned lens) and every pair of states (i, j) is compared
token by token, then averaged over the real tokens of the samples. All measures act on
**probabilities** (the original CRaSh code passed log-probabilities to functions that expect
probabilities, which makes its numbers meaningless: negative "distributions", JS not bounded).

With p = P_i, q = P_j and m = (p + q) / 2, in nats:

* ``kl``: KL(P_i || P_j) = sum p log(p / q), asymmetric (row i, column j);
* ``js``: Jensen-Shannon, (KL(p || m) + KL(q || m)) / 2, in [0, ln 2];
* ``hellinger``: sqrt(1 - sum sqrt(p q)), in [0, 1];
* ``l2``: ||p - q||_2, in [0, sqrt 2];
* ``cosine``: cosine *distance* 1 - <p, q> / (|p| |q|), in [0, 1], so that, like the others,
  it is 0 on the diagonal.

States are numbered as in :mod:`crashlm.analysis.lens`: S = L + 1, index 0 the embedding output. The
diagonal is set to exactly zero and the symmetric measures are symmetrised, so float rounding
never shows as a spurious self-distance.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from crashlm.analysis.lens import (
    TunedLens,
    check_depth,
    iter_token_states,
    layer_log_probs,
)
from crashlm.core.errors import UsageError
from crashlm.core.io import dataclass_fields, read_json, write_json
from crashlm.core.settings import check_choice

MEASURES = ("js", "kl", "hellinger", "l2", "cosine")
SYMMETRIC = ("js", "hellinger", "l2", "cosine")
RESULT_FILE = "divergence.json"
# Upper bound of each measure between two distributions: scales adjacent_similarity to [0, 1].
_BOUNDS = {"js": math.log(2.0), "hellinger": 1.0, "l2": math.sqrt(2.0), "cosine": 1.0}
# Working memory of one token chunk of the pairwise work, and how many float32 [S, n, V]
# tensors that work holds at its peak (input, log p, p, sqrt p, the two JS buffers, a spare).
DEFAULT_BUDGET_BYTES = 512 * 2**20
_WORKING_COPIES = 7
_TINY = torch.finfo(torch.float32).tiny


def _check_measure(measure: str) -> None:
    check_choice(measure, MEASURES, "divergence measure")


# ---------------------------------------------------------------------------------------------
# Pairwise divergences of token distributions


def _js_sums(p: torch.Tensor, neg_entropy: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon of every pair of states, summed over tokens: [S, n, V] probabilities -> [S, S].

    With s = p + q and m = s / 2, sum m log m = (sum s log s) / 2 - ln 2 (both sum to one), so
    JS = (sum p log p + sum q log q) / 2 - (sum s log s) / 2 + ln 2: one elementwise pass per
    pair, the only O(S^2 V) work of the module. Row i is done against all later states at once,
    in two reused buffers (fresh large tensors cost more in page faults than the arithmetic).
    """
    num_states = p.shape[0]
    p = p.clamp_min(_TINY)  # no 0 * log 0 below; shifts each sum by < 1e-33
    pair_sum = torch.empty_like(p[1:])
    log_sum = torch.empty_like(p[1:])
    js = torch.zeros(num_states, num_states, dtype=torch.float64, device=p.device)
    for i in range(num_states - 1):
        k = num_states - 1 - i
        s = torch.add(p[i : i + 1], p[i + 1 :], out=pair_sum[:k])
        s_log_s = torch.log(s, out=log_sum[:k]).mul_(s).sum(-1).double()  # [k, n]
        row = 0.5 * (neg_entropy[i : i + 1] + neg_entropy[i + 1 :] - s_log_s) + math.log(2.0)
        js[i, i + 1 :] = row.clamp_min(0.0).sum(-1)
    return js + js.T


def _pairwise_sums(log_probs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every measure for every pair of states, summed over tokens: [S, n, V] -> {measure: [S, S]}.

    Per token, the cross terms of KL, Hellinger, L2 and cosine are Gram matrices, one batched
    matmul [n, S, V] @ [n, V, S] each; JS needs each pair's mixture (:func:`_js_sums`). The
    work is float32 (about 1e-6 absolute error per token against float64, checked in the
    tests) and every per-token value is summed over tokens in float64.
    """
    log_p = log_probs.float().clamp_min(torch.finfo(torch.float32).min)
    p = log_p.exp()
    neg_entropy = (p * log_p).sum(-1).double()  # [S, n]: sum p log p
    by_token = p.transpose(0, 1)  # [n, S, V]
    cross = torch.bmm(by_token, log_p.permute(1, 2, 0)).double()  # [n, S, S]: sum_v p_i log p_j
    kl = neg_entropy.T[:, :, None] - cross
    root = by_token.sqrt()
    overlap = torch.bmm(root, root.transpose(1, 2)).double()  # Bhattacharyya coefficient
    hellinger = (1.0 - overlap).clamp_min(0.0).sqrt()
    gram = torch.bmm(by_token, by_token.transpose(1, 2)).double()
    squared_norm = gram.diagonal(dim1=1, dim2=2)
    l2 = (squared_norm[:, :, None] + squared_norm[:, None, :] - 2.0 * gram).clamp_min(0.0).sqrt()
    norm = squared_norm.sqrt()
    cosine = 1.0 - gram / (norm[:, :, None] * norm[:, None, :])
    return {
        "js": _js_sums(p, neg_entropy),
        "kl": kl.sum(0),
        "hellinger": hellinger.sum(0),
        "l2": l2.sum(0),
        "cosine": cosine.sum(0),
    }


class DivergenceAccumulator:
    """Streaming means of every measure over tokens: ``update`` with [S, n, V] log-probabilities.

    Tokens are processed in chunks sized so the float32 working copies stay within
    ``budget_bytes`` (a 49k vocabulary over 31 states is 6 MB per token and copy), and only
    the [S, S] float64 sums persist.
    """

    def __init__(self, budget_bytes: int = DEFAULT_BUDGET_BYTES) -> None:
        self.budget_bytes = budget_bytes
        self.tokens = 0
        self._sums: dict[str, torch.Tensor] | None = None

    def chunk_tokens(self, num_states: int, vocab: int) -> int:
        """How many tokens one chunk of pairwise work may hold within the budget (at least 1)."""
        return max(1, self.budget_bytes // (_WORKING_COPIES * 4 * num_states * vocab))

    def update(self, log_probs: torch.Tensor) -> None:
        if log_probs.dim() != 3:
            raise ValueError(f"expected log-probabilities [states, tokens, vocab], got shape {tuple(log_probs.shape)}")
        log_mass = torch.logsumexp(log_probs.float(), -1)
        if not torch.allclose(log_mass, torch.zeros_like(log_mass), atol=1e-3):
            raise ValueError("the input is not normalised log-probabilities (exp does not sum to 1 over the vocabulary)")
        num_states, num_tokens, vocab = log_probs.shape
        chunk = self.chunk_tokens(num_states, vocab)
        for start in range(0, num_tokens, chunk):
            sums = _pairwise_sums(log_probs[:, start : start + chunk])
            if self._sums is None:
                self._sums = {name: value.cpu() for name, value in sums.items()}
            else:
                for name, value in sums.items():
                    self._sums[name] += value.cpu()
        self.tokens += num_tokens

    def compute(self) -> dict[str, torch.Tensor]:
        """Mean of each measure over all tokens seen, [S, S] float64, zero diagonal."""
        if self._sums is None or self.tokens == 0:
            raise ValueError("DivergenceAccumulator.compute() before any token")
        means = {}
        for name, total in self._sums.items():
            matrix = total / self.tokens
            if name in SYMMETRIC:
                matrix = 0.5 * (matrix + matrix.T)
            matrix.fill_diagonal_(0.0)
            means[name] = matrix
        return means


# ---------------------------------------------------------------------------------------------
# Result


@dataclass
class DivergenceResult:
    """Mean layer-to-layer divergences of one model on one text set.

    ``measures[name]`` is an S x S matrix (S = L + 1, index 0 the embedding output); for ``kl``
    the entry [i][j] is KL(P_i || P_j). ``depth`` is each state's depth in the full model (see
    :func:`~crashlm.analysis.lens.emulator_depth`); ``settings`` records how the result was made.
    """

    model: str
    lens: str
    task: str
    samples: int
    tokens: int
    num_layers: int
    measures: dict[str, list[list[float]]]
    depth: list[int] = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.depth:
            self.depth = list(range(self.num_layers + 1))

    def matrix(self, measure: str) -> torch.Tensor:
        _check_measure(measure)
        return torch.tensor(self.measures[measure], dtype=torch.float64)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "DivergenceResult":
        result = cls(**dataclass_fields(cls, data, "divergence result"))
        size = result.num_layers + 1
        if not isinstance(result.measures, dict) or set(result.measures) != set(MEASURES):
            raise UsageError(f"divergence result must hold the measures {', '.join(MEASURES)}")
        for name, matrix in result.measures.items():
            if not isinstance(matrix, list) or len(matrix) != size or any(
                not isinstance(row, list) or len(row) != size for row in matrix
            ):
                raise UsageError(f"divergence {name} must be a {size} x {size} matrix for {result.num_layers} layers")
        return result

    def save(self, out_dir: str | Path) -> Path:
        """Write ``out_dir/divergence.json`` atomically."""
        return write_json(Path(out_dir) / RESULT_FILE, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "DivergenceResult":
        """Read a ``divergence.json`` (or the directory holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / RESULT_FILE
        try:
            return cls.from_dict(read_json(path, "divergence file"))
        except UsageError as exc:
            raise UsageError(f"{path}: {exc}") from exc


def compute_divergence(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    lens: TunedLens | None = None,
    batch_size: int = 8,
    max_length: int = 512,
    name: str = "model",
    task: str = "text",
    depth: Sequence[int] | None = None,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
) -> DivergenceResult:
    """Mean divergences between every pair of states' next-token distributions over ``texts``.

    Streams over batches; each batch's tokens are decoded by ``lens`` (logit lens when None;
    an emulator's ``depth`` picks the tuned lens's translators) and compared in memory-bounded
    chunks (see :class:`DivergenceAccumulator`). The cost is O(S^2 V) per token, for JS.
    """
    texts = list(texts)
    if not texts:
        raise UsageError("layer divergence needs at least one text")
    depth = check_depth(model, depth)
    num_states = len(depth)
    accumulator = DivergenceAccumulator(budget_bytes)
    with torch.no_grad():
        for batch in iter_token_states(model, tokenizer, texts, batch_size, max_length, desc=f"divergence {name}"):
            chunk = accumulator.chunk_tokens(num_states, model.config.vocab_size)
            for start in range(0, batch.num_tokens, chunk):
                accumulator.update(layer_log_probs(model, batch.states[:, start : start + chunk], lens, depth))
    return DivergenceResult(
        model=name,
        lens="logit" if lens is None else "tuned",
        task=task,
        samples=len(texts),
        tokens=accumulator.tokens,
        num_layers=num_states - 1,
        measures={key: value.tolist() for key, value in accumulator.compute().items()},
        depth=depth,
    )


# ---------------------------------------------------------------------------------------------
# Similarity of consecutive layers, for clustering


def adjacent_similarity(result: DivergenceResult, measure: str = "js") -> list[float]:
    """The L - 1 similarities in [0, 1] between consecutive decoder layers (b, b + 1), 0-based.

    The input of :func:`crashlm.emulators.plans.crash_plan`, like ``SimilarityResult.adjacent_layers``:
    the embedding state is left out. Each bounded measure d becomes 1 - d / max(d) (JS / ln 2,
    Hellinger, L2 / sqrt 2, cosine distance); KL, unbounded, becomes exp(-(KL_ij + KL_ji) / 2).
    """
    _check_measure(measure)
    matrix = result.matrix(measure)
    pairs = [(b + 1, b + 2) for b in range(result.num_layers - 1)]  # state index = layer + 1
    if measure == "kl":
        return [math.exp(-0.5 * float(matrix[i, j] + matrix[j, i])) for i, j in pairs]
    return [min(1.0, max(0.0, 1.0 - float(matrix[i, j]) / _BOUNDS[measure])) for i, j in pairs]
