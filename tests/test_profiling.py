"""The benchmarks' step profiler (benchmarks/profiling.py): categories and matmul rate."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from profiling import CATEGORIES, breakdown, matmul_rate, profile_steps, record_function  # noqa: E402

VOCAB = 997  # a dimension no other tensor here has


def test_breakdown_puts_each_part_of_a_step_in_its_category():
    torch.manual_seed(0)
    body, head = torch.nn.Linear(64, 64), torch.nn.Linear(64, VOCAB, bias=False)
    optimizer = torch.optim.AdamW([*body.parameters(), *head.parameters()])
    x, y = torch.randn(256, 64), torch.randint(0, VOCAB, (256,))

    def step():
        hidden = torch.relu(body(x))
        loss = torch.nn.functional.cross_entropy(hidden @ head.weight.t(), y)
        loss.backward()
        with record_function("optimizer"):
            optimizer.step()
            optimizer.zero_grad()

    step()
    prof, seconds = profile_steps(step, 3)
    parts = breakdown(prof, seconds, 3, VOCAB)
    assert set(parts) == set(CATEGORIES)
    assert sum(parts.values()) >= seconds * 0.999  # "python" takes what the operators leave
    for name in ("matmul", "lm head", "loss", "optimizer", "elementwise"):
        assert parts[name] > 0, name
    # 2 * 256 * 64 * 64 forward matmul FLOPs at least were timed: a positive, finite rate.
    assert 0 < matmul_rate(prof) < float("inf")
