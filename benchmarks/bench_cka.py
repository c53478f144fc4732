"""All-pairs linear CKA: crashlm's one-product path vs the per-pair style of the original code.

crashlm (``crashlm.analysis.similarity.cka_matrix``) centres each layer's Gram matrix once, stacks them
and gets every pair's HSIC from one matrix product. The original CRaSh code (the widespread
``CKA.py``: ``linear_CKA(X, Y)``) works pair by pair in numpy float64: for each pair it
recomputes both Gram matrices, builds the n x n centring matrix ``H = I - 11^T / n`` and forms
``H K H`` with two n x n x n products, three times per pair (for HSIC(X, Y), HSIC(X, X),
HSIC(Y, Y)). The unbiased reference is the same per-pair loop with Kornblith et al.'s HSIC_1
centring. The references are given the upper triangle only (i <= j, then mirrored), which
halves their work. Both sides get the same features and must agree to 1e-5.

Then the minibatch path (``crashlm.analysis.similarity.minibatch_cka``: unbiased HSIC averaged over
batches, Nguyen, Raghu & Kornblith 2021) runs on 20,000 samples streamed in chunks, in a fresh
process whose peak resident memory (VmHWM - VmRSS before the work, from /proc; torch's
allocations are invisible to tracemalloc) is compared with what the full-batch Gram matrices
would need.

Features: seeded random layers with block structure. Each layer is the previous one plus
noise (little inside a block, much at a block boundary) with per-feature scales, so the CKA
matrix has the modular look of a real model's.

    .venv/bin/python benchmarks/bench_cka.py [--quick]

The last printed line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import time
from collections.abc import Iterator

import numpy as np
import torch

from crashlm.analysis.similarity import cka_matrix, minibatch_cka

BLOCK = 8  # layers per block of the synthetic features
STREAM_CHUNK = 64  # samples per chunk of the minibatch stream, like a forward pass's batch


# ---------------------------------------------------------------------------------------------
# Inputs


def layered_chunks(layers: int, samples: int, dim: int, seed: int, chunk: int = 1024) -> Iterator[torch.Tensor]:
    """Chunks [layers, b, dim] (float32) of synthetic layer features, ``samples`` in all.

    Samples are independent, so a stream of chunks is the same data as one big batch would be
    drawn chunk by chunk; at most one chunk is held.
    """
    generator = torch.Generator().manual_seed(seed)
    scales = 0.5 + torch.rand(layers, dim, generator=generator)
    for start in range(0, samples, chunk):
        b = min(chunk, samples - start)
        x = torch.randn(b, dim, generator=generator)
        out = torch.empty(layers, b, dim)
        for layer in range(layers):
            if layer:
                noise = 1.5 if layer % BLOCK == 0 else 0.25
                x = x + noise * torch.randn(b, dim, generator=generator)
            out[layer] = x * scales[layer]
        yield out


def layered_features(layers: int, samples: int, dim: int, seed: int) -> torch.Tensor:
    return torch.cat(list(layered_chunks(layers, samples, dim, seed)), dim=1)


# ---------------------------------------------------------------------------------------------
# The per-pair reference (original style, numpy float64)


def _centring(gram: np.ndarray) -> np.ndarray:
    n = gram.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    return h @ gram @ h


def _hsic_biased(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.sum(_centring(x @ x.T) * _centring(y @ y.T)))


def _centring_unbiased(gram: np.ndarray) -> np.ndarray:
    """HSIC_1 centring of Kornblith et al.'s reference code."""
    n = gram.shape[0]
    gram = gram.copy()
    np.fill_diagonal(gram, 0.0)
    means = gram.sum(axis=0) / (n - 2)
    means -= means.sum() / (2 * (n - 1))
    gram -= means[:, None] + means[None, :]
    np.fill_diagonal(gram, 0.0)
    return gram


def _hsic_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.sum(_centring_unbiased(x @ x.T) * _centring_unbiased(y @ y.T)))


def reference_cka(features: np.ndarray, estimator: str) -> np.ndarray:
    """CKA of every pair i <= j, pair by pair, everything recomputed for each pair."""
    hsic = _hsic_biased if estimator == "biased" else _hsic_unbiased
    m = features.shape[0]
    out = np.eye(m)
    for i in range(m):
        for j in range(i + 1, m):
            x, y = features[i], features[j]
            out[i, j] = out[j, i] = hsic(x, y) / np.sqrt(hsic(x, x) * hsic(y, y))
    return out


# ---------------------------------------------------------------------------------------------
# Minibatch memory, in a fresh process


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _minibatch_child(args: tuple, queue) -> None:
    layers, samples, dim, seed, batch = args
    before = _rss_kib("VmRSS")  # torch and crashlm imported, nothing computed yet
    start = time.perf_counter()
    matrix = minibatch_cka(layered_chunks(layers, samples, dim, seed, STREAM_CHUNK), batch)
    seconds = time.perf_counter() - start
    queue.put({"seconds": seconds, "rss_before_kib": before, "peak_kib": _rss_kib("VmHWM"),
               "finite": bool(torch.isfinite(matrix).all()), "adjacent": matrix.diagonal(1).tolist()})


def run_minibatch(layers: int, samples: int, dim: int, seed: int, batch: int) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_minibatch_child, args=((layers, samples, dim, seed, batch), queue))
    process.start()
    result = queue.get()
    process.join()
    return result


# ---------------------------------------------------------------------------------------------


def _timed(fn, repeats: int = 1):
    best, value = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - start)
    return best, value


def _mib(num_bytes: float) -> float:
    return num_bytes / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="small case (31 x 64 x 576; minibatch: 1,000 samples, B=256), < 1 min"
    )
    parser.add_argument("--layers", type=int, default=31, help="feature sets (embeddings + 30 layers). Default 31.")
    parser.add_argument("--samples", type=int, default=None, help="samples for the all-pairs comparison. Default 512.")
    parser.add_argument("--dim", type=int, default=576, help="feature width (SmolLM2-135M's). Default 576.")
    parser.add_argument("--minibatch-samples", type=int, default=None, help="samples for the minibatch path. Default 20000.")
    parser.add_argument("--minibatch", type=int, default=None, help="minibatch size B. Default 512.")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats of crashlm's path (best kept). Default 3.")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic features. Default 0.")
    args = parser.parse_args()
    samples = args.samples or (64 if args.quick else 512)
    mb_samples = args.minibatch_samples or (1_000 if args.quick else 20_000)
    batch = args.minibatch or (256 if args.quick else 512)
    m, d = args.layers, args.dim

    features = layered_features(m, samples, d, args.seed)
    as_numpy = features.to(torch.float64).numpy()
    print(f"all-pairs CKA: {m} layers x {samples} samples x d={d}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    results = {}
    for estimator in ("biased", "unbiased"):
        ours_s, ours = _timed(lambda estimator=estimator: cka_matrix(features, estimator), args.repeats)
        ref_s, ref = _timed(lambda estimator=estimator: reference_cka(as_numpy, estimator))
        diff = float(np.abs(ours.numpy() - ref).max())
        results[estimator] = {"ours_s": ours_s, "reference_s": ref_s, "speedup": ref_s / ours_s, "max_abs_diff": diff}
        print(f"  {estimator:8s} crashlm {ours_s:8.3f} s   per-pair reference {ref_s:8.2f} s   "
              f"speedup {ref_s / ours_s:7.1f}x   max |diff| {diff:.2e}")
    adjacent = cka_matrix(features, "biased").diagonal(1)
    print(f"  adjacent CKA (biased): min {adjacent.min():.3f} (block boundaries), max {adjacent.max():.3f}")

    mb = run_minibatch(m, mb_samples, d, args.seed, batch)
    peak_mib = (mb["peak_kib"] - mb["rss_before_kib"]) / 1024
    full_grams = m * mb_samples**2 * 8  # float64 [M, N, N]
    full_features = m * mb_samples * d * 4  # float32 [M, N, D]
    batch_grams = m * batch**2 * 8
    batch_features = m * batch * d * 4
    print(f"minibatch CKA: {mb_samples:,} samples, B={batch}, streamed in chunks of {STREAM_CHUNK}: "
          f"{mb['seconds']:.1f} s, peak RSS +{peak_mib:.0f} MiB over the process baseline")
    print(f"  full batch would need {_mib(full_grams):,.0f} MiB of Gram matrices "
          f"(+ {_mib(full_features):,.0f} MiB of features); one batch: {_mib(batch_grams):.0f} MiB of grams "
          f"+ {_mib(batch_features):.0f} MiB of features")

    max_diff = max(r["max_abs_diff"] for r in results.values())
    ok = max_diff <= 1e-5 and mb["finite"]
    print("PASS" if ok else "FAIL", f"(max |diff| {max_diff:.1e} <= 1e-5)")
    print(json.dumps({
        "benchmark": "cka",
        "layers": m, "samples": samples, "dim": d,
        "speedup": results["biased"]["speedup"],
        "speedup_unbiased": results["unbiased"]["speedup"],
        "max_abs_diff": max_diff,
        "ours_s": {k: r["ours_s"] for k, r in results.items()},
        "reference_s": {k: r["reference_s"] for k, r in results.items()},
        "minibatch": {"samples": mb_samples, "batch": batch, "seconds": mb["seconds"],
                      "peak_rss_increase_mib": peak_mib, "memory_measure": "VmHWM - VmRSS (fresh process)",
                      "full_batch_grams_mib": _mib(full_grams), "full_batch_features_mib": _mib(full_features),
                      "one_batch_mib": _mib(batch_grams + batch_features)},
        "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "ok": ok,
    }))
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
