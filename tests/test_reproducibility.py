"""Determinism on CPU and the big-model switches: the same inputs give
bit-identical similarity tables, ``--device-map auto`` and bf16 loading change nothing they
should not, and ``--deterministic`` switches torch to deterministic kernels."""

from __future__ import annotations

import json
import os

import pytest
import torch

from crashlm.analysis.similarity import compute_similarity
from crashlm.cli import main
from tests.tiny import CORPUS


@pytest.fixture
def restore_torch_flags():
    """``--deterministic`` changes process-wide torch settings: put them back for other tests."""
    flags = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(),
             torch.backends.cuda.cudnn_sdp_enabled())
    yield
    torch.use_deterministic_algorithms(flags[0], warn_only=flags[1])
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = flags[2], flags[3]
    torch.backends.cuda.enable_flash_sdp(flags[4])
    torch.backends.cuda.enable_mem_efficient_sdp(flags[5])
    torch.backends.cuda.enable_cudnn_sdp(flags[6])


def test_similarity_is_bit_identical_across_runs_and_with_device_map_auto(tiny_llama_dir, tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(CORPUS) + "\n", encoding="utf-8")
    first = compute_similarity(str(tiny_llama_dir), task="text", texts=CORPUS, samples=6, batch_size=4)
    again = compute_similarity(str(tiny_llama_dir), task="text", texts=CORPUS, samples=6, batch_size=4)
    assert first.cka == again.cka  # exact float equality, not approximate
    main(["similarity", "--model", str(tiny_llama_dir), "--text", str(texts), "--samples", "6", "--batch-size", "4",
          "--device-map", "auto", "--out", str(tmp_path / "dispatched")])
    dispatched = json.loads((tmp_path / "dispatched" / "similarity.json").read_text())
    assert dispatched["cka"] == first.cka and dispatched["num_layers"] == 6
    assert "6 layers, 6 samples" in capsys.readouterr().out


def test_cluster_in_bfloat16_stamps_the_same_base_fingerprint(tiny_llama_dir, tmp_path):
    plans = {}
    for dtype in ("float32", "bfloat16"):
        main(["cluster", "--model", str(tiny_llama_dir), "--strategy", "uniform", "--k", "3", "--trainable", "2",
              "--dtype", dtype, "--out", str(tmp_path / dtype)])
        plans[dtype] = json.loads((tmp_path / dtype / "plan.json").read_text())
    assert plans["float32"]["base_fingerprint"] == plans["bfloat16"]["base_fingerprint"] is not None
    assert plans["float32"] == plans["bfloat16"]


def test_deterministic_flag_switches_torch_to_deterministic_kernels(tiny_llama_dir, tmp_path, restore_torch_flags,
                                                                    monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)  # restored (unset) afterwards
    torch.use_deterministic_algorithms(False)
    main(["--deterministic", "cluster", "--model", str(tiny_llama_dir), "--strategy", "uniform", "--k", "3",
          "--trainable", "2", "--out", str(tmp_path / "plan")])
    assert torch.are_deterministic_algorithms_enabled() and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert not torch.backends.cuda.flash_sdp_enabled() and not torch.backends.cuda.mem_efficient_sdp_enabled()
    assert torch.backends.cuda.math_sdp_enabled() and not torch.backends.cudnn.benchmark
