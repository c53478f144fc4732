"""``crashlm fidelity``: the strategy x K table, on the real model and with bad input."""

from __future__ import annotations

import json

import pytest

from tests.cli import run_cli


@pytest.mark.integration
def test_fidelity_table_of_the_real_model(tmp_path, capsys):
    out = tmp_path / "fidelity"
    code, stdout, stderr = run_cli(["fidelity", "--model", "smollm2-135m", "--strategies", "uniform,drop-last,greedy-share",
                                    "--ks", "28,27", "--calibration-samples", "4", "--texts", "4",
                                    "--similarity-samples", "8", "--out", str(out)], capsys)
    assert code == 0, stderr
    table = json.loads((out / "fidelity.json").read_text())
    assert table["ks"] == [28, 27] and table["num_layers"] == 30
    assert {(r["strategy"], r["k"]) for r in table["rows"]} == {
        (s, k) for s in ("uniform", "drop-last", "greedy-share") for k in (28, 27)}
    for row in table["rows"]:
        f = row["fidelity"]
        assert f["texts"] == 4 and f["loss"] > 0 and f["kl"] > 0 and 0 < f["top1"] < 1
        assert f["full_loss"] == table["full_loss"]
    drop = {r["k"]: r["kept"] for r in table["rows"] if r["strategy"] == "drop-last"}
    assert drop == {28: [*range(26), 28, 29], 27: [*range(25), 28, 29]}
    assert (out / "fidelity.png").stat().st_size > 0 and "top-1 agreement" in stdout
    assert "| Greedy (SLEB) + sharing | 28 |" in (out / "fidelity.md").read_text()


@pytest.mark.integration
def test_fidelity_of_gemma3(tmp_path, capsys):
    """The 262k-word unembedding and its logit soft-capping, on a slice of the held-out text."""
    out = tmp_path / "fidelity"
    code, _, stderr = run_cli(["fidelity", "--model", "gemma3-270m", "--strategies", "uniform", "--ks", "16",
                               "--texts", "2", "--out", str(out)], capsys)
    assert code == 0, stderr
    table = json.loads((out / "fidelity.json").read_text())
    (row,) = table["rows"]
    assert table["num_layers"] == 18 and len(row["kept"]) == 16 and row["fidelity"]["texts"] == 2
    assert row["fidelity"]["kl"] > 0 and 0 <= row["fidelity"]["top1"] <= 1
    assert table["full_loss"] > 0 and row["fidelity"]["loss"] > 0


@pytest.mark.parametrize("args, message", [
    (["--strategies", "uniform,nothing"], "unknown emulator strategy 'nothing'"),
    (["--ks", "99"], "out of range"),
    (["--ks", "ten"], "--ks must be comma-separated integers"),
    (["--texts", "0"], "--texts"),
])
def test_bad_fidelity_options_exit_2_in_one_line(args, message, tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "fidelity"
    code, _, stderr = run_cli(["fidelity", "--model", str(tiny_llama_dir), *args, "--out", str(out)], capsys)
    assert code == 2 and len(stderr.strip().splitlines()) == 1 and message in stderr, stderr
    assert not out.exists()
