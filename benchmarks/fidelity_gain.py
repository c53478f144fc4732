"""Fidelity against transfer across several `crashlm offsite` tables: one point per plug-in row.

Each table's own `fidelity.png` shows its runs at one K; this script puts the rows of several
tables (other K, distillation, the K = L ceiling) on one figure, each labelled with its K, so the
question "does a closer emulator transfer more?" is read over the whole range:

    .venv/bin/python benchmarks/fidelity_gain.py benchmarks/results/offsite_smollm2.json \
        benchmarks/results/offsite_smollm2_kd.json benchmarks/results/offsite_smollm2_k20.json \
        benchmarks/results/offsite_smollm2_k25_all.json benchmarks/results/offsite_smollm2_ceiling.json \
        --out benchmarks/results/offsite_smollm2_fidelity_gain.png

It prints the points (label, K, mean KL over the tasks, gain recovered ± seed std).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from crashlm.core.io import read_json
from crashlm.experiments.offsite_config import base_strategy, run_label
from crashlm.outputs.plotting import plot_fidelity_gain


def table_points(table: dict) -> list[tuple[str, float, float, float | None]]:
    """(label with K, mean KL over tasks, gain recovered, its std) for each plug-in row with both."""
    points = []
    for row in table["rows"]:
        run = row.get("run")
        kls = [record["kl"] for record in table.get("fidelity", {}).get(run, {}).values()]
        if "gain_recovered" not in row or not kls:
            continue
        kept = table.get("kept_layers") or {}
        ks = set((kept.get(run) or kept.get(base_strategy(run)) or {}).values())  # "+ KD": its emulator's K
        if not ks:  # a table written before K was recorded: its K setting, or the paper's half the layers
            ks = {table["config"].get("k") or "L/2"}
        k = "/".join(str(v) for v in sorted(ks, key=str))
        points.append((f"{run_label(run)}, K={k}", statistics.fmean(kls), row["gain_recovered"],
                       row.get("gain_recovered_std")))
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tables", nargs="+", type=Path, help="table JSON files of `crashlm offsite` runs (same model)")
    parser.add_argument("--out", type=Path, required=True, help="figure to write (.png)")
    parser.add_argument("--title", default=None, help="figure title (default: the model's name)")
    args = parser.parse_args()
    tables = [read_json(path, "offsite table") for path in args.tables]
    models = {Path(str(table["model"])).name for table in tables}
    if len(models) != 1:
        parser.error(f"the tables are of different models: {', '.join(sorted(models))}")
    points = [point for table in tables for point in table_points(table)]
    if not points:
        parser.error("no plug-in row with both a fidelity record and a gain recovered in these tables")
    for label, kl, gain, std in points:
        print(f"{label:<40} KL {kl:6.2f}  gain recovered {100 * gain:6.1f} %"
              + ("" if std is None else f" ± {100 * std:.1f}"))
    plot_fidelity_gain(points, args.out, args.title or f"Fidelity and transfer on {models.pop()}")
    print(args.out)


if __name__ == "__main__":
    main()
