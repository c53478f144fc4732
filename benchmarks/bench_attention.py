"""Fused (SDPA) against explicit attention products, forward + backward and forward only, per length.

The figure behind :data:`crashlm.core.attention.EXPLICIT_BELOW_TOKENS`: on a CPU in bf16, which of
``scaled_dot_product_attention`` and :func:`crashlm.core.attention.explicit_attention` trains
faster at each sequence length. The shapes are SmolLM2-135M's attention (9 query heads over 3
key/value heads, head size 64) on a batch of 8, causal, as a training step sees them.

    .venv/bin/python benchmarks/bench_attention.py                      # bf16, 1 thread
    .venv/bin/python benchmarks/bench_attention.py --quick              # two lengths, a few seconds
    .venv/bin/python benchmarks/bench_attention.py --threads 2 --lengths 96,128,192,256
    .venv/bin/python benchmarks/bench_attention.py --dtype float32

The last printed line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from crashlm.core.attention import EXPLICIT_BELOW_TOKENS, explicit_attention


class _Heads(nn.Module):
    """What transformers' attention functions read from the attention module."""

    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups, self.is_causal = groups, True


def timed(fn, seconds: float) -> float:
    """Mean milliseconds of ``fn()`` over at least ``seconds`` (after two untimed calls)."""
    fn(), fn()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or calls < 3:
        fn()
        calls += 1
    return 1000 * (time.perf_counter() - start) / calls


def measure(tokens: int, args) -> dict:
    dtype = getattr(torch, args.dtype)
    module = _Heads(args.heads // args.kv_heads).train()
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(args.batch, args.heads, tokens, args.head_size, generator=gen).to(dtype).requires_grad_()
    k, v = (torch.randn(args.batch, args.kv_heads, tokens, args.head_size, generator=gen).to(dtype).requires_grad_()
            for _ in range(2))
    kernels = {"fused": lambda: sdpa_attention_forward(module, q, k, v, None)[0],
               "explicit": lambda: explicit_attention(module, q, k, v, None)}
    row = {"tokens": tokens}
    for name, kernel in kernels.items():
        row[f"{name}_train_ms"] = timed(lambda kernel=kernel: kernel().float().sum().backward(), args.seconds)
        with torch.no_grad():
            row[f"{name}_forward_ms"] = timed(kernel, args.seconds)
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="lengths 64 and 192, short timings (a few seconds)")
    parser.add_argument("--lengths", default="32,64,96,128,160,192,256,384,512", help="sequence lengths")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=9, help="query heads (default 9, SmolLM2-135M)")
    parser.add_argument("--kv-heads", type=int, default=3, help="key/value heads (default 3)")
    parser.add_argument("--head-size", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=0.5, help="timed seconds per measurement (default 0.5)")
    args = parser.parse_args(argv)
    if args.heads % args.kv_heads:
        parser.error("--heads must be a multiple of --kv-heads")
    if args.quick:
        args.lengths, args.seconds = "64,192", 0.05
    torch.set_num_threads(args.threads)
    try:
        lengths = [int(n) for n in args.lengths.split(",")]
    except ValueError:
        parser.error(f"--lengths: comma-separated whole numbers, got {args.lengths!r}")
    if min(lengths) < 1:
        parser.error("--lengths: every length must be at least 1")
    print(f"{args.dtype} on CPU, torch {torch.__version__}, {args.threads} thread(s), load average "
          f"{os.getloadavg()[0]:.1f}; batch {args.batch}, {args.heads} heads over {args.kv_heads}, head size "
          f"{args.head_size}, causal. crashlm trains with the explicit products below {EXPLICIT_BELOW_TOKENS} tokens "
          f"(bf16 on a CPU).")
    print(f"{'tokens':>7}{'fused train ms':>16}{'explicit':>10}{'ratio':>7}{'fused fwd ms':>14}{'explicit':>10}")
    rows = []
    for tokens in lengths:
        row = measure(tokens, args)
        rows.append(row)
        print(f"{tokens:>7}{row['fused_train_ms']:>16.2f}{row['explicit_train_ms']:>10.2f}"
              f"{row['fused_train_ms'] / row['explicit_train_ms']:>7.2f}{row['fused_forward_ms']:>14.2f}"
              f"{row['explicit_forward_ms']:>10.2f}", flush=True)
    print(json.dumps({"benchmark": "bench_attention", "dtype": args.dtype, "threads": args.threads,
                      "torch": torch.__version__, "shape": [args.batch, args.heads, args.kv_heads, args.head_size],
                      "results": rows}))


if __name__ == "__main__":
    main()
