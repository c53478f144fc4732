"""The offsite table, collected from a run directory: rows, gains, fidelity, curves and figures."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Callable

from crashlm.core.io import atomic_path, read_json, write_json
from crashlm.emulators.bundle import MANIFEST, read_records
from crashlm.emulators.plans import LayerPlan
from crashlm.emulators.plugin import ADAPTER_META
from crashlm.experiments.offsite_config import (
    KD_SUFFIX,
    LR_CHOICE,
    OffsiteConfig,
    base_strategy,
    full_ft_dir,
    run_label,
)
from crashlm.outputs.plotting import plot_fidelity_gain, plot_offsite_table, plot_training_curves
from crashlm.outputs.report import CURVES_FIGURE, FIDELITY_FIGURE
from crashlm.outputs.stats import item_interval
from crashlm.outputs.tables import gain_recovered, table_markdown, table_row
from crashlm.training.full import TRAINING_META


def accuracy(path: Path, task: str) -> float:
    """The accuracy (a fraction) an evaluation result records for ``task``."""
    return float(read_json(path, "evaluation result")["scores"][task]["acc"])


def item_correct(path: Path, task: str) -> dict:
    """``{doc_id: 1.0 or 0.0}``: which of ``task``'s items an evaluation result answered right."""
    return {item["doc_id"]: item["acc"] for item in read_json(path, "evaluation result").get("items", {}).get(task, [])}


def _item_rows(paths: dict[str, list[Path | None]], order: dict[str, list]) -> dict[str, list[list[float]]] | None:
    """Per task, each path's correctness in ``order``'s items; None unless every path scored exactly those."""
    rows: dict[str, list[list[float]]] = {}
    for task, task_paths in paths.items():
        rows[task] = []
        for path in task_paths:
            correct = item_correct(path, task) if path is not None and path.exists() else {}
            if not order[task] or set(correct) != set(order[task]):
                return None
            rows[task].append([correct[doc] for doc in order[task]])
    return rows


def bundle_records(run_dir: Path, config: OffsiteConfig, key: str) -> dict[str, dict[str, dict]]:
    """``{run: {task: record}}``: the ``key`` record of every emulator bundle of the run that has one."""
    found: dict[str, dict[str, dict]] = {}
    for run in config.strategy_runs():
        for task in config.tasks:
            bundle = run_dir / task / run / "emulator"
            records = read_records(bundle) if (bundle / MANIFEST).is_file() else {}
            if key in records:
                found.setdefault(run, {})[task] = records[key]
    return found


def build_table(run_dir: Path, config: OffsiteConfig) -> dict:
    """Collect every finished evaluation under ``run_dir`` into the table's rows."""
    tasks, seeds = list(config.tasks), list(config.seeds)
    lrs = {t: read_json(p, "learning-rate choice") for t in tasks if (p := run_dir / t / "full_ft" / LR_CHOICE).exists()}

    def collect(path_of: Callable[[str, int], Path | None], runs: list[int] = seeds) -> dict[str, dict[int, float]]:
        paths = {task: {seed: path_of(task, seed) for seed in runs} for task in tasks}
        return {t: {s: accuracy(p, t) for s, p in found.items() if p is not None and p.exists()} for t, found in paths.items()}

    zero_shot = collect(lambda t, s: run_dir / t / "full_zs.json", [0])
    zs_items = {t: item_correct(path, t) if (path := run_dir / t / "full_zs.json").exists() else {} for t in tasks}
    order = {t: list(correct) for t, correct in zs_items.items()}

    def _item_interval(plugin_path: Callable[[str, int], Path]) -> tuple[float, float] | None:
        """The plug-in's gain recovered over item resamples (every seed of every task evaluated)."""
        if not all(t in lrs for t in tasks):
            return None
        ft = _item_rows({t: [full_ft_dir(run_dir, t, lrs[t]["chosen"], s) / "eval.json" for s in seeds] for t in tasks},
                        order)
        plug = _item_rows({t: [plugin_path(t, s) for s in seeds] for t in tasks}, order)
        if ft is None or plug is None:
            return None
        return item_interval({t: [zs_items[t][doc] for doc in order[t]] for t in tasks}, ft, plug)
    rows = [table_row("Full ZS", zero_shot)]
    full_ft = collect(lambda t, s: full_ft_dir(run_dir, t, lrs[t]["chosen"], s) / "eval.json" if t in lrs else None)
    if config.full_ft:
        rows.append(table_row("Full FT", full_ft, lr={t: choice["chosen"] for t, choice in lrs.items()}))
    for run in config.strategy_runs():
        def at(name: str, run: str = run) -> Callable[[str, int], Path]:
            return lambda t, s: run_dir / t / run / name.format(seed=s)

        label = run_label(run)
        rows.append(table_row(f"{label}, Emu ZS", collect(at("emu_zs.json"), [0]), run=run))
        rows.append(table_row(f"{label}, Emu FT", collect(at("seed{seed}/emu_ft.json")), run=run))
        plugin = collect(at("seed{seed}/plugin.json"))
        gain = gain_recovered(zero_shot, full_ft, plugin) if config.full_ft else {}
        if gain:
            interval = _item_interval(at("seed{seed}/plugin.json"))
            if interval is not None:
                gain["gain_recovered_items"] = list(interval)
        rows.append(table_row(f"{label}, Plug-in", plugin, run=run, **gain))
    distilled = {run: {task: {key: record[key] for key in ("chosen_step", "before", "after")}
                       for task, record in by_task.items()}
                 for run, by_task in bundle_records(run_dir, config, "distillation").items()}
    adapter_lrs = {run: by_task for run in config.strategy_runs()
                   if (by_task := {t: read_json(p, "learning-rate choice") for t in tasks
                                   if (p := run_dir / t / run / LR_CHOICE).exists()})}
    kept = {run: {task: LayerPlan.load(path).k for task in tasks
                  if (path := run_dir / task / base_strategy(run) / "plan.json").exists()}
            for run in config.strategies}
    return {"model": config.model, "tasks": tasks, "seeds": seeds, "metric": "acc", "rows": rows, "full_ft_lr": lrs,
            "adapter_lr": adapter_lrs,
            "kept_layers": {run: by_task for run, by_task in kept.items() if by_task},
            "fidelity": bundle_records(run_dir, config, "fidelity"), "distillation": distilled,
            "config": config.to_dict()}


def task_curves(run_dir: Path, task: str, config: OffsiteConfig) -> dict[str, list[tuple[str, list, list]]]:
    """The validation curves of ``task``: each training's answer-token loss, each distillation's held-out LM loss."""
    answer: list[tuple[str, list, list]] = []
    distillation: list[tuple[str, list, list]] = []

    def add(lines: list, label: str, curve: list[dict]) -> None:
        lines.append((label, [point["step"] for point in curve], [point["val_loss"] for point in curve]))

    choice = run_dir / task / "full_ft" / LR_CHOICE
    lr = read_json(choice, "learning-rate choice")["chosen"] if choice.exists() else None
    for seed in config.seeds:
        path = full_ft_dir(run_dir, task, lr, seed) / "model" / TRAINING_META if lr is not None else None
        if path is not None and path.exists():
            add(answer, f"Full FT (lr {lr:g}), seed {seed}", read_json(path, "training record")["validation_curve"])
    for run in config.strategy_runs():
        for seed in config.seeds:
            path = run_dir / task / run / f"seed{seed}" / "adapter" / ADAPTER_META
            if path.exists():
                add(answer, f"{run_label(run)}, seed {seed}", read_json(path, "adapter record")["validation_curve"])
        bundle = run_dir / task / run / "emulator"
        if run.endswith(KD_SUFFIX) and (bundle / MANIFEST).is_file():
            add(distillation, run_label(run), read_records(bundle)["distillation"]["validation_curve"])
    panels = {"validation loss (answer tokens)": answer, "distillation: held-out calibration LM loss": distillation}
    return {name: lines for name, lines in panels.items() if lines}


def write_table(run_dir: Path, table: dict, config: OffsiteConfig) -> None:
    """The table as JSON, Markdown and a figure; the fidelity-against-gain figure; each task's curves."""
    write_json(run_dir / "table.json", table)
    with atomic_path(run_dir / "table.md") as tmp:
        tmp.write_text(table_markdown(table), encoding="utf-8")
    plot_offsite_table(table, run_dir / "table.png")
    points = []
    for row in table["rows"]:
        kls = [record["kl"] for record in table["fidelity"].get(row.get("run"), {}).values()]
        if "gain_recovered" in row and kls:
            points.append((run_label(row["run"]), statistics.fmean(kls), row["gain_recovered"], row["gain_recovered_std"]))
    if points:
        plot_fidelity_gain(points, run_dir / FIDELITY_FIGURE, f"Fidelity and transfer on {Path(config.model).name}")
    for task in config.tasks:
        panels = task_curves(run_dir, task, config)
        if panels:
            plot_training_curves(panels, run_dir / task / CURVES_FIGURE, f"{task}: validation curves")


