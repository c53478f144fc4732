"""The whole offsite-tuning table from one command, on a tiny random model and real PIQA items."""

from __future__ import annotations

import io
import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
from rich.console import Console

import crashlm.experiments.offsite as offsite
from crashlm.core.errors import UsageError
from crashlm.core.io import write_json
from crashlm.emulators.bundle import read_manifest
from crashlm.experiments.offsite import OffsiteConfig, Pipeline, build_table, write_table
from crashlm.experiments.offsite_config import run_label
from crashlm.outputs.tables import gain_recovered, table_markdown, table_note
from crashlm.training.checkpoint import checkpoint_dir
from crashlm.training.config import TrainConfig
from crashlm.training.full import TRAINING_META
from tests.cli import run_cli
from tests.conftest import interrupt_distillation
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
        "--similarity-samples", "8", "--full-ft-lrs", "1e-4,1e-3", "--train-samples", "16", "--val-samples", "8",
        "--max-steps", "2",
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
    # Full fine-tuning's learning rate: each candidate trained on the first seed, the lowest validation loss kept.
    choice = json.loads((run_dir / "piqa/full_ft/lr.json").read_text())
    assert [c["lr"] for c in choice["candidates"]] == [1e-4, 1e-3]
    assert choice["chosen"] == min(choice["candidates"], key=lambda c: c["best_val_loss"])["lr"]
    assert table["full_ft_lr"]["piqa"] == choice and (run_dir / "piqa/training_curves.png").is_file()
    # Every bundle records its fidelity to the full model, and the table collects it.
    assert set(table["fidelity"]) == {"uniform", "crash", "crash-share"} and table["fidelity"]["crash"]["piqa"]["kl"] >= 0
    # Measured once per distinct emulator (crash and crash-share share a plan, not a sharing mode).
    assert len(list((run_dir / "fidelity").glob("*.json"))) == 3
    # ... all three in one pass of the full model over the held-out text.
    assert stdout.count("run  piqa: fidelity of every emulator") == 1
    bundle = json.loads((run_dir / "piqa/uniform/emulator/crashlm.json").read_text())
    assert bundle["fidelity"] == table["fidelity"]["uniform"]["piqa"]


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
    assert code == 0 and "run  piqa: full fine-tuning, lr 0.0001, seed 1" in stdout  # a fresh run, not a copy
    assert json.loads((again / "table.json").read_text())["rows"] == json.loads((run_dir / "table.json").read_text())["rows"]
    lr = json.loads((run_dir / "piqa/full_ft/lr.json").read_text())["chosen"]
    for weights in ("uniform/seed1/adapter/adapter.safetensors", "crash-share/seed1/adapter/adapter.safetensors",
                    f"full_ft/lr{lr:g}/seed1/model/model.safetensors"):
        assert (again / "piqa" / weights).read_bytes() == (run_dir / "piqa" / weights).read_bytes(), weights




def _write_scores(root: Path, scores: dict[str, float]) -> None:
    for relative, acc in scores.items():
        write_json(root / "piqa" / relative, {"scores": {"piqa": {"acc": acc}}})


def test_table_gain_recovered_is_a_mean_over_seeds_with_its_std(tmp_path):
    config = OffsiteConfig(model="m", tasks=["piqa"], strategies=["uniform"], seeds=[1, 2])
    write_json(tmp_path / "piqa/full_ft/lr.json", {"seed": 1, "chosen": 1e-4, "candidates": [
        {"lr": 1e-4, "best_val_loss": 1.0}, {"lr": 1e-3, "best_val_loss": 2.0}]})
    _write_scores(tmp_path, {
        "full_zs.json": 0.5, "full_ft/lr0.0001/seed1/eval.json": 0.7, "full_ft/lr0.0001/seed2/eval.json": 0.75,
        "full_ft/lr0.001/seed1/eval.json": 0.1,  # a candidate not chosen: not in the table
        "uniform/emu_zs.json": 0.3, "uniform/seed1/emu_ft.json": 0.55, "uniform/seed2/emu_ft.json": 0.65,
        "uniform/seed1/plugin.json": 0.6, "uniform/seed2/plugin.json": 0.65})
    write_json(tmp_path / "piqa/uniform/emulator/crashlm.json", {"fidelity": {"kl": 0.8, "top1": 0.4}})
    table = build_table(tmp_path, config)
    assert table["fidelity"] == {"uniform": {"piqa": {"kl": 0.8, "top1": 0.4}}}
    write_table(tmp_path, table, config)
    assert (tmp_path / "fidelity.png").is_file() and (tmp_path / "table.md").is_file()
    rows = {row["name"]: row for row in table["rows"]}
    assert rows["Full FT"]["scores"]["piqa"] == pytest.approx(0.725) and rows["Full FT"]["lr"] == {"piqa": 1e-4}
    plugin = rows["Uniform, Plug-in"]
    # Per seed (0.6 - 0.5) / (0.7 - 0.5) = 0.5 and (0.65 - 0.5) / (0.75 - 0.5) = 0.6.
    assert plugin["gain_recovered"] == pytest.approx(0.55)
    assert plugin["gain_recovered_std"] == pytest.approx(0.0707, abs=1e-4) and plugin["gain_recovered_seeds"] == 2
    assert rows["Uniform, Emu FT"]["spread"]["piqa"] == pytest.approx(0.0707, abs=1e-3)
    assert "gain_recovered" not in rows["Uniform, Emu FT"]
    text = table_markdown(table)
    assert "55 ± 7 % (2 seeds)" in text and "piqa 0.0001 (0.0001: 1.0000, 0.001: 2.0000)" in text


def test_table_gives_the_gain_recovered_over_item_resamples_when_items_are_recorded(tmp_path):
    config = OffsiteConfig(model="m", tasks=["piqa"], strategies=["uniform"], seeds=[1, 2])
    write_json(tmp_path / "piqa/full_ft/lr.json", {"seed": 1, "chosen": 1e-4, "candidates": []})

    def result(relative: str, correct: list[int]) -> None:
        items = [{"doc_id": i, "acc": float(c)} for i, c in enumerate(correct)]
        write_json(tmp_path / "piqa" / relative, {"scores": {"piqa": {"acc": sum(correct) / len(correct)}},
                                                  "items": {"piqa": items}})

    result("full_zs.json", [1, 0, 0, 0] * 10)
    for seed in (1, 2):
        result(f"full_ft/lr0.0001/seed{seed}/eval.json", [1, 1, 1, 0] * 10)
        result(f"uniform/seed{seed}/plugin.json", [1, 1, 0, 0] * 10)
    plugin = {row["name"]: row for row in build_table(tmp_path, config)["rows"]}["Uniform, Plug-in"]
    low, high = plugin["gain_recovered_items"]
    assert plugin["gain_recovered"] == pytest.approx(0.5) and low < 0.5 < high
    assert f"50 ± 0 % (2 seeds); items {100 * low:.0f} to {100 * high:.0f} %" in table_markdown(
        build_table(tmp_path, config))
    result("uniform/seed2/plugin.json", [1, 1, 0, 0] * 9)  # other items: no interval, the seeds' gain stays
    plugin = {row["name"]: row for row in build_table(tmp_path, config)["rows"]}["Uniform, Plug-in"]
    assert "gain_recovered_items" not in plugin and "gain_recovered" in plugin


def test_gain_recovered_needs_both_rows_of_a_seed_and_averages_tasks_first():
    zero_shot = {"piqa": {0: 0.5}, "arc_easy": {0: 0.3}}
    full_ft = {"piqa": {1: 0.7, 2: 0.7}, "arc_easy": {1: 0.5, 2: 0.5}}
    plugin = {"piqa": {1: 0.6, 2: 0.6, 3: 0.9}, "arc_easy": {1: 0.3, 3: 0.9}}  # seed 2 lacks arc_easy, 3 Full FT
    # Seed 1 only: (0.45 - 0.4) / (0.6 - 0.4).
    assert gain_recovered(zero_shot, full_ft, plugin) == {
        "gain_recovered": pytest.approx(0.25), "gain_recovered_std": None, "gain_recovered_seeds": 1}
    assert gain_recovered({"piqa": {}}, full_ft, plugin) == {}


def test_no_gain_is_recovered_when_full_finetuning_gains_nothing():
    zero_shot = {"piqa": {0: 0.69}, "arc_easy": {0: 0.50}}
    worse = {"piqa": {1: 0.66, 2: 0.70}, "arc_easy": {1: 0.49, 2: 0.55}}  # seed 1 below Full ZS, seed 2 above
    plugin = {"piqa": {1: 0.64, 2: 0.70}, "arc_easy": {1: 0.44, 2: 0.50}}
    assert gain_recovered(zero_shot, worse, plugin)["gain_recovered_seeds"] == 1
    assert gain_recovered(zero_shot, {t: {1: v[1]} for t, v in worse.items()}, plugin) == {}
    rows = [{"name": "Full ZS", "average": 0.595}, {"name": "Full FT", "average": 0.575}]
    note = table_note({"tasks": ["piqa", "arc_easy"], "model": "m", "seeds": [1], "rows": rows})
    assert "Full FT (57.5) does not beat Full ZS (59.5)" in note
    rows[1]["average"] = 0.6
    assert "does not beat" not in table_note({"tasks": ["piqa"], "model": "m", "seeds": [1], "rows": rows})


def test_offsite_refuses_boolq_whose_paragraphs_are_the_calibration_text(tmp_path, capsys):
    with pytest.raises(UsageError, match="calibration text"):
        OffsiteConfig(model="m", tasks=["piqa", "boolq"]).validate()
    code, _, err = run_cli(["offsite", "--tasks", "boolq", "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and "task boolq cannot be a downstream task" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_kd_rows_for_every_strategy_or_the_ones_named(tiny_llama_dir):
    config = OffsiteConfig(model=str(tiny_llama_dir), tasks=["piqa"], strategies=["uniform", "greedy-share", "drop-last"],
                           distill=True)
    assert config.strategy_runs() == ["uniform", "greedy-share", "drop-last", "uniform-kd", "greedy-share-kd",
                                      "drop-last-kd"]
    config = replace(config, distill_strategies=["drop-last"])
    assert config.strategy_runs()[3:] == ["drop-last-kd"]
    assert [run_label(r) for r in config.strategy_runs()] == ["Uniform", "Greedy (SLEB) + sharing", "Drop last",
                                                                "Drop last + KD"]
    with pytest.raises(UsageError, match="among the strategies; crash is not"):
        replace(config, distill_strategies=["crash"]).validate()


def test_full_ft_learning_rate_is_chosen_on_validation_loss(tmp_path, tiny_llama_dir, monkeypatch):
    """The first seed trains once per rate; the lowest best validation loss sets every seed's rate."""
    losses, trained = {1e-4: 2.0, 1e-3: 1.5, 1e-2: 3.0}, []

    def fake_train_full(model, tokenizer, config, out, resume):
        trained.append((config.lr, config.seed))
        curve = [{"step": 0, "val_loss": 4.0}, {"step": 1, "val_loss": losses[config.lr]}]
        write_json(Path(out) / TRAINING_META, {"training": {"best_val_loss": losses[config.lr]},
                                               "validation_curve": curve})

    def fake_evaluate(self, out, task, **target):
        write_json(out, {"scores": {task: {"acc": 0.5 if target["model"] == str(tiny_llama_dir) else 0.7}}})

    monkeypatch.setattr(offsite, "train_full", fake_train_full)
    monkeypatch.setattr(offsite, "load_model", lambda name: (None, None))
    monkeypatch.setattr(Pipeline, "_evaluate", fake_evaluate)
    config = OffsiteConfig(model=str(tiny_llama_dir), tasks=["piqa"], strategies=[], seeds=[3, 4],
                           full_ft_lrs=[1e-4, 1e-3, 1e-2], train=TrainConfig(train_samples=8, val_samples=4))
    run_dir = tmp_path / "run"
    table = Pipeline(config, run_dir, Console(file=io.StringIO())).run()
    assert trained == [(1e-4, 3), (1e-3, 3), (1e-2, 3), (1e-3, 4)]
    choice = json.loads((run_dir / "piqa/full_ft/lr.json").read_text())
    assert choice["chosen"] == 1e-3 and choice["seed"] == 3
    assert [c["best_val_loss"] for c in choice["candidates"]] == [2.0, 1.5, 3.0]
    full_ft = next(row for row in table["rows"] if row["name"] == "Full FT")
    assert full_ft["lr"] == {"piqa": 1e-3} and full_ft["runs"] == {"piqa": 2}
    assert sorted(p.parent.name for p in (run_dir / "piqa/full_ft").glob("*/*/eval.json")) == ["seed3", "seed4"]
    assert all("lr0.001" in str(p) for p in (run_dir / "piqa/full_ft").glob("*/*/eval.json"))
    Pipeline(config, run_dir, Console(file=io.StringIO())).run()  # a re-run trains nothing again
    assert len(trained) == 4


def test_adapter_learning_rate_is_chosen_per_task_and_emulator_on_validation_loss(tmp_path, tiny_llama_dir, monkeypatch):
    """--adapter-lrs: the first seed trains once per rate on each emulator, its best rate trains the other
    seeds, and the first seed's adapter is the grid's (not trained twice)."""
    losses = {("uniform", 1e-4): 2.0, ("uniform", 1e-3): 1.5, ("drop-last", 1e-4): 1.0, ("drop-last", 1e-3): 3.0}
    trained = []

    def fake_build(self, task, strategy, bundle):
        write_json(bundle / "crashlm.json", {"strategy": strategy})

    def fake_train_adapter(emulator, config, out, resume):
        strategy = Path(out).parts[-4] if "lr_grid" in Path(out).parts else Path(out).parts[-3]
        trained.append((strategy, config.lr, config.seed))
        write_json(Path(out) / "adapter.json", {"training": {"best_val_loss": losses[strategy, config.lr]},
                                                "validation_curve": []})

    def fake_evaluate(self, out, task, **target):
        write_json(out, {"scores": {task: {"acc": 0.5}}})

    monkeypatch.setattr(offsite, "train_adapter", fake_train_adapter)
    monkeypatch.setattr(offsite, "load_emulator", lambda path: None)
    monkeypatch.setattr(Pipeline, "_build", fake_build)
    monkeypatch.setattr(Pipeline, "_evaluate", fake_evaluate)
    config = OffsiteConfig(model=str(tiny_llama_dir), tasks=["piqa"], strategies=["uniform", "drop-last"], k=4, trainable=2,
                           full_ft=False, seeds=[3, 4], adapter_lrs=[1e-4, 1e-3],
                           train=TrainConfig(train_samples=8, val_samples=4, lr=5e-5))
    run_dir = tmp_path / "run"
    table = Pipeline(config, run_dir, Console(file=io.StringIO())).run()
    assert trained == [("uniform", 1e-4, 3), ("uniform", 1e-3, 3), ("uniform", 1e-3, 4),
                       ("drop-last", 1e-4, 3), ("drop-last", 1e-3, 3), ("drop-last", 1e-4, 4)]
    choice = json.loads((run_dir / "piqa/uniform/lr.json").read_text())
    assert choice["chosen"] == 1e-3 and choice["seed"] == 3 and table["adapter_lr"]["uniform"]["piqa"] == choice
    assert table["adapter_lr"]["drop-last"]["piqa"]["chosen"] == 1e-4
    assert (run_dir / "piqa/uniform/seed3/adapter/adapter.json").read_bytes() == \
        (run_dir / "piqa/uniform/lr_grid/lr0.001/adapter/adapter.json").read_bytes()
    assert "uniform piqa 0.001; drop-last piqa 0.0001" in table_note(table)
    Pipeline(config, run_dir, Console(file=io.StringIO())).run()  # a re-run trains nothing again
    assert len(trained) == 6
    with pytest.raises(UsageError, match="adapter-lrs"):
        replace(config, adapter_lrs=[1e-4, 1e-4]).validate()


@pytest.mark.integration
def test_distill_adds_a_kd_row_per_strategy_and_distils_each_emulator_once(tmp_path, capsys, monkeypatch):
    model = save_tiny("llama", tmp_path / "tiny-llama", num_layers=8, max_position_embeddings=1024)
    run_dir = tmp_path / "run"
    args = ["offsite", "--model", str(model), "--tasks", "piqa,arc_easy", "--strategies", "uniform,crash",
            "--distill", "--distill-steps", "2", "--no-full-ft", "--k", "4", "--trainable", "2",
            "--similarity-samples", "8", "--train-samples", "8", "--val-samples", "4", "--max-steps", "1",
            "--batch-size", "4", "--eval-limit", "4", "--max-length", "64", "--out", str(run_dir)]
    # Interrupted (Ctrl-C) during the first distillation, after its first checkpoint.
    interrupt_distillation(monkeypatch, 2)
    assert run_cli(args, capsys)[0] == 130
    partial = [path for path in (run_dir / "distilled").iterdir() if path.name.endswith(".partial")]
    assert len(partial) == 1 and (partial[0] / "latest.json").is_file()
    monkeypatch.undo()

    code, stdout, err = run_cli(args, capsys)
    assert code == 0, err
    table = json.loads((run_dir / "table.json").read_text())
    names = [row["name"] for row in table["rows"]]
    for label in ("Uniform", "CRaSh w/o sharing", "OFT + KD", "CRaSh w/o sharing + KD"):
        assert f"{label}, Plug-in" in names and f"{label}, Emu ZS" in names
    assert names.index("CRaSh w/o sharing, Plug-in") < names.index("OFT + KD, Emu ZS")
    # The uniform emulator is the same on both tasks: distilled once, its bundle linked into each task.
    assert stdout.count("run  distillation of the uniform emulator") == 1
    assert not any(path.name.endswith(".partial") for path in (run_dir / "distilled").iterdir())
    keys = {task: offsite.emulator_key(read_manifest(run_dir / task / "uniform-kd/emulator").spec)
            for task in ("piqa", "arc_easy")}
    assert keys["piqa"] == keys["arc_easy"] and not checkpoint_dir(run_dir / "distilled" / keys["piqa"]).exists()
    shared = run_dir / "distilled" / keys["piqa"]
    for task in ("piqa", "arc_easy"):
        assert os.path.samefile(run_dir / task / "uniform-kd/emulator/model.safetensors", shared / "model.safetensors")
    record = json.loads((shared / "crashlm.json").read_text())["distillation"]
    assert record["chosen_step"] in (1, 2) and [p["step"] for p in record["validation_curve"]] == [0, 2]
    assert record["val_texts"] == 64 and table["distillation"]["uniform-kd"]["piqa"]["chosen_step"] == record["chosen_step"]
    # One distillation per distinct emulator: uniform once, crash once per distinct task plan.
    crash = {offsite.emulator_key(read_manifest(run_dir / t / "crash-kd/emulator").spec) for t in ("piqa", "arc_easy")}
    assert sorted(path.name for path in (run_dir / "distilled").iterdir()) == sorted({keys["piqa"], *crash})


@pytest.mark.integration
def test_k_auto_plans_each_strategy_on_calibration_loss(tmp_path, tiny_llama_dir, capsys):
    """``--k auto`` reaches the plans: each one is the strategy's own plan_for(..., "auto"), recorded in the table."""
    config = OffsiteConfig(model=str(tiny_llama_dir), tasks=["piqa"], strategies=["uniform", "drop-last"], k="auto",
                           max_loss_increase=0.5, trainable=1, calibration_samples=4)
    config.validate()
    pipeline = Pipeline(config, tmp_path / "run", Console(file=io.StringIO()))
    model, tokenizer = offsite.load_model(str(tiny_llama_dir))
    for strategy in config.strategies:
        plan = pipeline.plan("piqa", strategy, model, tokenizer)
        expected = offsite.plan_for(model, strategy, k="auto", trainable=1, max_loss_increase=0.5,
                                    scores=pipeline._removal_scores(model, tokenizer), tokenizer=tokenizer)
        assert plan.k == expected.k and plan.kept == expected.kept
        assert plan.scores["k"]["rule"] == "auto" and plan.scores["k"]["max_loss_increase"] == 0.5
    table = build_table(tmp_path / "run", config)
    assert table["kept_layers"] == {s: {"piqa": pipeline.plan("piqa", s).k} for s in config.strategies}
    assert f"Kept layers K: uniform {table['kept_layers']['uniform']['piqa']}" in table_markdown(table)

    with pytest.raises(UsageError, match="positive integer or 'auto', got 'half'"):
        replace(config, k="half").validate()
    code, _, err = run_cli(["offsite", "--model", str(tiny_llama_dir), "--k", "half", "--out", str(tmp_path / "x")],
                           capsys)
    assert code == 2 and "'auto', got 'half'" in err and len(err.strip().splitlines()) == 1


def test_a_run_made_before_a_setting_existed_continues_with_its_default(tmp_path, tiny_llama_dir):
    config = OffsiteConfig(model=str(tiny_llama_dir), tasks=["piqa"], strategies=[], full_ft=True)
    run_dir = tmp_path / "run"
    old = config.to_dict()
    del old["max_loss_increase"]
    write_json(run_dir / "config.json", old)
    offsite._check_run_dir(run_dir, config)  # accepted: the run had the default
    write_json(run_dir / "config.json", old)
    with pytest.raises(UsageError, match="max_loss_increase"):
        offsite._check_run_dir(run_dir, replace(config, max_loss_increase=0.5))
