"""Does the adapter's first gradient on each emulator point where the full model's does?

For every strategy of a `crashlm offsite` run directory, this rebuilds the task's untrained
emulator from its plan and measures the cosine between the adapter layers' gradient of the
next-token loss on the emulator and on the full model, at the pretrained weights, per batch of 8
texts (``crashlm.emulators.fidelity.gradient_agreement``). The texts are the held-out calibration
paragraphs (``--source heldout``, generic English the model owner has) or the task's own training
examples, context and answer (``--source task``, what the data owner trains on). Beside it: the
emulator's KL from its bundle and the plug-in's share of Full FT's gain on the task
(`task_gains.py`), so one table says whether either fidelity orders transfer:

    .venv/bin/python benchmarks/gradient_agreement.py runs/smollm2_k25_all --task arc_easy --source task \
        --texts 32 --out benchmarks/results/gradient_agreement_smollm2_k25_task.json
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from task_gains import load_config, task_gains

from crashlm.core.errors import UsageError, usage_errors_exit
from crashlm.core.io import write_json
from crashlm.core.models import load_model
from crashlm.core.tasks import load_examples
from crashlm.emulators.fidelity import gradient_agreement, heldout_texts
from crashlm.emulators.plans import LayerPlan
from crashlm.emulators.strategies import get_strategy
from crashlm.experiments.offsite_config import run_label
from crashlm.experiments.offsite_table import bundle_records


def measure(run_dir: Path, task: str, source: str, texts: int) -> list[dict]:
    """One row per strategy of the run with a plan for ``task``: gradient agreement, KL, gain ratio."""
    config = load_config(run_dir)
    if task not in config.tasks:
        raise UsageError(f"{run_dir} has no task {task!r} (its tasks: {', '.join(config.tasks)})")
    specs = {run: get_strategy(run).spec(LayerPlan.load(run_dir / task / run / "plan.json"))
             for run in config.strategies if (run_dir / task / run / "plan.json").is_file()}
    if not specs:
        raise UsageError(f"{run_dir} has no plan for {task} yet")
    sample = heldout_texts(texts) if source == "heldout" else [e.text for e in load_examples(task, "train")[:texts]]
    model, tokenizer = load_model(config.model)
    agreement = gradient_agreement(model, tokenizer, specs, sample, bf16=config.train.bf16)
    _, gains = task_gains(run_dir, config)
    full_gain = statistics.fmean(gains["Full FT"][task]) if "Full FT" in gains else 0.0
    fidelity = bundle_records(run_dir, config, "fidelity")
    rows = []
    for run, spec in specs.items():
        plugin = gains.get(f"{run_label(run)}, Plug-in")
        record = fidelity.get(run, {}).get(task)
        rows.append({"strategy": run, "label": run_label(run), "kept": spec.plan.kept,
                     "trainable": spec.plan.trainable, **agreement[run].to_dict(),
                     "kl": record["kl"] if record else None,
                     "gain_ratio": statistics.fmean(plugin[task]) / full_gain if plugin and full_gain > 0 else None})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| emulator | gradient cosine | per adapter layer | KL | plug-in gain / Full FT's |",
             "|---|---|---|---|---|"]
    for row in sorted(rows, key=lambda r: -r["cosine"]):
        layers = ", ".join(f"{layer}: {value:.2f}" for layer, value in row["per_layer"].items())
        kl = f"{row['kl']:.2f}" if row["kl"] is not None else ""
        ratio = f"{100 * row['gain_ratio']:.0f} %" if row["gain_ratio"] is not None else ""
        lines.append(f"| {row['label']} | {row['cosine']:.3f} | {layers} | {kl} | {ratio} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--task", required=True, help="the task whose emulators (plans) and gains are read")
    parser.add_argument("--source", choices=("heldout", "task"), default="heldout",
                        help="held-out calibration paragraphs, or the task's training examples")
    parser.add_argument("--texts", type=int, default=32, help="how many texts (batches of 8)")
    parser.add_argument("--out", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()
    with usage_errors_exit():
        if args.texts < 1:
            raise UsageError("--texts must be at least 1")
        rows = measure(args.run_dir, args.task, args.source, args.texts)
        print(markdown(rows), end="")
        if args.out:
            write_json(args.out, {"run_dir": str(args.run_dir), "task": args.task, "source": args.source,
                                  "texts": args.texts, "rows": rows})
            print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
