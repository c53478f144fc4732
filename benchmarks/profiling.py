"""Where a step's time goes (a torch.profiler trace cut into categories), and this machine's matmul peak.

Each profiled operator's *self* time (its own time, children excluded) goes to one category:

* ``matmul``: mm/addmm/bmm (and the linear/matmul wrappers' own time), the unembedding excepted;
* ``lm head``: the matmuls whose operand has the vocabulary as a dimension;
* ``attention``: scaled-dot-product attention, forward and backward;
* ``loss``: log-softmax, cross-entropy, NLL and their gradients;
* ``casts``: dtype conversions and copies (autocast re-casting weights shows up here);
* ``optimizer``: every operator under the ``optimizer`` and ``clip`` regions (AdamW, clipping);
* ``elementwise``: every other operator (norms, activations, residual adds, rotary, masks);
* ``python``: the step's wall time minus all operators' self time: the interpreter and the
  framework between operators (module calls, hooks, autograd bookkeeping, the data collation).

Self times are summed on the main thread; torch's intra-op threads work inside an operator's
span, so the categories add up to the wall time.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile, record_function

CATEGORIES = ("matmul", "lm head", "attention", "loss", "casts", "optimizer", "elementwise", "python")
MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear", "aten::addmv",
           "aten::mv", "aten::dot")
LOSS = ("log_softmax", "cross_entropy", "nll_loss", "logsumexp")
CASTS = ("aten::to", "aten::_to_copy", "aten::copy_", "aten::type_as", "aten::_autocast_to_reduced_precision",
         "aten::_autocast_to_full_precision", "aten::clone", "aten::contiguous")
REGIONS = ("optimizer", "clip")


def _category(event, vocab: int) -> str:
    name = event.name
    region = event.cpu_parent
    while region is not None:
        if region.name in REGIONS:
            return "optimizer"
        region = region.cpu_parent
    if "scaled_dot_product" in name or "flash_attention" in name:
        return "attention"
    if any(key in name for key in LOSS):
        return "loss"
    if name in MATMULS or (name.startswith("Mm") or name.startswith("AddmmBackward")):
        shapes = [s for s in (event.input_shapes or []) if s]
        return "lm head" if any(vocab in shape for shape in shapes) else "matmul"
    if name in CASTS:
        return "casts"
    return "elementwise"


def matmul_peak(device: torch.device, dtype: torch.dtype, seconds: float = 0.3) -> float:
    """Best FLOP/s of square matmuls of growing size in ``dtype`` (this machine's practical peak).

    Sizes stop growing once one matmul takes longer than ``seconds`` (emulated bf16 is slow)."""
    best = 0.0
    for n in ((256, 512, 1024, 2048) if device.type == "cpu" else (2048, 4096, 8192)):
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        sync(device)
        start = time.perf_counter()
        torch.matmul(a, b)
        sync(device)
        if time.perf_counter() - start > seconds:
            break
        reps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            torch.matmul(a, b)
            reps += 1
        sync(device)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - start))
    return best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_steps(step: Callable[[], None], steps: int) -> tuple[profile, float]:
    """Run ``step`` ``steps`` times under the profiler; returns the profile and the mean wall seconds."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        seconds = (time.perf_counter() - start) / steps
    return prof, seconds


def breakdown(prof: profile, seconds: float, steps: int, vocab: int) -> dict[str, float]:
    """Seconds per step in each of :data:`CATEGORIES` (``python`` is what the operators leave)."""
    totals: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CPU or event.name in REGIONS:
            continue
        totals[_category(event, vocab)] += event.self_cpu_time_total / 1e6 / steps
    operators = sum(totals.values())
    totals["python"] = max(seconds - operators, 0.0)
    return {name: totals.get(name, 0.0) for name in CATEGORIES}


def _matmul_flops(event) -> float:
    shapes = [s for s in (event.input_shapes or []) if s]
    if event.name == "aten::mm" and len(shapes) >= 2 and len(shapes[0]) == 2:
        (m, k), n = shapes[0], shapes[1][-1]
        return 2.0 * m * k * n
    if event.name == "aten::addmm" and len(shapes) >= 3 and len(shapes[1]) == 2:
        (m, k), n = shapes[1], shapes[2][-1]
        return 2.0 * m * k * n
    if event.name == "aten::bmm" and len(shapes) >= 2 and len(shapes[0]) == 3:
        (b, m, k), n = shapes[0], shapes[1][-1]
        return 2.0 * b * m * k * n
    return 0.0


def matmul_rate(prof: profile) -> float:
    """FLOP/s of the profiled mm/addmm/bmm calls (from their shapes) over their own time: how close
    the matrix products themselves come to the machine's peak."""
    flops = seconds = 0.0
    for event in prof.events():
        if (work := _matmul_flops(event)) > 0:
            flops, seconds = flops + work, seconds + event.self_cpu_time_total / 1e6
    return flops / seconds if seconds else 0.0


def format_breakdown(title: str, parts: dict[str, float]) -> str:
    total = sum(parts.values())
    lines = [f"{title}: {1e3 * total:.1f} ms per step", f"  {'category':<12}{'ms':>9}{'share':>8}"]
    for name, value in sorted(parts.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {name:<12}{1e3 * value:>9.1f}{100 * value / max(total, 1e-12):>7.1f}%")
    return "\n".join(lines)


__all__ = ["CATEGORIES", "breakdown", "format_breakdown", "matmul_peak", "matmul_rate", "profile_steps", "record_function",
           "sync"]
