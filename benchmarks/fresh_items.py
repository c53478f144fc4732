"""A run's rows again, on items that none of its numbers came from.

An offsite table reads one split's first items (``--eval-limit``), and every comparison made after
looking at it (a plan written by hand, a hypothesis about which plans transfer) is measured on the
same items. This script evaluates Full ZS, Full FT and the plug-in of each named row, per seed, on
another split (or more items) of one task, then prints each row's emulator KL, accuracy, gain over
Full ZS, share of Full FT's gain and an item-by-item sign test against the first row, and the rank
correlation of KL and gain; ``--figure`` plots KL against the share:

    .venv/bin/python benchmarks/fresh_items.py runs/smollm2_k25_all --task arc_easy --split validation \\
        --limit 300 --rows greedy,block-influence,runs/plan_transfer/block_12_16 \\
        --out benchmarks/results/fresh_items_smollm2_k25_arc.json --figure fresh.png

A row is a strategy run of RUN_DIR (its ``<task>/<run>/seed<S>/adapter``) or a directory of
``seed<S>/adapter`` as ``plan_transfer.sh`` writes. Each evaluation is kept under
``RUN_DIR/fresh_items/<task>-<split>-<limit>/`` and reused, so a killed run continues.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from task_gains import load_config, sign_test, wins_losses

from crashlm.core.errors import UsageError, usage_errors_exit
from crashlm.core.io import read_json, write_json
from crashlm.core.tasks import get_task
from crashlm.emulators.bundle import MANIFEST, read_records
from crashlm.emulators.targets import resolve_target
from crashlm.evaluation.run import evaluate
from crashlm.experiments.offsite_config import LR_CHOICE, OffsiteConfig, full_ft_dir, run_label
from crashlm.experiments.offsite_table import accuracy
from crashlm.outputs.plotting import plot_fidelity_gain

ZS, FT = "Full ZS", "Full FT"


def row_dir(run_dir: Path, task: str, row: str) -> Path:
    """A row's directory: a plan_transfer.sh directory as given, else the strategy run's in RUN_DIR."""
    return Path(row) if "/" in row else run_dir / task / row


def targets(run_dir: Path, config: OffsiteConfig, task: str, rows: list[str]) -> dict[str, dict[int, dict]]:
    """``{row: {seed: resolve_target arguments}}`` for Full ZS (seed 0), Full FT and each row."""
    model, seeds = config.model, config.seeds
    if task not in config.tasks:
        raise UsageError(f"{run_dir} has no task {task!r} (its tasks: {', '.join(config.tasks)})")
    found: dict[str, dict[int, dict]] = {ZS: {0: {"model": model}}}
    choice = run_dir / task / "full_ft" / LR_CHOICE
    if choice.is_file():
        lr = read_json(choice, "learning-rate choice")["chosen"]
        found[FT] = {s: {"model": str(full_ft_dir(run_dir, task, lr, s) / "model")} for s in seeds}
    for row in rows:
        if "/" not in row and row not in config.strategy_runs():
            raise UsageError(f"row {row!r} is neither a directory nor one of the run's strategies")
        found[row] = {s: {"model": model, "adapter": str(row_dir(run_dir, task, row) / f"seed{s}" / "adapter")}
                      for s in seeds}
    for row, by_seed in found.items():
        for target in by_seed.values():
            path = Path(target.get("adapter") or target["model"])
            if row != ZS and not path.exists():
                raise UsageError(f"{row}: {path} does not exist")
    return found


def evaluate_rows(found: dict[str, dict[int, dict]], task: str, split: str, limit: int, work: Path,
                  max_length: int) -> dict[str, dict[int, Path]]:
    """Each target's evaluation result, evaluated once and kept under ``work``."""
    results: dict[str, dict[int, Path]] = {}
    for row, by_seed in found.items():
        for seed, target in by_seed.items():
            out = work / row.replace("/", "_").replace(" ", "_") / f"seed{seed}.json"
            if not out.is_file():
                print(f"evaluating {row}, seed {seed} on {task} {split} ({limit} items)", flush=True)
                loaded = resolve_target(**target)
                evaluate(loaded.model, loaded.tokenizer, [task], limit=limit, split=split, batch_size=16,
                         description=loaded.description, max_length=max_length).save(out)
            results.setdefault(row, {})[seed] = out
    return results


def emulator_kl(run_dir: Path, task: str, row: str) -> float | None:
    """The KL to the full model recorded in the row's emulator bundle, if it has one."""
    bundle = row_dir(run_dir, task, row) / "emulator"
    return read_records(bundle).get("fidelity", {}).get("kl") if (bundle / MANIFEST).is_file() else None


def ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation: Pearson's of the ranks."""
    return statistics.correlation(ranks(x), ranks(y))


def summary(results: dict[str, dict[int, Path]], task: str, kl: dict[str, float | None] | None = None) -> dict:
    """Accuracy per seed, gain over Full ZS, share of Full FT's mean gain, and each row against the
    first plug-in row item by item (items it answers right and the first row wrong, the reverse, p).
    With the rows' emulator ``kl``: the rank correlation of KL and mean gain over the rows that have one."""
    (zs_path,) = results[ZS].values()
    zero_shot = 100 * accuracy(zs_path, task)
    rows: dict[str, dict] = {}
    for row, by_seed in results.items():
        if row == ZS:
            continue
        acc = {seed: 100 * accuracy(path, task) for seed, path in by_seed.items()}
        rows[row] = {"acc": acc, "gain": [a - zero_shot for a in acc.values()]}
    full = statistics.fmean(rows[FT]["gain"]) if FT in rows else None
    plug_ins = [row for row in rows if row != FT]
    first = plug_ins[0] if plug_ins else None
    for row, record in rows.items():
        if full and full > 0 and row != FT:
            record["share"] = statistics.fmean(record["gain"]) / full
        if first and row not in (FT, first):
            record["against_first"] = {}
            for seed, path in results[row].items():
                wins, losses = wins_losses(path, results[first][seed], task)
                record["against_first"][seed] = [wins, losses, sign_test(wins, losses)]
    table = {"zero_shot": zero_shot, "first": first, "rows": rows}
    known = [row for row in plug_ins if (kl or {}).get(row) is not None]
    for row in known:
        rows[row]["kl"] = kl[row]
    if len(known) > 2:
        table["spearman_kl_gain"] = spearman([kl[row] for row in known],
                                             [statistics.fmean(rows[row]["gain"]) for row in known])
    return table


def fidelity_points(table: dict) -> list[tuple[str, float, float, float | None]]:
    """(label, KL, share of Full FT's mean gain, the gain's seed std over it) of each row with both."""
    full = statistics.fmean(table["rows"][FT]["gain"]) if FT in table["rows"] else 0.0
    return [(table["labels"][row], record["kl"], record["share"],
             statistics.stdev(record["gain"]) / full if len(record["gain"]) > 1 else None)
            for row, record in table["rows"].items() if "kl" in record and "share" in record]


def markdown(table: dict) -> str:
    lines = [f"Full ZS: {table['zero_shot']:.1f}", "",
             f"| row | KL | accuracy per seed | gain over Full ZS | share of Full FT's gain | against {table['first']} |",
             "|---|---|---|---|---|---|"]
    for row, record in table["rows"].items():
        gain = record["gain"]
        spread = f" ± {statistics.stdev(gain):.1f}" if len(gain) > 1 else ""
        share = f"{100 * record['share']:.0f} %" if "share" in record else ""
        against = ", ".join(f"{w}-{lost} (p = {p:.3f})" for w, lost, p in record.get("against_first", {}).values())
        accs = " / ".join(f"{a:.1f}" for a in record["acc"].values())
        kl = f"{record['kl']:.2f}" if "kl" in record else ""
        lines.append(f"| {row} | {kl} | {accs} | {statistics.fmean(gain):+.1f}{spread} | {share} | {against} |")
    if "spearman_kl_gain" in table:
        lines += ["", f"Rank correlation of KL and gain over the rows with an emulator: {table['spearman_kl_gain']:+.2f}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--task", required=True, help="one of the run's tasks")
    parser.add_argument("--split", required=True, help="the split to evaluate (e.g. validation)")
    parser.add_argument("--limit", type=int, default=300, help="its first N items")
    parser.add_argument("--rows", required=True, help="comma-separated strategy runs or plan_transfer.sh directories")
    parser.add_argument("--out", type=Path, help="the summary as JSON")
    parser.add_argument("--figure", type=Path, help="each row's emulator KL against its share of Full FT's gain, as a PNG")
    args = parser.parse_args()
    with usage_errors_exit():
        config = load_config(args.run_dir)
        splits = get_task(args.task).splits()
        if args.split not in splits:
            raise UsageError(f"{args.task} has no split {args.split!r} (its splits: {', '.join(splits)})")
        if args.limit < 1:
            raise UsageError(f"--limit must be positive, got {args.limit}")
        found = targets(args.run_dir, config, args.task, args.rows.split(","))
        work = args.run_dir / "fresh_items" / f"{args.task}-{args.split}-{args.limit}"
        results = evaluate_rows(found, args.task, args.split, args.limit, work, config.train.max_length)
        table = summary(results, args.task, {row: emulator_kl(args.run_dir, args.task, row) for row in results})
        table = {"task": args.task, "split": args.split, "limit": args.limit, "labels": {
            row: Path(row).name if "/" in row else row if row == FT else run_label(row) for row in table["rows"]}, **table}
        print(markdown(table), end="")
        if args.out:
            write_json(args.out, table)
            print(f"wrote {args.out}")
        if args.figure:
            plot_fidelity_gain(fidelity_points(table), args.figure,
                               f"Fidelity and transfer, {args.task} {args.split} ({args.limit} items)")
            print(f"wrote {args.figure}")


if __name__ == "__main__":
    main()
