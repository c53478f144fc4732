"""Training speed on real task data, end to end: `crashlm train` as a user runs it.

`bench_train.py` times one synthetic, unpadded batch; real batches are short, vary in length
and are padded, and the run also validates. This script runs the command itself on a task's
training split: a uniform emulator's adapter and full fine-tuning, each in its own process, and
reads what the training loop records (tokens/s counts real tokens, padding excluded) plus the
command's wall time and its best validation loss. ``--src`` runs another checkout's library
(its ``src`` directory goes first on PYTHONPATH), so one script measures before and after on the
same machine in one run:

    git worktree add /tmp/base <commit>
    .venv/bin/python benchmarks/bench_train_task.py --src /tmp/base/src --src src

The last printed line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = ("uniform", "full")


def crashlm(src: str, args: list[str], threads: int | None) -> float:
    """Run ``crashlm ARGS`` with ``src`` first on the path; returns its wall seconds."""
    env = dict(os.environ, PYTHONPATH=str(Path(src).resolve()), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "crashlm", *args], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"crashlm {' '.join(args)} failed with {src}:\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def run(src: str, index: int, config: str, args, tmp: Path) -> dict:
    out = tmp / f"{index}-{config}"
    train = ["train", "--task", args.task, "--train-samples", str(args.train_samples), "--val-samples",
             str(args.val_samples), "--max-length", str(args.max_length), "--batch-size", str(args.batch_size),
             "--seed", "1", "--out", str(out)]
    if config == "full":
        train += ["--full", "--model", args.model]
        record_file = out / "training.json"
    else:
        bundle = tmp / f"{index}-emulator"
        if not bundle.exists():
            crashlm(src, ["emulator", "--model", args.model, "--strategy", "uniform", "--no-fidelity",
                          "--out", str(bundle)], args.threads)
        train += ["--emulator", str(bundle)]
        record_file = out / "adapter.json"
    wall = crashlm(src, train, args.threads)
    record = json.loads(record_file.read_text())["training"]
    return {"src": src, "config": config, "wall_seconds": round(wall, 1), "train_seconds": record["train_seconds"],
            "tokens": record["tokens"], "tokens_per_second": record["tokens_per_second"],
            "best_val_loss": record["best_val_loss"], "steps": record["steps"]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", action="append", help="a checkout's src directory (repeatable; default: this one)")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="uniform (adapter) and/or full (default both)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="piqa")
    parser.add_argument("--train-samples", type=int, default=400)
    parser.add_argument("--val-samples", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the runs (default: torch's choice)")
    args = parser.parse_args(argv)
    sources = args.src or [str(Path(__file__).resolve().parents[1] / "src")]
    configs = args.configs.split(",")
    if unknown := set(configs) - set(CONFIGS):
        sys.exit(f"unknown configs {sorted(unknown)}; choose from {CONFIGS}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for config in configs:
            for index, src in enumerate(sources):  # alternating checkouts: a change in load hits both alike
                row = run(src, index, config, args, Path(tmp))
                rows.append(row)
                print(f"{config:<8} {src:<24} {row['tokens_per_second']:>8.1f} tokens/s  train {row['train_seconds']:>7.1f} s"
                      f"  command {row['wall_seconds']:>7.1f} s  best val loss {row['best_val_loss']:.4f}", flush=True)
    print(json.dumps({"benchmark": "bench_train_task", "model": args.model, "task": args.task,
                      "train_samples": args.train_samples, "max_length": args.max_length,
                      "batch_size": args.batch_size, "threads": args.threads, "cpus": os.cpu_count(), "results": rows}))


if __name__ == "__main__":
    main()
