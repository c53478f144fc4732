"""Bit-reproducible runs on GPU: which kernels to avoid (see docs/determinism.md).

On CPU, crashlm's runs are bit-identical for the same seed, inputs, torch build and thread
count. On GPU, several kernels reduce in an order that changes from run to run (cuBLAS split-K
with a shared workspace, atomic adds, the flash and memory-efficient attention backward
passes); :func:`make_deterministic` switches them off, at some cost in speed and memory.
"""

from __future__ import annotations

import os

import torch


def make_deterministic(warn_only: bool = True) -> None:
    """Use deterministic kernels only; call before the first CUDA operation of the process.

    Sets ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (unless already set), turns on
    ``torch.use_deterministic_algorithms`` (an op without a deterministic implementation warns,
    or raises with ``warn_only=False``), turns off cuDNN autotuning, and leaves only the math
    kernel for scaled dot-product attention (it materialises the attention matrix: more memory).
    Seeds and the number of processes must match as well: see docs/determinism.md.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_mem_efficient_sdp(False)
    torch.backends.cuda.enable_cudnn_sdp(False)
    torch.backends.cuda.enable_math_sdp(True)
