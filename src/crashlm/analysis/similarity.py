"""Layer similarity: pooled hidden states of every layer, compared with CKA.

CRaSh clusters layers by how similar their representations are. Each example is pooled to one
vector per layer, and every pair of layers is compared with linear CKA (Kornblith et al. 2019):

    HSIC(X, Y) = <H K H, H L H>_F,  K = X X^T, L = Y Y^T, H = I - 11^T / n
    CKA(X, Y)  = HSIC(X, Y) / sqrt(HSIC(X, X) HSIC(Y, Y))

The original code builds H explicitly and recomputes H K H for every pair (O(n^3) per pair).
Here each layer's centred Gram matrix is built once and all M x M HSICs come from one matrix
product of the flattened grams, in float64. Two estimators are offered: the biased one of the
original paper, and the unbiased HSIC_1 of Song et al. (2012), which also drives minibatch CKA
(Nguyen, Raghu & Kornblith 2021): averaging HSIC_1 over fixed-size batches gives CKA over any
number of samples with memory bounded by the batch size. ``kernel="rbf"`` replaces the linear
Gram X X^T by the RBF kernel exp(-|x_i - x_j|^2 / (2 sigma^2)), sigma^2 the median of the
non-zero squared distances (the median heuristic, as the original CRaSh code offers it).

The L + 1 states are those of Hugging Face's ``output_hidden_states``, which the original code
read: the embedding output, the outputs of layers 1..L-1, and as the last entry the FINAL-NORM
output norm(h_L) (``last_state="norm"``, the default). ``last_state="raw"`` keeps the raw output
of layer L instead. The difference can matter for clustering: a final norm rescales every
feature, so the last boundary looks less similar, and CRaSh cuts there once it is among the
K - 1 weakest (docs/analysis.md has SmolLM2-135M's figures).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from crashlm.core.assets import DEFAULT_MODEL
from crashlm.core.errors import RunFailure, UsageError
from crashlm.core.io import read_json, write_json
from crashlm.core.models import (
    capture_layer_io,
    default_device,
    get_final_norm,
    load_config,
    load_model,
)
from crashlm.core.scoring import encode_text, pad_batch, pad_token_id
from crashlm.core.settings import check_choice, check_int
from crashlm.core.tasks import ANALYSIS_SPLIT, load_examples

POOLINGS = ("mean", "mean_weighted", "last", "max")
ESTIMATORS = ("biased", "unbiased")
KERNELS = ("linear", "rbf")
LAST_STATES = ("norm", "raw")  # the last state: final-norm output (output_hidden_states) or raw layer L
# HSIC_1 divides by n (n - 3) and (n - 1)(n - 2): it needs at least four samples.
MIN_SAMPLES = 4
RESULT_FILE = "similarity.json"


# ---------------------------------------------------------------------------------------------
# Pooling


def pool_hidden(hidden: torch.Tensor, attention_mask: torch.Tensor, method: str) -> torch.Tensor:
    """Pool ``hidden`` [B, T, D] over its real tokens to [B, D] (float32), for either padding side.

    ``mean_weighted`` is SGPT's position-weighted mean: the k-th real token weighs k, so later
    tokens, which have seen more context in a causal model, count more. Weights count real
    tokens (a cumulative sum of the mask), so left padding gives the same weights as right.
    """
    check_choice(method, POOLINGS, "pooling")
    mask = attention_mask.to(device=hidden.device, dtype=torch.bool)
    if not bool(mask.any(dim=1).all()):
        raise ValueError("every sequence needs at least one real (non-pad) token")
    hidden = hidden.float()
    if method == "max":
        return hidden.masked_fill(~mask[..., None], float("-inf")).amax(dim=1)
    if method == "last":
        positions = torch.arange(mask.shape[1], device=mask.device)
        last = (positions * mask).argmax(dim=1)  # the highest real position
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    weights = mask.float()
    if method == "mean_weighted":
        weights = weights.cumsum(dim=1) * weights
    weights = weights / weights.sum(dim=1, keepdim=True)
    return torch.einsum("bt,btd->bd", weights, hidden)


# ---------------------------------------------------------------------------------------------
# Streaming collection of pooled states


@torch.no_grad()
def iter_pooled_states(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    pooling: str = "mean_weighted",
    batch_size: int = 16,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    max_length: int = 512,
    last_state: str = "norm",
) -> Iterator[torch.Tensor]:
    """Yield, per batch of texts, the pooled residual states [L + 1, B, D] (float32, CPU).

    Index 0 is the embedding output, index l the output of decoder layer l (1-based); the last
    one goes through the final norm unless ``last_state="raw"``. Texts are encoded as
    :func:`~crashlm.core.scoring.encode_text` (BOS where the tokenizer adds one) and right-padded.
    Only one batch's token states are alive at a time. The base model is called (no LM head):
    logits over the vocabulary for every token would cost more memory than all the layer states.
    """
    check_choice(pooling, POOLINGS, "pooling")
    check_choice(last_state, LAST_STATES, "last state")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    base = getattr(model, "base_model", model)
    # A projection after the norm (OPT-350m's project_out) would change the last state's width: the norm only.
    norm = get_final_norm(model) if last_state == "norm" else None
    for start in tqdm(range(0, len(texts), batch_size), desc="hidden states", unit="batch"):
        ids = [encode_text(tokenizer, text, max_length) for text in texts[start : start + batch_size]]
        batch = {k: v.to(device) for k, v in pad_batch(ids, pad_token_id(tokenizer)).items()}
        with capture_layer_io(model) as states, autocast:
            base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            if norm is not None:
                states[-1] = norm(states[-1])
        pooled = [pool_hidden(state, batch["attention_mask"], pooling) for state in states]
        yield torch.stack(pooled).cpu()


def collect_pooled_states(
    model: nn.Module, tokenizer, texts: Sequence[str], *args, **kwargs
) -> torch.Tensor:
    """All pooled states [L + 1, N, D], in the order of ``texts``.

    Texts run sorted by length so each batch pads little (on PIQA, half the tokens of the
    original order); rows are put back in order afterwards. Streaming consumers such as
    minibatch CKA keep the given order instead: length-sorted batches would not be random
    samples of the data.
    """
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    chunks = iter_pooled_states(model, tokenizer, [texts[i] for i in order], *args, **kwargs)
    by_length = torch.cat(list(chunks), dim=1)
    states = torch.empty_like(by_length)
    states[:, order] = by_length
    return states


# ---------------------------------------------------------------------------------------------
# CKA


def _rbf_gram(x: torch.Tensor) -> torch.Tensor:
    """RBF Gram matrix [N, N] (float64) with sigma^2 = the median of the non-zero squared distances."""
    gram = x @ x.T
    norms = gram.diagonal()
    distances = (norms[:, None] + norms[None, :] - 2 * gram).clamp_min_(0)
    distances.fill_diagonal_(0)
    positive = distances[distances > 0]
    if positive.numel() == 0:
        return torch.ones_like(gram)  # all samples identical: no variance, CKA undefined downstream
    sigma2 = float(np.median(positive.cpu().numpy()))  # numpy's median: the mean of the two middle values
    return torch.exp(distances / (-2 * sigma2))


def _centred_grams(features: torch.Tensor | Sequence[torch.Tensor], estimator: str, kernel: str = "linear") -> torch.Tensor:
    """Centred Gram matrices [M, N, N] (float64) of M feature sets [N, D_m].

    Biased: H K H (for the linear kernel computed as (HX)(HX)^T, no n x n H). Unbiased: the
    HSIC_1 centring of Kornblith et al.'s reference code: zero the diagonal, subtract adjusted
    row/column means, zero the diagonal again; then <K~, L~>_F = n (n - 3) HSIC_1(K, L).
    """
    check_choice(estimator, ESTIMATORS, "CKA estimator")
    check_choice(kernel, KERNELS, "CKA kernel")
    if len(features) == 0:
        raise ValueError("need at least one feature set")
    n = features[0].shape[0]
    if any(x.dim() != 2 or x.shape[0] != n for x in features):
        raise ValueError("every feature set must be a matrix [N, D] with the same N")
    minimum = MIN_SAMPLES if estimator == "unbiased" else 2
    if n < minimum:
        raise ValueError(f"the {estimator} estimator needs at least {minimum} samples, got {n}")
    grams = torch.empty(len(features), n, n, dtype=torch.float64, device=features[0].device)
    for gram, x in zip(grams, features):
        x = x.to(torch.float64)
        if kernel == "rbf":
            gram.copy_(_rbf_gram(x))
            if estimator == "biased":
                gram -= gram.mean(dim=0, keepdim=True)
                gram -= gram.mean(dim=1, keepdim=True)
            continue
        if estimator == "biased":
            x = x - x.mean(dim=0)
        torch.matmul(x, x.T, out=gram)
    if estimator == "unbiased":
        diagonals = grams.diagonal(dim1=1, dim2=2)
        diagonals.zero_()
        means = grams.sum(dim=1) / (n - 2)
        means -= means.sum(dim=1, keepdim=True) / (2 * (n - 1))
        grams -= means[:, :, None]
        grams -= means[:, None, :]
        diagonals.zero_()
    return grams


def hsic_matrix(
    features: torch.Tensor | Sequence[torch.Tensor], estimator: str = "biased", kernel: str = "linear"
) -> torch.Tensor:
    """HSIC of every pair of M feature sets [N, D_m], as an [M, M] float64 matrix.

    Biased: HSIC_0 = <HKH, HLH> / (n - 1)^2. Unbiased: HSIC_1 (Song et al. 2012). All pairs
    come from one product of the flattened centred grams, [M, N*N] @ [N*N, M].
    """
    grams = _centred_grams(features, estimator, kernel)
    n = grams.shape[1]
    flat = grams.reshape(grams.shape[0], -1)
    scale = (n - 1) ** 2 if estimator == "biased" else n * (n - 3)
    return (flat @ flat.T) / scale


def _normalise(hsic: torch.Tensor) -> torch.Tensor:
    """CKA from HSIC: HSIC_xy / sqrt(HSIC_xx HSIC_yy); NaN where a layer has no variance."""
    norms = hsic.diagonal().sqrt()
    return hsic / (norms[:, None] * norms[None, :])


def cka_matrix(
    features: torch.Tensor | Sequence[torch.Tensor], estimator: str = "biased", kernel: str = "linear"
) -> torch.Tensor:
    """CKA of every pair of M feature sets ([M, N, D] or M matrices [N, D_m]) -> [M, M]."""
    return _normalise(hsic_matrix(features, estimator, kernel))


def cka(x: torch.Tensor, y: torch.Tensor, estimator: str = "biased", kernel: str = "linear") -> float:
    """CKA of two feature matrices [N, D_x] and [N, D_y]."""
    return float(cka_matrix([x, y], estimator, kernel)[0, 1])


class MinibatchCKA:
    """Minibatch CKA (Nguyen, Raghu & Kornblith 2021): CKA of means of per-batch HSIC_1.

    HSIC_1 is unbiased, so its average over batches estimates the full-data HSIC whatever the
    batch size; the biased estimator would not (its bias depends on the batch size). Memory is
    that of one batch's grams, [M, B, B] float64.
    """

    def __init__(self) -> None:
        self._hsic_sum: torch.Tensor | None = None
        self.batches = 0
        self.samples = 0

    def update(self, features: torch.Tensor | Sequence[torch.Tensor]) -> None:
        """Add one batch: [M, B, D] (or M matrices [B, D_m]), B >= 4."""
        hsic = hsic_matrix(features, "unbiased")
        self._hsic_sum = hsic if self._hsic_sum is None else self._hsic_sum + hsic
        self.batches += 1
        self.samples += features[0].shape[0]

    def compute(self) -> torch.Tensor:
        if self._hsic_sum is None:
            raise ValueError("MinibatchCKA.compute() before any update()")
        return _normalise(self._hsic_sum / self.batches)


def rebatch(chunks: Iterable[torch.Tensor], size: int) -> Iterator[torch.Tensor]:
    """Regroup chunks [M, b_i, D] along the sample axis into batches of exactly ``size`` samples.

    The last batch holds the remainder (possibly fewer). At most one batch plus one chunk is
    held at a time.
    """
    pending: list[torch.Tensor] = []
    count = 0
    for chunk in chunks:
        pending.append(chunk)
        count += chunk.shape[1]
        while count >= size:
            merged = torch.cat(pending, dim=1)
            yield merged[:, :size]
            rest = merged[:, size:]
            pending, count = ([rest] if rest.shape[1] else []), rest.shape[1]
    if count:
        yield torch.cat(pending, dim=1)


def minibatch_cka(chunks: Iterable[torch.Tensor], batch_size: int) -> torch.Tensor:
    """Minibatch CKA [M, M] over streamed chunks [M, b_i, D], re-batched to ``batch_size``.

    A last partial batch of fewer than 4 samples is dropped (HSIC_1 is undefined there);
    a partial batch of 4 or more counts like any other.
    """
    if batch_size < MIN_SAMPLES:
        raise UsageError(f"minibatch size must be at least {MIN_SAMPLES}, got {batch_size}")
    accumulator = MinibatchCKA()
    for batch in rebatch(chunks, batch_size):
        if batch.shape[1] >= MIN_SAMPLES:
            accumulator.update(batch)
    return accumulator.compute()


# ---------------------------------------------------------------------------------------------
# Result


@dataclass
class SimilarityResult:
    """Layer-by-layer CKA of one model on one text set.

    ``cka`` is (L + 1) x (L + 1): index 0 is the embedding output, index l the output of
    decoder layer l (1-based). ``adjacent[i] = cka[i][i + 1]`` for i = 0..L-1 (embeddings vs
    layer 1 first).
    """

    model: str
    task: str
    samples: int
    pooling: str
    estimator: str
    minibatch: int | None
    num_layers: int
    cka: list[list[float]]
    adjacent: list[float]
    dtype: str = "float32"
    max_length: int = 512
    split: str | None = None  # the task split the samples came from (None: a text file)
    kernel: str = "linear"
    last_state: str = "norm"

    @property
    def adjacent_layers(self) -> list[float]:
        """The L - 1 CKAs between consecutive decoder layers, 0-based: entry b compares layers
        b and b + 1 (the input of layer clustering)."""
        return self.adjacent[1:]

    @property
    def matrix(self) -> torch.Tensor:
        return torch.tensor(self.cka, dtype=torch.float64)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SimilarityResult":
        """Build from a dict, checking fields, types and the matrix shape (UsageError if bad)."""
        if not isinstance(data, dict):
            raise UsageError("a similarity result must be a JSON object")
        required = ("model", "task", "samples", "pooling", "estimator", "minibatch", "num_layers", "cka", "adjacent")
        missing = [key for key in required if key not in data]
        if missing:
            raise UsageError(f"similarity result lacks {', '.join(missing)}")
        num_layers = data["num_layers"]
        check_int(num_layers, "num_layers")
        size = num_layers + 1
        matrix = data["cka"]
        if (
            not isinstance(matrix, list)
            or len(matrix) != size
            or any(not isinstance(row, list) or len(row) != size for row in matrix)
        ):
            raise UsageError(f"cka must be a {size} x {size} matrix for {num_layers} layers")
        adjacent = data["adjacent"]
        if not isinstance(adjacent, list) or len(adjacent) != num_layers:
            raise UsageError(f"adjacent must hold {num_layers} values")
        values = [v for row in matrix for v in row] + adjacent
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in values):
            raise UsageError("cka and adjacent must hold finite numbers")
        known = {key: data[key] for key in cls.__dataclass_fields__ if key in data}
        known.setdefault("last_state", "raw")  # files written before the final-norm default
        return cls(**known)

    def save(self, out_dir: str | Path) -> Path:
        """Write ``out_dir/similarity.json`` atomically."""
        return write_json(Path(out_dir) / RESULT_FILE, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "SimilarityResult":
        """Read a ``similarity.json`` (or the directory holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / RESULT_FILE
        data = read_json(path, "similarity file")
        try:
            return cls.from_dict(data)
        except UsageError as exc:
            raise UsageError(f"{path}: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# Entry point


def compute_similarity(
    model_spec: str = DEFAULT_MODEL,
    task: str = "piqa",
    texts: Sequence[str] | None = None,
    samples: int = 512,
    pooling: str = "mean_weighted",
    estimator: str = "biased",
    minibatch: int | None = None,
    batch_size: int = 16,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    max_length: int = 512,
    device_map: str | None = None,
    split: str = ANALYSIS_SPLIT,
    kernel: str = "linear",
    last_state: str = "norm",
    model: nn.Module | None = None,
    tokenizer: Any = None,
) -> SimilarityResult:
    """Layer-by-layer CKA of ``model_spec`` on the first ``samples`` texts.

    Texts are ``texts`` when given (``task`` is then only a label), else the ``split`` examples
    of ``task`` rendered as context + gold answer: the train split by default, so no evaluation
    item shapes the plan. ``minibatch`` switches to minibatch CKA with that batch size, which
    requires the unbiased estimator and the linear kernel. ``dtype`` is the weights' and autocast
    dtype. ``device_map`` (e.g. ``"auto"``) spreads a model too large for one GPU over the
    devices instead of placing it on ``device``. A caller that holds the model already passes
    it as ``model`` and ``tokenizer`` (``model_spec`` is then its name), so it is not loaded twice.
    """
    check_choice(pooling, POOLINGS, "pooling")
    check_choice(estimator, ESTIMATORS, "CKA estimator")
    check_choice(kernel, KERNELS, "CKA kernel")
    check_choice(last_state, LAST_STATES, "last state")
    check_int(samples, "samples", MIN_SAMPLES)
    check_int(batch_size, "batch size")
    check_int(max_length, "max length")
    if minibatch is not None:
        check_int(minibatch, "minibatch size", MIN_SAMPLES)
        if estimator != "unbiased":
            raise UsageError("minibatch CKA needs the unbiased estimator (biased HSIC does not average over batches)")
        if kernel != "linear":
            raise UsageError(
                "minibatch CKA uses the linear kernel (an RBF bandwidth from each batch's median would differ per batch)"
            )
    if device is not None and device_map is not None:
        raise UsageError("give a device or a device map, not both")
    if texts is None:
        if model is None:
            load_config(model_spec)  # a missing or unsupported model fails before any data is read
        texts = [example.text for example in load_examples(task, split=split, limit=samples)]
    else:
        split = None
    texts = list(texts)[:samples]
    if any(not isinstance(t, str) or not t.strip() for t in texts):
        raise UsageError("every text sample must be a non-empty string")
    if len(texts) < MIN_SAMPLES:
        raise UsageError(f"CKA needs at least {MIN_SAMPLES} text samples, got {len(texts)}")

    if model is not None:
        if tokenizer is None:
            raise UsageError("a model passed to compute_similarity needs its tokenizer")
        device = next(model.parameters()).device
    else:
        device = torch.device(device) if device is not None else default_device()
        model, tokenizer = load_model(model_spec, dtype=dtype, device=device, device_map=device_map)
    if device_map is not None:
        device = model.get_input_embeddings().weight.device  # where a dispatched model takes its inputs
    settings = (pooling, batch_size, dtype, device, max_length, last_state)
    if minibatch is None:
        matrix = cka_matrix(collect_pooled_states(model, tokenizer, texts, *settings), estimator, kernel)
    else:
        matrix = minibatch_cka(iter_pooled_states(model, tokenizer, texts, *settings), minibatch)
    if not bool(torch.isfinite(matrix).all()):
        raise RunFailure("CKA is undefined: some layer's pooled states do not vary across samples")
    num_layers = matrix.shape[0] - 1
    return SimilarityResult(
        model=model_spec,
        task=task,
        samples=len(texts),
        pooling=pooling,
        estimator=estimator,
        minibatch=minibatch,
        num_layers=num_layers,
        cka=matrix.tolist(),
        adjacent=[float(matrix[i, i + 1]) for i in range(num_layers)],
        dtype=str(dtype).removeprefix("torch."),
        max_length=max_length,
        split=split,
        kernel=kernel,
        last_state=last_state,
    )
