"""The benchmarks' per-task gain collector (benchmarks/task_gains.py) on a hand-made run directory."""

import subprocess
import sys
from pathlib import Path

import pytest

from crashlm.core.errors import UsageError
from crashlm.core.io import write_json
from crashlm.experiments.offsite import OffsiteConfig

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
from task_gains import fidelity_points, gains_markdown, load_config, task_gains  # noqa: E402


def _run_dir(root: Path) -> Path:
    config = OffsiteConfig(model="m", tasks=["piqa", "arc_easy"], strategies=["uniform", "greedy"], seeds=[1, 2])
    write_json(root / "config.json", config.to_dict())
    scores = {
        "piqa/full_zs.json": 0.50, "arc_easy/full_zs.json": 0.40,
        "piqa/full_ft/lr0.0001/seed1/eval.json": 0.60, "piqa/full_ft/lr0.0001/seed2/eval.json": 0.50,
        "arc_easy/full_ft/lr0.0001/seed1/eval.json": 0.50, "arc_easy/full_ft/lr0.0001/seed2/eval.json": 0.50,
        "piqa/uniform/seed1/plugin.json": 0.55, "piqa/uniform/seed2/plugin.json": 0.45,
        "arc_easy/uniform/seed1/plugin.json": 0.45, "arc_easy/uniform/seed2/plugin.json": 0.45,
        "piqa/greedy/seed1/plugin.json": 0.55,  # greedy unfinished: left out
    }
    for relative, acc in scores.items():
        task = relative.split("/")[0]
        write_json(root / relative, {"scores": {task: {"acc": acc}}})
    for task in ("piqa", "arc_easy"):
        write_json(root / task / "full_ft" / "lr.json", {"seed": 1, "chosen": 1e-4, "candidates": []})
    return root


def test_gains_are_points_over_zero_shot_and_a_ratio_of_mean_gains(tmp_path):
    run_dir = _run_dir(tmp_path)
    tasks, gains = task_gains(run_dir, load_config(run_dir))
    assert tasks == ["piqa", "arc_easy"] and list(gains) == ["Full FT", "Uniform, Plug-in"]
    assert gains["Full FT"]["piqa"] == pytest.approx([10.0, 0.0])
    assert gains["Uniform, Plug-in"]["average"] == pytest.approx([5.0, 0.0])
    text = gains_markdown(tasks, gains)
    # piqa: plug-in mean 0 of Full FT's 5; arc_easy 5 of 10: 50 %, seed std 0.
    assert "| Uniform, Plug-in | +0.0 ± 7.1 (0 ± 141 %) | +5.0 ± 0.0 (50 ± 0 %) | +2.5 ± 3.5 (33 ± 47 %) |" in text


def test_a_missing_run_is_one_line_and_exit_2(tmp_path):
    run = subprocess.run([sys.executable, str(BENCHMARKS / "task_gains.py"), str(tmp_path / "none")],
                         capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.startswith("error: run configuration not found")
    assert len(run.stderr.strip().splitlines()) == 1


def test_fidelity_points_pair_each_plug_in_with_its_emulators_mean_kl(tmp_path):
    run_dir = _run_dir(tmp_path)
    for task, kl in (("piqa", 1.0), ("arc_easy", 2.0)):
        write_json(run_dir / task / "uniform" / "emulator" / "crashlm.json", {"fidelity": {"kl": kl}})
    config = load_config(run_dir)
    tasks, gains = task_gains(run_dir, config)
    ((label, kl, ratio, spread),) = fidelity_points(run_dir, config, gains, "arc_easy")
    assert (label, kl, ratio, spread) == ("Uniform", 1.5, 0.5, 0.0)
    run = subprocess.run([sys.executable, str(BENCHMARKS / "task_gains.py"), str(run_dir), "--figure",
                          str(tmp_path / "f.png"), "--column", "average"], capture_output=True, text=True)
    assert run.returncode == 0 and (tmp_path / "f.png").is_file()


def test_gradient_agreement_refuses_a_task_the_run_does_not_have_in_one_line(tmp_path):
    run_dir = _run_dir(tmp_path)
    result = subprocess.run([sys.executable, str(BENCHMARKS / "gradient_agreement.py"), str(run_dir),
                             "--task", "openbookqa"], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {run_dir} has no task 'openbookqa' (its tasks: piqa, arc_easy)"]


def test_gradient_agreement_table_orders_emulators_by_cosine():
    from gradient_agreement import markdown

    rows = [{"label": "A", "cosine": 0.5, "per_layer": {"0": 0.4}, "kl": 1.0, "gain_ratio": 0.1},
            {"label": "B", "cosine": 0.8, "per_layer": {"0": 0.9}, "kl": None, "gain_ratio": None}]
    lines = markdown(rows).splitlines()
    assert lines[2] == "| B | 0.800 | 0: 0.90 |  |  |" and lines[3] == "| A | 0.500 | 0: 0.40 | 1.00 | 10 % |"


def test_sign_test_is_the_exact_two_sided_binomial():
    from task_gains import sign_test

    assert sign_test(0, 0) == 1.0 and sign_test(3, 3) == 1.0
    assert sign_test(15, 5) == pytest.approx(0.04139, abs=1e-4) and sign_test(5, 15) == sign_test(15, 5)
    assert sign_test(5, 0) == pytest.approx(2 / 32)


def test_paired_counts_items_each_row_alone_answers(tmp_path):
    from task_gains import paired

    run_dir = _run_dir(tmp_path)
    items = {"zs": [1, 1, 0, 0], "uniform": [1, 0, 1, 1]}
    for seed in (1, 2):
        for name, accs in items.items():
            path = run_dir / "piqa" / ("full_zs.json" if name == "zs" else f"{name}/seed{seed}/plugin.json")
            write_json(path, {"scores": {"piqa": {"acc": 0.5}},
                              "items": {"piqa": [{"doc_id": i, "acc": a} for i, a in enumerate(accs)]}})
    config = load_config(run_dir)
    assert paired(run_dir, config, "piqa", "uniform", "zs") == [(1, 2, 1, 1.0), (2, 2, 1, 1.0)]
    with pytest.raises(UsageError, match="neither 'zs', a directory"):
        paired(run_dir, config, "piqa", "crash", "zs")


def test_a_run_still_on_its_first_tasks_has_no_complete_row(tmp_path):
    run_dir = _run_dir(tmp_path)
    (run_dir / "arc_easy" / "full_ft" / "lr.json").unlink()
    assert list(task_gains(run_dir, load_config(run_dir))[1]) == ["Uniform, Plug-in"]
    (run_dir / "arc_easy" / "full_zs.json").unlink()
    assert task_gains(run_dir, load_config(run_dir))[1] == {}


def _eval(path: Path, task: str, correct: list[int]) -> Path:
    items = [{"doc_id": i, "acc": float(c)} for i, c in enumerate(correct)]
    return write_json(path, {"scores": {task: {"acc": sum(correct) / len(correct)}}, "items": {task: items}})


def test_fresh_items_summary_gains_shares_and_sign_tests_against_the_first_row(tmp_path):
    from fresh_items import FT, ZS, fidelity_points, markdown, summary

    task = "arc_easy"
    results = {
        ZS: {0: _eval(tmp_path / "zs.json", task, [1, 0, 0, 0])},
        FT: {1: _eval(tmp_path / "ft1.json", task, [1, 1, 1, 0]), 2: _eval(tmp_path / "ft2.json", task, [1, 1, 1, 1])},
        "greedy": {1: _eval(tmp_path / "g1.json", task, [1, 1, 0, 0]), 2: _eval(tmp_path / "g2.json", task, [1, 1, 1, 0])},
        "uniform": {1: _eval(tmp_path / "u1.json", task, [0, 0, 0, 1]), 2: _eval(tmp_path / "u2.json", task, [1, 0, 0, 0])},
    }
    table = summary(results, task)
    assert table["zero_shot"] == 25.0 and table["first"] == "greedy"
    assert table["rows"][FT]["gain"] == [50.0, 75.0] and "share" not in table["rows"][FT]
    assert table["rows"]["greedy"]["share"] == pytest.approx(37.5 / 62.5)
    # uniform against greedy: seed 1 right on item 3 only, wrong on 0 and 1; seed 2 wrong on 1 and 2.
    assert table["rows"]["uniform"]["against_first"] == {1: [1, 2, 1.0], 2: [0, 2, 0.5]}
    assert "against_first" not in table["rows"]["greedy"]
    assert "| uniform |  | 25.0 / 25.0 | +0.0 ± 0.0 | 0 % | 1-2 (p = 1.000), 0-2 (p = 0.500) |" in markdown(table)
    assert "spearman_kl_gain" not in table
    results["drop-last"] = {1: _eval(tmp_path / "d1.json", task, [0, 0, 0, 0]), 2: results["uniform"][2]}
    table = summary(results, task, {"greedy": 0.5, "uniform": 1.0, "drop-last": 9.0, FT: None})
    assert table["rows"]["greedy"]["kl"] == 0.5 and "kl" not in table["rows"][FT]
    assert table["spearman_kl_gain"] == pytest.approx(-1.0)  # gains 37.5, 0, -12.5: farther, less
    assert "| greedy | 0.50 |" in markdown(table)
    table["labels"] = {row: row.title() for row in table["rows"]}
    points = {label: (kl, share, spread) for label, kl, share, spread in fidelity_points(table)}
    assert set(points) == {"Greedy", "Uniform", "Drop-Last"}  # Full FT has no emulator
    assert points["Greedy"] == pytest.approx((0.5, 0.6, 17.68 / 62.5), abs=1e-3)


def test_ranks_share_ties_and_spearman_is_pearson_of_ranks():
    from fresh_items import ranks, spearman

    assert ranks([3.0, 1.0, 3.0, 2.0]) == [3.5, 1.0, 3.5, 2.0]
    assert spearman([1, 2, 3, 4], [10, 40, 20, 30]) == pytest.approx(0.4)


def test_fresh_items_refuses_a_row_the_run_does_not_have_in_one_line(tmp_path):
    run_dir = _run_dir(tmp_path)
    result = subprocess.run([sys.executable, str(BENCHMARKS / "fresh_items.py"), str(run_dir), "--task", "arc_easy",
                             "--split", "validation", "--rows", "angular"], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: row 'angular' is neither a directory nor one of the run's strategies"]
    result = subprocess.run([sys.executable, str(BENCHMARKS / "fresh_items.py"), str(run_dir), "--task", "arc_easy",
                             "--split", "dev", "--rows", "uniform"], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.startswith("error: arc_easy has no split 'dev'")
