"""Log-likelihood requests/s of crashlm's lm-eval model against lm-eval's default HFLM.

Both score the very same lm-eval ``Instance`` requests (every choice of the first ``--limit``
items of each task's evaluation split): ``HFLM(pretrained=model, tokenizer=tok, batch_size=B)``
in fp32, and :class:`crashlm.evaluation.lm.CrashlmLM` on its default path (bf16 autocast where
the hardware has native bf16, else fp32; context packing; unembedding at answer positions
only). Reports requests/s of each, the speedup (by wall-clock time, and by this process's CPU
time, which a machine shared with other jobs disturbs less), each one's accuracy and the largest
difference between their per-request log-likelihoods. The two run alternately, ``--repeats``
times, and the best time of each counts, so a busy machine penalises both alike.

    .venv/bin/python benchmarks/bench_eval.py [--quick] [--model smollm2-135m] [--tasks piqa,arc_easy]

Achieved FLOP/s of crashlm's pass: 2 FLOPs per decoder parameter and real input token (padding
and the context packing saves are not counted) plus 2 per unembedding parameter and unembedded
position (:attr:`CrashlmLM.counts`), over its wall time, against this machine's matmul peak in
crashlm's compute dtype. ``--profile`` also prints where crashlm's time goes
(:mod:`profiling`).

``--without-bos`` also scores crashlm with the tokenizer's BOS turned off (what crashlm did before
its encoding became lm-eval's), to measure what a missing BOS costs on a model that expects one.

The last printed line is one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from profiling import breakdown, format_breakdown, matmul_peak, matmul_rate, profile_steps  # noqa: E402

from crashlm.core.models import get_layers, load_model  # noqa: E402
from crashlm.core.tasks import get_task, load_examples  # noqa: E402
from crashlm.evaluation.lm import CrashlmLM  # noqa: E402


def _requests(task: str, limit: int, split: str | None = None) -> tuple[list[Instance], list]:
    examples = load_examples(task, split or get_task(task).eval_split, limit)
    args = [(ex.context, " " + choice) for ex in examples for choice in ex.choices]
    instances = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(args)]
    return instances, examples


def _accuracy(loglikelihoods: list[float], examples: list) -> float:
    scores, correct = iter(loglikelihoods), 0
    for ex in examples:
        values = [next(scores) for _ in ex.choices]
        correct += int(max(range(len(values)), key=values.__getitem__) == ex.gold)
    return correct / len(examples)


def _timed(lm, instances: list[Instance]) -> tuple[float, float, list[float]]:
    """Wall-clock seconds, CPU seconds of this process, and the log-likelihoods."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = lm.loglikelihood(instances, disable_tqdm=True)
    return time.perf_counter() - wall, time.process_time() - cpu, [value for value, _ in out]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="model spec (default smollm2-135m)")
    parser.add_argument("--tasks", default="piqa,arc_easy", help="comma-separated tasks (default piqa,arc_easy)")
    parser.add_argument("--limit", type=int, default=40, help="items per task (default 40; 4 with --quick)")
    parser.add_argument("--batch-size", type=int, default=16, help="batch size of both models (default 16)")
    parser.add_argument("--repeats", type=int, default=2, help="alternating timed runs of each (default 2; 1 with --quick)")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="crashlm's compute dtype (default auto: its default path); HFLM always runs fp32")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--split", default=None, help="split to score (default: each task's evaluation split)")
    parser.add_argument("--without-bos", action="store_true",
                        help="also score crashlm with the tokenizer's BOS turned off (accuracy only)")
    parser.add_argument("--quick", action="store_true", help="a small run (under a minute)")
    parser.add_argument("--profile", action="store_true", help="also profile crashlm's pass and print where its time goes")
    args = parser.parse_args()
    limit = 4 if args.quick else args.limit
    repeats = 1 if args.quick else args.repeats
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tok = load_model(args.model, dtype=torch.float32)
    hflm = HFLM(pretrained=model, tokenizer=tok, batch_size=args.batch_size)
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    ours = CrashlmLM(model, tok, batch_size=args.batch_size, dtype=dtype, progress=False)
    print(f"model {args.model}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else platform.machine() + ' CPU'}; "
          f"crashlm dtype {str(ours.dtype)[6:]}, batch size {args.batch_size}, {limit} items per task, {repeats} repeats")

    peak = matmul_peak(torch.device(ours._device), ours.dtype)
    decoder = sum(p.numel() for p in get_layers(model).parameters())
    unembedding = model.get_output_embeddings().weight.numel()
    print(f"matmul peak in {str(ours.dtype)[6:]}: {peak / 1e9:.1f} GFLOP/s")

    per_task, everything = {}, []
    totals = {"requests": 0, "hflm_wall": 0.0, "crashlm_wall": 0.0, "hflm_cpu": 0.0, "crashlm_cpu": 0.0}
    for task in args.tasks.split(","):
        instances, examples = _requests(task, limit, args.split)
        everything += instances
        wall = {"hflm": float("inf"), "crashlm": float("inf")}
        cpu = dict(wall)
        values = {}
        for _ in range(repeats):
            for name, lm in (("hflm", hflm), ("crashlm", ours)):
                seconds, cpu_seconds, values[name] = _timed(lm, instances)
                wall[name], cpu[name] = min(wall[name], seconds), min(cpu[name], cpu_seconds)
        n = len(instances)
        flops = 2 * decoder * ours.counts["tokens"] + 2 * unembedding * ours.counts["unembedded"]
        row = {
            "items": len(examples),
            "requests": n,
            "hflm_req_per_s": n / wall["hflm"],
            "crashlm_req_per_s": n / wall["crashlm"],
            "speedup": wall["hflm"] / wall["crashlm"],
            "speedup_cpu_time": cpu["hflm"] / cpu["crashlm"],
            "hflm_acc": _accuracy(values["hflm"], examples),
            "crashlm_acc": _accuracy(values["crashlm"], examples),
            "max_abs_loglik_diff": max(abs(a - b) for a, b in zip(values["hflm"], values["crashlm"])),
            "packed": ours.packed,
            "crashlm_flops": flops,
            "crashlm_achieved_flops": flops / wall["crashlm"],
            "crashlm_utilisation": flops / wall["crashlm"] / peak,
            "padding_share": 1 - ours.counts["tokens"] / ours.counts["positions"],
        }
        if args.without_bos:
            no_bos = copy.deepcopy(tok)
            no_bos.add_bos_token = False
            lm = CrashlmLM(model, no_bos, batch_size=args.batch_size, dtype=dtype, progress=False)
            row["crashlm_without_bos_acc"] = _accuracy([v for v, _ in lm.loglikelihood(instances, disable_tqdm=True)], examples)
        per_task[task] = row
        totals["requests"] += n
        for name in ("hflm", "crashlm"):
            totals[f"{name}_wall"] += wall[name]
            totals[f"{name}_cpu"] += cpu[name]
        print(f"{task}: {n} requests; HFLM fp32 {row['hflm_req_per_s']:.2f} req/s, crashlm {row['crashlm_req_per_s']:.2f} "
              f"req/s; speedup {row['speedup']:.2f}x (CPU time {row['speedup_cpu_time']:.2f}x); acc HFLM "
              f"{row['hflm_acc']:.3f} crashlm {row['crashlm_acc']:.3f}; max |dlogL| {row['max_abs_loglik_diff']:.2e}; "
              f"crashlm {row['crashlm_achieved_flops'] / 1e9:.1f} GFLOP/s ({100 * row['crashlm_utilisation']:.0f} % of "
              f"peak, {100 * row['padding_share']:.0f} % padding)"
              + (f"; crashlm without BOS {row['crashlm_without_bos_acc']:.3f}" if args.without_bos else ""))

    if args.profile:
        prof, seconds = profile_steps(lambda: ours.loglikelihood(everything, disable_tqdm=True), 1)
        print(format_breakdown(f"crashlm scoring all {len(everything)} requests (profiled)",
                               breakdown(prof, seconds, 1, model.config.vocab_size)))
        rate = matmul_rate(prof)
        print(f"  matmuls themselves: {rate / 1e9:.1f} GFLOP/s, {100 * rate / peak:.0f} % of the peak")

    summary = {
        "bench": "eval",
        "model": args.model,
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "items_per_task": limit,
        "crashlm_dtype": str(ours.dtype)[6:],
        "requests": totals["requests"],
        "hflm_req_per_s": totals["requests"] / totals["hflm_wall"],
        "crashlm_req_per_s": totals["requests"] / totals["crashlm_wall"],
        "speedup": totals["hflm_wall"] / totals["crashlm_wall"],
        "speedup_cpu_time": totals["hflm_cpu"] / totals["crashlm_cpu"],
        "matmul_peak_flops": peak,
        "crashlm_achieved_flops": sum(r["crashlm_flops"] for r in per_task.values()) / totals["crashlm_wall"],
        "tasks": per_task,
    }
    print(f"overall: HFLM fp32 {summary['hflm_req_per_s']:.2f} req/s, crashlm {summary['crashlm_req_per_s']:.2f} req/s, "
          f"speedup {summary['speedup']:.2f}x (CPU time {summary['speedup_cpu_time']:.2f}x)")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
