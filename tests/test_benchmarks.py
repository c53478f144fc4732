"""Smoke test of the analysis benchmark whose figures the results discussion rests on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from crashlm.analysis.similarity import compute_similarity
from tests.tiny import CORPUS

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.integration
def test_emulator_depth_reports_every_strategy_and_every_single_layer(tiny_llama_dir, tmp_path):
    similarity = compute_similarity(str(tiny_llama_dir), task="text", texts=CORPUS, samples=6, batch_size=4)
    path = similarity.save(tmp_path / "sim")
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/emulator_depth.py"), "--model", str(tiny_llama_dir),
         "--similarity", str(path), "--ks", "5,4", "--limit", "4", "--threads", "1"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["num_layers"] == 6 and len(result["loss_without_layer"]) == 6
    for strategy in ("uniform", "crash", "crash-share"):
        assert set(result["loss"][strategy]) == {"5", "4"}
        assert len(result["removed"][strategy]["5"]) == 1 and len(result["removed"][strategy]["4"]) == 2
    assert result["removed"]["crash"] == result["removed"]["crash-share"]  # one plan, with or without sharing
