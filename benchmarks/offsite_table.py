"""Write the table of a (possibly unfinished) `crashlm offsite` run for the tasks it finished.

`crashlm offsite` writes RUN_DIR/table.* when every step is done; this script collects what a
stopped run holds, for the tasks given, without running anything:

    .venv/bin/python benchmarks/offsite_table.py runs/offsite_smollm2 --tasks piqa \
        --out benchmarks/results/offsite_smollm2_main2000.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from crashlm.core.io import read_json, write_json
from crashlm.experiments.offsite import OffsiteConfig, build_table
from crashlm.outputs.tables import table_markdown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--tasks", required=True, help="comma-separated tasks to tabulate")
    parser.add_argument("--out", type=Path, required=True, help="table JSON to write (the markdown is printed)")
    args = parser.parse_args()
    config = OffsiteConfig.from_dict(read_json(args.run_dir / "config.json", "run configuration"))
    config.tasks = [t for t in args.tasks.split(",") if t]
    table = build_table(args.run_dir, config)
    write_json(args.out, table)
    print(table_markdown(table))


if __name__ == "__main__":
    main()
