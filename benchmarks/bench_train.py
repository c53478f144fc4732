"""Training speed and memory: full fine-tuning vs adapter training on uniform, crash and crash-share emulators.

Every configuration trains on the same synthetic batch (B rows of T tokens, the last A of them
the answer) with the training loop's step: answer-token loss
(:func:`crashlm.core.scoring.batch_answer_loss`), backward, gradient clipping, AdamW, in the precision
``crashlm train`` picks (:func:`crashlm.training.runtime.use_bf16`: bf16 autocast where the device computes
bf16 natively, fp32 elsewhere). Each runs in a fresh worker process, so its peak memory is its own:

* CPU: peak RSS growth over the worker's RSS after imports (sampled every 20 ms), i.e. weights +
  gradients + optimizer state + activations;
* GPU: ``torch.cuda.max_memory_allocated`` (the same quantities, allocator view).

Achieved FLOP/s uses the standard estimate, 2 FLOPs per parameter and token for each of the
forward pass, the activation gradients and the weight gradients, generalised to frozen layers:

    FLOPs/step = 2 * B*T * (N_forward + N_activation_grad + N_weight_grad)
               + 2 * B*A * V*d * (2 + [unembedding trains])

N_forward: the decoder parameters of every position (a shared layer counts at each position);
N_activation_grad: those of the positions above the lowest trainable one (gradients must flow
through them); N_weight_grad: the trainable decoder parameters, per position. The unembedding
(V*d) runs only on the A positions of each row that predict an answer token
(:func:`crashlm.core.scoring.unembed_only`). Attention-score FLOPs and norms are left out (a few percent
at these lengths). Utilisation = achieved FLOP/s over this machine's matmul peak in the compute
precision, measured here with square matmuls; the bf16 peak and the utilisation against it are
reported as well (on CPUs without native bf16 the bf16 peak is far below the fp32 one).

    .venv/bin/python benchmarks/bench_train.py --quick       # < 1 min on 2 cores
    .venv/bin/python benchmarks/bench_train.py               # the recorded run
    .venv/bin/python benchmarks/bench_train.py --profile     # also where each step's time goes
    .venv/bin/python benchmarks/bench_train.py --configs uniform --compile --vary-length --steps 4
                                                # torch.compile: every step's time, compiles included
    .venv/bin/python benchmarks/bench_train.py --no-frozen-bf16   # frozen weights re-cast by autocast
    .venv/bin/python benchmarks/bench_train.py --sdpa-attention   # fused attention's backward at every length
    python benchmarks/bench_train.py --random-init --device cuda   # GPU machine without model files

``--vary-length`` gives each step a different length (``--seq-len`` minus 8 per step, cycling
over four lengths), as length-grouped batches of real data do; with ``--compile`` (the model's
forward under ``torch.compile(dynamic=True)``) every step's time is reported, so the compile
time and what a new length costs are visible next to the steady step. Where training computes
in bf16, the frozen parameters are held in bf16 for the run, as ``crashlm train`` does
(:func:`crashlm.core.models.held_in_bf16`); ``--no-frozen-bf16`` keeps them fp32, so
autocast re-casts them at every forward (crashlm before that change). Attention runs as in
``crashlm train`` (:func:`crashlm.core.attention.training_attention`: explicit products for short
sequences in bf16 on a CPU); ``--sdpa-attention`` keeps the fused kernel throughout.

The last printed line is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from profiling import breakdown, format_breakdown, matmul_peak, matmul_rate, profile_steps, record_function, sync

CONFIGS = ("full", "uniform", "crash", "crash-share")
# SmolLM2-135M's architecture, for --random-init where the model files are absent (GPU machine).
SMOLLM2_135M = dict(
    model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5,
    rope_theta=100000.0, tie_word_embeddings=True, hidden_act="silu", bos_token_id=1, eos_token_id=2, pad_token_id=2,
)


# ---------------------------------------------------------------------------------------------
# Models and plans


def load(model: str, random_init: bool, dtype=torch.float32):
    """The full model: from its files, or randomly initialised (seeded) from its config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if not random_init:
        from crashlm.core.models import load_model

        return load_model(model, dtype=dtype)[0]
    try:
        from crashlm.core.models import resolve_model

        config = AutoConfig.from_pretrained(resolve_model(model))
    except Exception:  # no model files here: the built-in SmolLM2-135M shape
        if model != "smollm2-135m":
            raise
        config = AutoConfig.for_model(**SMOLLM2_135M)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def make_plans(model, args) -> tuple[dict, str]:
    """uniform and crash plans (crash-share uses crash's); CKA of the real model on piqa's train
    split except with --random-init (no trained weights or data) or --quick (saves a model load
    and a pass)."""
    from crashlm.core.models import num_layers
    from crashlm.core.tasks import ANALYSIS_SPLIT
    from crashlm.emulators.strategies import plan_for

    plans = {"uniform": plan_for(model, "uniform", model_name=args.model)}
    if args.random_init or args.quick:
        # A synthetic profile: the plan's shape (K kept, 4 trainable, sharing), not its exact
        # layers, decides speed and memory.
        depth = num_layers(model)
        adjacent = [0.9 - 0.4 * ((7 * i) % depth) / depth for i in range(depth - 1)]
        plans["crash"] = plan_for(model, "crash", similarity=adjacent, model_name=args.model)
        source = "a synthetic adjacent-similarity profile (--random-init / --quick)"
    else:
        from crashlm.core.models import load_tokenizer, resolve_model

        tokenizer = load_tokenizer(resolve_model(args.model))
        plans["crash"] = plan_for(model, "crash", model_name=args.model, tokenizer=tokenizer, task="piqa",
                                  samples=args.similarity_samples, batch_size=8)
        source = f"linear CKA of {args.model} on {args.similarity_samples} piqa {ANALYSIS_SPLIT} examples"
    plans["crash-share"] = plans["crash"]
    return {name: plan.to_dict() for name, plan in plans.items()}, source


# ---------------------------------------------------------------------------------------------
# Measurements


class PeakRSS:
    """Peak resident memory of this process above a baseline, sampled in a background thread."""

    def __init__(self, interval: float = 0.02):
        import psutil

        self.process, self.interval = psutil.Process(), interval
        self.baseline = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)
        return self.peak - self.baseline


def step_flops(model, trainable: set[int], batch: int, seq: int, answer: int) -> float:
    """The FLOP estimate of the module docstring for one optimizer step."""
    from crashlm.core.models import get_layers

    layers = get_layers(model)
    sizes = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    trains = [any(id(p) in trainable for p in layer.parameters()) for layer in layers]
    lowest = trains.index(True)
    forward = sum(sizes)
    activation = sum(sizes[lowest + 1 :])
    weight = sum(size for size, t in zip(sizes, trains) if t)
    unembed = model.get_output_embeddings().weight
    head = unembed.numel() * (2 + (id(unembed) in trainable))
    return 2 * batch * seq * (forward + activation + weight) + 2 * batch * answer * head


def synthetic_batch(vocab: int, batch: int, seq: int, answer: int, device) -> dict[str, torch.Tensor]:
    from crashlm.core.scoring import IGNORE_INDEX

    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, vocab, (batch, seq + 1), generator=generator)
    input_ids, targets = tokens[:, :-1], tokens[:, 1:].clone()  # as crashlm.core.scoring.collate aligns them
    targets[:, : seq - answer] = IGNORE_INDEX
    return {"input_ids": input_ids.to(device), "targets": targets.to(device),
            "attention_mask": torch.ones_like(input_ids).to(device)}


def step_lengths(args) -> list[int]:
    """The sequence length of each warm-up and timed step."""
    steps = args.warmup + args.steps
    if not args.vary_length:
        return [args.seq_len] * steps
    return [args.seq_len - 8 * (step % 4) for step in range(steps)]  # parse_args keeps each above the answer


def worker(args) -> dict:
    """Train one configuration for warmup + steps; report speed, memory and FLOPs."""
    from crashlm.core.attention import training_attention
    from crashlm.core.models import get_layers, held_in_bf16
    from crashlm.core.scoring import batch_answer_loss
    from crashlm.emulators.emulator import build_emulator
    from crashlm.emulators.plans import LayerPlan
    from crashlm.emulators.strategies import get_strategy
    from crashlm.training.runtime import use_bf16

    device = torch.device(args.device)
    bf16 = use_bf16(True, device)
    rss = PeakRSS() if device.type == "cpu" else None
    model = load(args.model, args.random_init)
    if args.worker == "full":
        model.requires_grad_(True)
        params = list(model.parameters())
    else:
        plan = LayerPlan.from_dict(json.loads(Path(args.plans).read_text())[args.worker])
        emulator = build_emulator(model, None, get_strategy(args.worker).spec(plan))
        params = emulator.trainable_parameters()
    model.to(device).train()
    stack = contextlib.ExitStack()  # the worker process ends with the run: nothing to restore
    frozen_bf16 = stack.enter_context(held_in_bf16(model, bf16 and not args.no_frozen_bf16))
    attention = stack.enter_context(training_attention(model, bf16 and not args.sdpa_attention))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=True)  # as the training loop
    lengths = step_lengths(args)
    batches = {n: synthetic_batch(model.config.vocab_size, args.batch_size, n, args.answer_len, device)
               for n in sorted(set(lengths))}
    forward = torch.compile(model, dynamic=True) if args.compile else model
    losses = []

    def train_step(length: int = args.seq_len) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = batch_answer_loss(forward, batches[length])
        loss.backward()
        with record_function("clip"):
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        with record_function("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        sync(device)
        losses.append(float(loss))

    every_step = []
    for length in lengths:
        start = time.perf_counter()
        train_step(length)
        every_step.append(time.perf_counter() - start)
    times = every_step[args.warmup:]
    memory = rss.stop() if rss else torch.cuda.max_memory_allocated(device)
    seconds = sum(times) / len(times)
    tokens = args.batch_size * sum(lengths[args.warmup:])
    profiled = {}
    if args.profile:
        prof, profiled_seconds = profile_steps(train_step, args.steps)
        profiled = {"profile": breakdown(prof, profiled_seconds, args.steps, model.config.vocab_size),
                    "profiled_step_seconds": profiled_seconds, "matmul_flops": matmul_rate(prof)}
    mean_length = (tokens / args.batch_size) / len(times)
    flops = step_flops(model, {id(p) for p in params}, args.batch_size, mean_length, args.answer_len)
    return {
        "config": args.worker,
        "positions": len(get_layers(model)),
        "parameters": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
        "trainable_parameters": sum(p.numel() for p in params),
        "step_seconds": seconds,
        "every_step_seconds": every_step,
        "step_lengths": lengths,
        "compiled": args.compile,
        "frozen_parameters_in_bf16": frozen_bf16,
        "attention": attention,
        "tokens_per_second": tokens / sum(times),
        "peak_memory_bytes": int(memory),
        "flops_per_step": flops,
        "achieved_flops": flops / seconds,
        "loss": losses[-1],
        **profiled,
    }


# ---------------------------------------------------------------------------------------------
# Driver


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small batch, few steps (< 1 min on 2 cores)")
    parser.add_argument("--model", default="smollm2-135m", help="model alias or directory (default smollm2-135m)")
    parser.add_argument("--random-init", action="store_true", help="random weights from the model's config (no files needed)")
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda (default: cuda if available)"
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    parser.add_argument("--batch-size", type=int, help="rows per step (default 8; quick 2)")
    parser.add_argument("--seq-len", type=int, help="tokens per row (default 128; quick 64)")
    parser.add_argument("--answer-len", type=int, default=16, help="answer tokens per row, at the end (default 16)")
    parser.add_argument("--steps", type=int, help="timed steps (default 5; quick 1)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 1)")
    parser.add_argument("--similarity-samples", type=int, help="examples for the crash plan's CKA (default 64; quick 16)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile the timed steps and print where each configuration's step time goes")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"comma-separated configurations to run (default {','.join(CONFIGS)}); "
                             "speed-up and memory against full only when full is among them")
    parser.add_argument("--compile", action="store_true",
                        help="run the forward under torch.compile(dynamic=True); reports every step's time")
    parser.add_argument("--vary-length", action="store_true",
                        help="a different sequence length per step (seq-len minus 0, 8, 16, 24), as real batches")
    parser.add_argument("--no-frozen-bf16", action="store_true",
                        help="keep the frozen weights fp32 (by default they are held in bf16 where training computes in bf16)")
    parser.add_argument("--sdpa-attention", action="store_true",
                        help="fused attention at every length (by default short sequences in bf16 on a CPU run the "
                             "explicit products, as crashlm train does)")
    parser.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--plans", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    defaults = dict(batch_size=(2, 8), seq_len=(64, 128), steps=(1, 5), warmup=(1, 1), similarity_samples=(16, 64))
    for name, (quick, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = sorted(set(args.configs) - set(CONFIGS))
    if unknown or not args.configs:
        parser.error(f"--configs: choose among {', '.join(CONFIGS)}, got {', '.join(unknown) or 'none'}")
    if args.vary_length and args.seq_len - 24 <= args.answer_len:
        parser.error("--vary-length needs --seq-len at least --answer-len + 25")
    return args


def forwarded(args) -> list[str]:
    options = ["--model", args.model, "--device", args.device, "--batch-size", str(args.batch_size),
               "--seq-len", str(args.seq_len), "--answer-len", str(args.answer_len), "--steps", str(args.steps),
               "--warmup", str(args.warmup)]
    options += ["--threads", str(args.threads)] if args.threads else []
    options += [flag for flag, on in (("--profile", args.profile), ("--compile", args.compile),
                                      ("--vary-length", args.vary_length), ("--no-frozen-bf16", args.no_frozen_bf16),
                                      ("--sdpa-attention", args.sdpa_attention)) if on]
    return options + (["--random-init"] if args.random_init else [])


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {os.cpu_count()} cores, torch {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}"


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    started = time.perf_counter()
    from crashlm.training.runtime import use_bf16

    device = torch.device(args.device)
    bf16 = use_bf16(True, device)
    peaks = {"bf16": matmul_peak(device, torch.bfloat16), "fp32": matmul_peak(device, torch.float32)}
    peak = peaks["bf16" if bf16 else "fp32"]
    model = load(args.model, args.random_init)
    plans, plan_source = make_plans(model, args)
    del model
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        plan_file = Path(tmp) / "plans.json"
        plan_file.write_text(json.dumps(plans))
        for config in args.configs:
            cmd = [sys.executable, __file__, "--worker", config, "--plans", str(plan_file), *forwarded(args)]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0:
                sys.exit(f"worker {config} failed:\n{result.stderr[-3000:]}")
            rows[config] = json.loads(result.stdout.strip().splitlines()[-1])
    full = rows.get("full")
    for row in rows.values():
        row["utilisation"] = row["achieved_flops"] / peak
        row["utilisation_vs_bf16_peak"] = row["achieved_flops"] / peaks["bf16"]
        if full:
            row["speedup_vs_full"] = row["tokens_per_second"] / full["tokens_per_second"]
            row["memory_vs_full"] = row["peak_memory_bytes"] / full["peak_memory_bytes"]

    print(f"{args.model}{' (random init)' if args.random_init else ''} on {machine(device)}; "
          f"batch {args.batch_size} x {args.seq_len} tokens ({args.answer_len} answer), {args.steps} timed steps")
    print(f"matmul peak: bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s, fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s; "
          f"training computes in {'bf16 (autocast)' if bf16 else 'fp32 (no native bf16 here)'}; utilisation is "
          f"against that peak")
    print(f"crash plans from {plan_source}")
    print(f"{'config':<12}{'positions':>10}{'trainable':>12}{'tokens/s':>10}{'x full':>8}{'peak MiB':>10}"
          f"{'x full':>8}{'GFLOP/s':>9}{'util':>7}")
    for name, row in rows.items():
        print(f"{name:<12}{row['positions']:>10}{row['trainable_parameters']:>12,}{row['tokens_per_second']:>10.0f}"
              f"{row.get('speedup_vs_full', float('nan')):>8.2f}{row['peak_memory_bytes'] / 2**20:>10.0f}"
              f"{row.get('memory_vs_full', float('nan')):>8.2f}"
              f"{row['achieved_flops'] / 1e9:>9.1f}{100 * row['utilisation']:>6.1f}%")
    if args.compile or args.vary_length:
        for name, row in rows.items():
            steps = ", ".join(f"{t:.2f} s ({n})" for t, n in zip(row["every_step_seconds"], row["step_lengths"]))
            print(f"{name}: every step, warm-up first (length): {steps}")
    print("frozen parameters held in bf16: " + ", ".join(
        f"{name} {row['frozen_parameters_in_bf16']}" for name, row in rows.items())
          + ("" if bf16 else " (none: training computes in fp32 here)"))
    print("attention: " + ", ".join(f"{name} {row['attention']}" for name, row in rows.items()))
    if args.profile:
        for name, row in rows.items():
            print(format_breakdown(f"{name} (profiled)", row["profile"]))
            print(f"  matmuls themselves: {row['matmul_flops'] / 1e9:.1f} GFLOP/s, {100 * row['matmul_flops'] / peak:.0f} % "
                  f"of the peak")
    summary = {
        "benchmark": "bench_train", "model": args.model, "random_init": args.random_init, "device": str(device),
        "machine": machine(device), "quick": args.quick, "batch_size": args.batch_size, "seq_len": args.seq_len,
        "answer_len": args.answer_len, "steps": args.steps, "compute_dtype": "bf16" if bf16 else "fp32",
        "compile": args.compile, "vary_length": args.vary_length, "frozen_bf16": bf16 and not args.no_frozen_bf16,
        "sdpa_attention": args.sdpa_attention,
        "bf16_matmul_peak_flops": peaks["bf16"], "fp32_matmul_peak_flops": peaks["fp32"], "plan_source": plan_source,
        "kept_layers": {name: plans[name]["kept"] for name in ("uniform", "crash")},
        "trainable_layers": {name: plans[name]["trainable"] for name in ("uniform", "crash")},
        "results": rows, "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
