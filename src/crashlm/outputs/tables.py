"""The offsite-tuning table as text: one set of cells, rendered as Markdown or HTML.

Every renderer formats a score the same way: accuracy in percent with one decimal, and
``± std`` over seeds when a cell averages more than one run.
"""

from __future__ import annotations

import html

COLUMNS_AFTER_TASKS = ("average", "gain recovered")


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
        gain = f"{100 * row['gain_recovered']:.0f} %" if "gain_recovered" in row else ""
        rows.append([row["name"], *(_score(row, task) for task in tasks), average, gain])
    return header, rows


def table_note(table: dict) -> str:
    return (f"{table.get('metric', 'acc')} (%) on {', '.join(table['tasks'])}; model {table['model']}; "
            f"seeds {table['seeds']} (mean ± std where several).")


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
