"""The benchmarks' fidelity-against-gain collector (benchmarks/fidelity_gain.py) on hand-made tables."""

import subprocess
import sys
from pathlib import Path

from crashlm.core.io import write_json

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
from fidelity_gain import table_points  # noqa: E402


def table(k: int | None, kept: dict | None = None) -> dict:
    rows = [
        {"name": "Full ZS"},
        {"name": "Uniform, Emu ZS", "run": "uniform"},
        {"name": "Uniform, Plug-in", "run": "uniform", "gain_recovered": 0.5, "gain_recovered_std": 0.1},
        {"name": "OFT + KD, Plug-in", "run": "uniform-kd", "gain_recovered": 0.2, "gain_recovered_std": None},
        {"name": "CRaSh, Plug-in", "run": "crash-share", "gain_recovered": 0.9, "gain_recovered_std": 0.0},
    ]
    fidelity = {"uniform": {"piqa": {"kl": 2.0}, "arc_easy": {"kl": 4.0}}, "uniform-kd": {"piqa": {"kl": 1.0}}}
    out = {"model": "m", "rows": rows, "fidelity": fidelity, "config": {"k": k}}
    return out if kept is None else {**out, "kept_layers": kept}


def test_points_are_the_plug_in_rows_with_fidelity_labelled_by_k():
    points = table_points(table(None, {"uniform": {"piqa": 25, "arc_easy": 25}}))
    # Mean KL over tasks; a "+ KD" run has its emulator's K; a row without fidelity is left out.
    assert points == [("Uniform, K=25", 3.0, 0.5, 0.1), ("OFT + KD, K=25", 1.0, 0.2, None)]
    assert [label for label, *_ in table_points(table(None))] == ["Uniform, K=L/2", "OFT + KD, K=L/2"]
    assert table_points(table(12))[0][0] == "Uniform, K=12"


def test_tables_of_different_models_are_refused(tmp_path):
    write_json(tmp_path / "a.json", table(10))
    write_json(tmp_path / "b.json", {**table(10), "model": "other"})
    run = subprocess.run([sys.executable, str(BENCHMARKS / "fidelity_gain.py"), str(tmp_path / "a.json"),
                          str(tmp_path / "b.json"), "--out", str(tmp_path / "f.png")], capture_output=True, text=True)
    assert run.returncode == 2 and "different models" in run.stderr and not (tmp_path / "f.png").exists()
    run = subprocess.run([sys.executable, str(BENCHMARKS / "fidelity_gain.py"), str(tmp_path / "a.json"),
                          "--out", str(tmp_path / "f.png")], capture_output=True, text=True)
    assert run.returncode == 0 and (tmp_path / "f.png").is_file()
