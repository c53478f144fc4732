"""Each plug-in's gain over Full ZS per task, in points, and as a share of Full FT's mean gain.

The table's "gain recovered" is a mean of per-seed ratios, which a seed whose Full FT gained
almost nothing turns into noise (a 0.3-point denominator makes one item a 300 % swing). This
script reads a `crashlm offsite` run directory and prints, per task and on the average, each
row's gain in accuracy points (mean ± std over seeds) and the ratio of the mean gains
(plug-in / Full FT), whose ± is the plug-in gain's seed std over Full FT's mean gain:

    .venv/bin/python benchmarks/task_gains.py runs/offsite_gemma3_3seeds \
        --figure benchmarks/results/offsite_gemma3_fidelity_gain.png --column arc_easy

With ``--figure`` it also plots each plug-in's emulator KL (mean over the tasks' bundles) against
that ratio in one column (a task, or ``average``). ``--paired A,B --column T`` compares two rows
item by item on task T, per seed (``zs`` is Full ZS, a path is a directory of ``seed<S>/plugin.json``
as ``plan_transfer.sh`` writes, any other name a strategy run's plug-in): how
many items A answers right and B wrong and the reverse, with the two-sided sign test's p.
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path

from crashlm.core.errors import UsageError, usage_errors_exit
from crashlm.core.io import read_json
from crashlm.experiments.offsite_config import LR_CHOICE, OffsiteConfig, full_ft_dir, run_label
from crashlm.experiments.offsite_table import accuracy, bundle_records, item_correct
from crashlm.outputs.plotting import plot_fidelity_gain


def load_config(run_dir: Path) -> OffsiteConfig:
    return OffsiteConfig.from_dict(read_json(run_dir / "config.json", "run configuration"))


def task_gains(run_dir: Path, config: OffsiteConfig) -> tuple[list[str], dict[str, dict[str, list[float]]]]:
    """(tasks, {row: {task or "average": per-seed gain over Full ZS in points}}) for Full FT and each
    plug-in row that has every task and seed."""
    tasks, seeds = config.tasks, config.seeds
    if not all((run_dir / t / "full_zs.json").is_file() for t in tasks):
        return tasks, {}  # a run still on its first tasks: no row has every task yet
    zero_shot = {t: 100 * accuracy(run_dir / t / "full_zs.json", t) for t in tasks}
    paths = {}
    if config.full_ft and all((run_dir / t / "full_ft" / LR_CHOICE).is_file() for t in tasks):
        lrs = {t: read_json(run_dir / t / "full_ft" / LR_CHOICE, "learning-rate choice")["chosen"] for t in tasks}
        paths["Full FT"] = lambda t, s: full_ft_dir(run_dir, t, lrs[t], s) / "eval.json"
    for run in config.strategy_runs():
        paths[f"{run_label(run)}, Plug-in"] = lambda t, s, run=run: run_dir / t / run / f"seed{s}" / "plugin.json"
    gains = {}
    for row, path_of in paths.items():
        if not all(path_of(t, s).is_file() for t in tasks for s in seeds):
            continue  # a row the run has not finished
        per_task = {t: [100 * accuracy(path_of(t, s), t) - zero_shot[t] for s in seeds] for t in tasks}
        per_task["average"] = [statistics.fmean(per_task[t][i] for t in tasks) for i in range(len(seeds))]
        gains[row] = per_task
    return tasks, gains


def _points(values: list[float]) -> str:
    spread = f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else ""
    return f"{statistics.fmean(values):+.1f}{spread}"


def gains_markdown(tasks: list[str], gains: dict[str, dict[str, list[float]]]) -> str:
    columns = [*tasks, "average"]
    full = gains.get("Full FT")
    lines = ["| row | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for row, per_task in gains.items():
        cells = []
        for column in columns:
            cell = _points(per_task[column])
            denominator = statistics.fmean(full[column]) if full and row != "Full FT" else 0.0
            if denominator > 0:
                spread = statistics.stdev(per_task[column]) / denominator if len(per_task[column]) > 1 else None
                cell += f" ({round(100 * statistics.fmean(per_task[column]) / denominator):d}" + (
                    f" ± {100 * spread:.0f} %)" if spread is not None else " %)")
            cells.append(cell)
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def fidelity_points(run_dir: Path, config: OffsiteConfig, gains: dict[str, dict[str, list[float]]],
                    column: str) -> list[tuple]:
    """(label, mean KL, ratio of mean gains, its spread) in ``column`` for each plug-in row with fidelity."""
    if "Full FT" not in gains:
        raise UsageError("the fidelity figure needs the run's Full FT row (--full-ft)")
    full = statistics.fmean(gains["Full FT"][column])
    if full <= 0:
        return []  # no gain to recover in this column
    fidelity, points = bundle_records(run_dir, config, "fidelity"), []
    for run in config.strategy_runs():
        row, records = gains.get(f"{run_label(run)}, Plug-in"), fidelity.get(run, {})
        if row is None or len(records) < len(config.tasks):
            continue
        kl = statistics.fmean(record["kl"] for record in records.values())
        spread = statistics.stdev(row[column]) / full if len(row[column]) > 1 else None
        points.append((run_label(run), kl, statistics.fmean(row[column]) / full, spread))
    return points


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test of ``wins`` against ``losses`` (ties left out)."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def wins_losses(a: Path, b: Path, task: str) -> tuple[int, int]:
    """Items of ``task`` that evaluation ``a`` answers right and ``b`` wrong, and the reverse."""
    left, right = item_correct(a, task), item_correct(b, task)
    return (sum(1 for doc, acc in left.items() if acc > right[doc]),
            sum(1 for doc, acc in left.items() if acc < right[doc]))


def paired(run_dir: Path, config: OffsiteConfig, task: str, a: str, b: str) -> list[tuple[int, int, int, float]]:
    """(seed, items only ``a`` answers right, items only ``b`` does, sign-test p) for each seed."""
    if task not in config.tasks:
        raise UsageError(f"--paired needs --column to be one of the run's tasks, got {task!r}")
    for name in (a, b):
        if name != "zs" and "/" not in name and name not in config.strategy_runs():
            raise UsageError(f"--paired: {name!r} is neither 'zs', a directory nor one of the run's strategies")

    def path(name: str, seed: int) -> Path:
        if "/" in name:  # a directory of seed<S>/plugin.json, e.g. from plan_transfer.sh
            return Path(name) / f"seed{seed}" / "plugin.json"
        return run_dir / task / ("full_zs.json" if name == "zs" else f"{name}/seed{seed}/plugin.json")

    out = []
    for seed in config.seeds:
        if not (path(a, seed).is_file() and path(b, seed).is_file()):
            continue
        wins, losses = wins_losses(path(a, seed), path(b, seed), task)
        out.append((seed, wins, losses, sign_test(wins, losses)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--figure", type=Path, help="fidelity against the ratio of mean gains, as a PNG")
    parser.add_argument("--column", default="average", help="the task (or 'average') the figure's gain is taken on")
    parser.add_argument("--paired", help="A,B: two rows compared item by item on --column's task (zs = Full ZS)")
    args = parser.parse_args()
    with usage_errors_exit():
        config = load_config(args.run_dir)
        tasks, gains = task_gains(args.run_dir, config)
        if args.column not in [*tasks, "average"]:
            raise UsageError(f"--column {args.column!r} is not one of the run's tasks or 'average'")
        print(gains_markdown(tasks, gains), end="")
        if args.paired:
            a, _, b = args.paired.partition(",")
            for seed, wins, losses, p in paired(args.run_dir, config, args.column, a, b):
                print(f"{args.column}, seed {seed}: {a} right and {b} wrong on {wins} items, the reverse on "
                      f"{losses}; sign test p = {p:.3f}")
        if args.figure:
            plot_fidelity_gain(fidelity_points(args.run_dir, config, gains, args.column), args.figure,
                               f"Fidelity and transfer on {Path(config.model).name} ({args.column})")
            print(f"wrote {args.figure}")


if __name__ == "__main__":
    main()
