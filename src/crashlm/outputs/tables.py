"""The offsite-tuning table: its rows from per-seed scores, and its cells as Markdown or HTML.

Every renderer formats a score the same way: accuracy in percent with one decimal, and
``± std`` over seeds when a cell averages more than one run; the gain recovered likewise, over
the seeds it was measured on.
"""

from __future__ import annotations

import html
import math
import statistics

from crashlm.outputs.stats import ITEM_LEVEL, ITEM_RESAMPLES

COLUMNS_AFTER_TASKS = ("average", "gain recovered")
# Scores of one row: task -> seed -> accuracy (one entry for an untrained row).
Scores = dict[str, dict[int, float]]


def table_row(name: str, scores: Scores, **extra) -> dict:
    """A row: the mean and std over seeds per task, and the average over tasks once every task has a score."""
    values = {task: list(by_seed.values()) for task, by_seed in scores.items()}
    means = {task: statistics.fmean(v) for task, v in values.items() if v}
    complete = len(means) == len(values)
    return {
        "name": name,
        **extra,
        "scores": means,
        "spread": {task: (statistics.stdev(v) if len(v) > 1 else 0.0) for task, v in values.items() if v},
        "runs": {task: len(v) for task, v in values.items()},
        "average": statistics.fmean(means.values()) if complete and means else None,
    }


def gain_recovered(zero_shot: Scores, full_ft: Scores, plugin: Scores) -> dict:
    """The share of full fine-tuning's gain a plug-in recovers (CRaSh, Zhang et al. 2023), with its spread.

    Per seed with every task scored: (plug-in average - Full ZS average) / (Full FT average -
    Full ZS average), the averages over the tasks; then the mean and sample std over those seeds
    (std None for one seed). A seed whose Full FT does not beat Full ZS has no gain to recover
    (the ratio would be meaningless: 325 % for a plug-in below both) and is left out. Empty when
    no seed qualifies.
    """
    tasks = list(zero_shot)
    if not tasks or not all(zero_shot[task] for task in tasks):
        return {}
    zs = statistics.fmean(statistics.fmean(zero_shot[task].values()) for task in tasks)
    gains = []
    for seed in plugin[tasks[0]]:
        if all(seed in plugin[task] and seed in full_ft[task] for task in tasks):
            ft = statistics.fmean(full_ft[task][seed] for task in tasks)
            if ft > zs and not math.isclose(ft, zs):
                gains.append((statistics.fmean(plugin[task][seed] for task in tasks) - zs) / (ft - zs))
    if not gains:
        return {}
    return {"gain_recovered": statistics.fmean(gains),
            "gain_recovered_std": statistics.stdev(gains) if len(gains) > 1 else None,
            "gain_recovered_seeds": len(gains)}


def gain_text(row: dict) -> str:
    """``54 %``, or ``54 ± 7 % (3 seeds)``, then ``; items 31 to 70 %`` where the item interval is
    known; empty for a row without a gain."""
    if "gain_recovered" not in row:
        return ""
    std = row.get("gain_recovered_std")
    text = f"{100 * row['gain_recovered']:.0f} %"
    if std is not None:
        text = f"{100 * row['gain_recovered']:.0f} ± {100 * std:.0f} % ({row['gain_recovered_seeds']} seeds)"
    if "gain_recovered_items" in row:
        low, high = row["gain_recovered_items"]
        text += f"; items {100 * low:.0f} to {100 * high:.0f} %"
    return text


def _score(row: dict, task: str) -> str:
    if task not in row["scores"]:
        return "–"
    text = f"{100 * row['scores'][task]:.1f}"
    if row.get("runs", {}).get(task, 1) > 1:
        text += f" ± {100 * row['spread'][task]:.1f}"
    return text


def table_cells(table: dict) -> tuple[list[str], list[list[str]]]:
    """The header and the rows of ``table`` (from :func:`crashlm.experiments.offsite.build_table`) as text."""
    tasks = table["tasks"]
    header = ["row", *tasks, *COLUMNS_AFTER_TASKS]
    rows = []
    for row in table["rows"]:
        average = "–" if row.get("average") is None else f"{100 * row['average']:.1f}"
        rows.append([row["name"], *(_score(row, task) for task in tasks), average, gain_text(row)])
    return header, rows


def table_note(table: dict) -> str:
    note = (f"{table.get('metric', 'acc')} (%) on {', '.join(table['tasks'])}; model {table['model']}; "
            f"seeds {table['seeds']} (mean ± std where several).")
    if any("gain_recovered_items" in row for row in table["rows"]):
        note += (f" Gain recovered \"items a to b %\": the {100 * ITEM_LEVEL:.0f} % interval of the plug-in's gain over"
                 " Full FT's (seed-averaged, mean over the tasks) when each task's items are resampled"
                 f" ({ITEM_RESAMPLES} bootstrap resamples); the seeds share the items, so their ± leaves this out.")
    choices = table.get("full_ft_lr") or {}
    if choices:
        tried = "; ".join(
            f"{task} {choice['chosen']:g} (" + ", ".join(
                f"{c['lr']:g}: {c['best_val_loss']:.4f}" for c in choice["candidates"]) + ")"
            for task, choice in choices.items())
        note += f" Full FT learning rate chosen on the first seed's best validation loss: {tried}."
    adapter_choices = table.get("adapter_lr") or {}
    if adapter_choices:
        note += " Adapter learning rate chosen on the first seed's best validation loss on the emulator: " + "; ".join(
            f"{run} " + ", ".join(f"{task} {choice['chosen']:g}" for task, choice in by_task.items())
            for run, by_task in adapter_choices.items()) + "."
    averages = {row["name"]: row["average"] for row in table["rows"] if row["name"] in ("Full ZS", "Full FT")}
    if None not in averages.values() and len(averages) == 2 and averages["Full FT"] <= averages["Full ZS"]:
        note += (f" Full FT ({100 * averages['Full FT']:.1f}) does not beat Full ZS ({100 * averages['Full ZS']:.1f}) "
                 "on average: there is no gain to recover, so no gain is given.")
    kept = table.get("kept_layers") or {}
    if kept:
        note += " Kept layers K: " + "; ".join(
            f"{run} {next(iter(ks.values()))}" if len(set(ks.values())) == 1
            else f"{run} " + ", ".join(f"{task} {k}" for task, k in ks.items())
            for run, ks in kept.items()) + "."
    return note


def table_markdown(table: dict) -> str:
    header, rows = table_cells(table)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n\n" + table_note(table) + "\n"


def table_html(table: dict) -> str:
    header, rows = table_cells(table)
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table><p>{html.escape(table_note(table))}</p>"
