"""The whole offsite-tuning table from one command, on a tiny random model and real PIQA items."""

from __future__ import annotations

import json

import pytest

from crashlm.experiments.offsite import OffsiteConfig, build_table
from tests.cli import run_cli
from tests.tiny import save_tiny

ROWS = [
    "Full ZS", "Full FT",
    "Uniform, Emu ZS", "Uniform, Emu FT", "Uniform, Plug-in",
    "CRaSh w/o sharing, Emu ZS", "CRaSh w/o sharing, Emu FT", "CRaSh w/o sharing, Plug-in",
    "CRaSh, Emu ZS", "CRaSh, Emu FT", "CRaSh, Plug-in",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("offsite")
    model = save_tiny("llama", root / "tiny-llama", num_layers=8, max_position_embeddings=1024)
    args = [
        "offsite", "--model", str(model), "--tasks", "piqa", "--k", "4", "--trainable", "2",
        "--similarity-samples", "8", "--train-samples", "16", "--val-samples", "8", "--max-steps", "2",
        "--eval-every", "1", "--batch-size", "4", "--eval-limit", "8", "--max-length", "64", "--out", str(root / "run"),
    ]
    return root / "run", args


@pytest.mark.integration
def test_offsite_writes_the_table_report_and_every_step(run, capsys):
    run_dir, args = run
    code, stdout, _ = run_cli(args, capsys)
    assert code == 0, stdout
    table = json.loads((run_dir / "table.json").read_text())
    assert table["tasks"] == ["piqa"] and [row["name"] for row in table["rows"]] == ROWS
    for row in table["rows"]:
        assert 0.0 <= row["scores"]["piqa"] <= 1.0 and row["average"] == row["scores"]["piqa"]
    for name in ("table.md", "table.png", "report.html", "piqa/similarity/similarity.json",
                 "piqa/crash/plan.json", "piqa/crash-share/clusters.png", "piqa/uniform/seed1/adapter/adapter.json"):
        assert (run_dir / name).is_file(), name
    # The CRaSh strategies share one similarity and hence one plan; uniform keeps the bottom and top.
    crash = json.loads((run_dir / "piqa/crash/plan.json").read_text())
    shared = json.loads((run_dir / "piqa/crash-share/plan.json").read_text())
    uniform = json.loads((run_dir / "piqa/uniform/plan.json").read_text())
    assert crash["kept"] == shared["kept"] and len(crash["kept"]) == 4
    assert uniform["trainable"] == [0, 7]
    # The Plug-in rows are the full model with the adapter: the same layers the plan trains.
    adapter = json.loads((run_dir / "piqa/crash/seed1/adapter/adapter.json").read_text())
    assert adapter["sources"] == crash["trainable"]
    # --eval-every reaches every training run: a validation loss before training and after each step.
    assert adapter["training"]["config"]["eval_every"] == 1 and [p["step"] for p in adapter["validation_curve"]] == [0, 1, 2]
    assert "| Full ZS |" in (run_dir / "table.md").read_text()
    # Evaluation truncates as training did (--max-length 64), so selection and scores see the same tokens.
    for name in ("piqa/full_zs.json", "piqa/crash/seed1/plugin.json"):
        assert json.loads((run_dir / name).read_text())["config"]["max_length"] == 64
    assert json.loads((run_dir / "piqa/similarity/similarity.json").read_text())["split"] == "train"


@pytest.mark.integration
def test_offsite_rerun_skips_finished_steps_and_refuses_other_settings(run, capsys):
    run_dir, args = run
    if not (run_dir / "table.json").exists():  # the first test ran on another worker
        assert run_cli(args, capsys)[0] == 0
    before = (run_dir / "table.json").read_text()
    code, stdout, _ = run_cli(args, capsys)
    assert code == 0
    assert "skip" in stdout and "run  " not in stdout  # nothing recomputed
    assert json.loads((run_dir / "table.json").read_text())["rows"] == json.loads(before)["rows"]
    changed = [a if a != "16" else "32" for a in args]  # another --train-samples
    code, _, err = run_cli(changed, capsys)
    assert code == 2 and "other settings" in err and len(err.strip().splitlines()) == 1


@pytest.mark.integration
def test_same_seed_gives_an_identical_table_and_identical_weights(run, tmp_path, capsys):
    run_dir, args = run
    if not (run_dir / "table.json").exists():  # the first test ran on another worker
        assert run_cli(args, capsys)[0] == 0
    again = tmp_path / "again"
    assert args[-2] == "--out"
    code, stdout, _ = run_cli([*args[:-1], str(again)], capsys)
    assert code == 0 and "run  piqa: full fine-tuning, seed 1" in stdout  # a fresh run, not a copy
    assert json.loads((again / "table.json").read_text())["rows"] == json.loads((run_dir / "table.json").read_text())["rows"]
    for weights in ("uniform/seed1/adapter/adapter.safetensors", "crash-share/seed1/adapter/adapter.safetensors",
                    "full_ft/seed1/model/model.safetensors"):
        assert (again / "piqa" / weights).read_bytes() == (run_dir / "piqa" / weights).read_bytes(), weights


def test_table_gain_recovered_follows_the_paper_definition(tmp_path):
    config = OffsiteConfig(model="m", tasks=["piqa"], strategies=["uniform"], seeds=[1, 2])
    scores = {"full_zs.json": 0.5, "full_ft/seed1/eval.json": 0.7, "full_ft/seed2/eval.json": 0.7,
              "uniform/emu_zs.json": 0.3, "uniform/seed1/emu_ft.json": 0.55, "uniform/seed2/emu_ft.json": 0.65,
              "uniform/seed1/plugin.json": 0.6, "uniform/seed2/plugin.json": 0.6}
    for relative, acc in scores.items():
        path = tmp_path / "piqa" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"scores": {"piqa": {"acc": acc}}}))
    rows = {row["name"]: row for row in build_table(tmp_path, config)["rows"]}
    assert rows["Uniform, Plug-in"]["gain_recovered"] == pytest.approx(0.5)  # (0.6 - 0.5) / (0.7 - 0.5)
    assert rows["Uniform, Emu FT"]["scores"]["piqa"] == pytest.approx(0.6)
    assert rows["Uniform, Emu FT"]["spread"]["piqa"] == pytest.approx(0.0707, abs=1e-3)
    assert "gain_recovered" not in rows["Uniform, Emu FT"]
