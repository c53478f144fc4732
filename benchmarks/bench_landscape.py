"""2D loss-landscape points per second: in-place updates vs a deep copy of the model per point.

crashlm keeps ONE working model and writes each grid point into the parameters that move
(``Subspace.write``), restoring the origin at the end. The common way (the ``loss-landscapes``
library's) deep-copies the model for each point and writes theta into the copy. Both here
evaluate the same grid with the same ``Subspace`` arithmetic and the same loss
(``mean_answer_loss`` on validation items, fp32), so they must agree, and the working model must
hold the origin again at the end. The methods alternate point by point, so on a shared machine
both see the same load.

The plane: origin = the model, x = every weight perturbed (like full fine-tuning), y = four
layers perturbed (like a plugged-in adapter).

    .venv/bin/python benchmarks/bench_landscape.py [--quick] [--model smollm2-135m] [--random-init]

The last printed line is one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time

import torch
from tqdm.auto import tqdm

from crashlm.analysis.subspace import Subspace, grid_axis
from crashlm.core.models import get_layers, load_model, load_tokenizer, resolve_model
from crashlm.core.scoring import mean_answer_loss
from crashlm.core.tasks import load_examples


def _load(spec: str, random_init: bool):
    if not random_init:
        return load_model(spec, dtype=torch.float32)
    from transformers import AutoConfig, AutoModelForCausalLM

    source = resolve_model(spec)
    config = AutoConfig.from_pretrained(source)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval(), load_tokenizer(source)


@torch.no_grad()
def _perturbed(model, layers: list[int] | None, seed: int, scale: float = 0.01):
    """A copy of ``model`` with the weights of ``layers`` (all if None) moved by noise of ``scale`` x their std."""
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    modules = [other] if layers is None else [get_layers(other)[i] for i in layers]
    for module in modules:
        for param in module.parameters():
            std = param.std() if param.numel() > 1 else param.abs()
            param.add_(scale * std * torch.randn(param.shape, generator=generator).to(param.device))
    return other


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="Model spec (default: smollm2-135m).")
    parser.add_argument("--random-init", action="store_true", help="Random weights from the model's config.")
    parser.add_argument("--task", default="piqa", help="Validation items of this task (default: piqa).")
    parser.add_argument("--items", type=int, default=8, help="Validation items per point (default: 8; quick: 4).")
    parser.add_argument("--grid", type=int, default=4, help="Points per axis (default: 4 on -1..2; quick: 2 on 0..1).")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice).")
    parser.add_argument("--quick", action="store_true", help="A run of under a minute: 4 items, the 2x2 grid of the anchors.")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    items, grid, (lo, hi) = (4, 2, (0.0, 1.0)) if args.quick else (args.items, args.grid, (-1.0, 2.0))

    model, tokenizer = _load(args.model, args.random_init)
    examples = load_examples(args.task, "validation", items)
    n_layers = len(get_layers(model))
    plug_in_layers = sorted({0, n_layers // 3, 2 * n_layers // 3, n_layers - 1})
    x, y = _perturbed(model, None, seed=1), _perturbed(model, plug_in_layers, seed=2)
    subspace = Subspace.between(model, x, y)
    del x, y
    axis = grid_axis(lo, hi, grid)
    points = [(a, b) for b in axis for a in axis]

    def evaluate(m) -> float:
        return mean_answer_loss(m, tokenizer, examples, batch_size=len(examples))

    evaluate(model)  # warm-up: first-call allocations are not part of either method
    pristine = copy.deepcopy(model)  # what the copying method copies from; also checks the restore
    inplace, copied, seconds = {}, {}, {"inplace": 0.0, "copy": 0.0}
    # The two methods alternate point by point, so both see the same load on a shared machine.
    for point in tqdm(points, desc="points", unit="point"):
        start = time.perf_counter()
        subspace.write(model, point)
        inplace[point] = evaluate(model)
        seconds["inplace"] += time.perf_counter() - start

        start = time.perf_counter()
        working = copy.deepcopy(pristine)
        subspace.write(working, point)
        copied[point] = evaluate(working)
        del working
        seconds["copy"] += time.perf_counter() - start
    subspace.restore(model)
    restored = all(torch.equal(p, q) for p, q in zip(model.parameters(), pristine.parameters()))
    assert restored, "the in-place sweep did not restore the origin"

    max_abs_diff = max(abs(inplace[p] - copied[p]) for p in points)
    assert max_abs_diff <= 1e-6, f"in-place and copied losses differ by {max_abs_diff}"
    moving = sum(t.numel() for t in subspace.origin.values())
    # Memory besides the working model: the subspace (origin copy + directions) for both methods,
    # and for the copying one the model it copies from as well.
    extra = sum(t.numel() * t.element_size() for d in (subspace.origin, *subspace.vectors) for t in d.values())
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    result = {
        "benchmark": "landscape_2d",
        "model": args.model + (" (random init)" if args.random_init else ""),
        "task": args.task,
        "items": len(examples),
        "grid": f"{grid}x{grid} on [{lo}, {hi}]",
        "points": len(points),
        "parameters": sum(p.numel() for p in model.parameters()),
        "moving_parameters": moving,
        "points_per_s_inplace": round(len(points) / seconds["inplace"], 4),
        "points_per_s_copy": round(len(points) / seconds["copy"], 4),
        "speedup": round(seconds["copy"] / seconds["inplace"], 3),
        "copy_overhead_s_per_point": round((seconds["copy"] - seconds["inplace"]) / len(points), 4),
        "extra_bytes_inplace": extra,
        "extra_bytes_copy": extra + model_bytes,
        "max_abs_diff": max_abs_diff,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
