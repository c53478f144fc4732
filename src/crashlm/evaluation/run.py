"""Evaluation runs: lm-eval's evaluator over :class:`~crashlm.evaluation.lm.CrashlmLM`, and their results.

lm-eval builds the requests and computes the metrics (acc, acc_norm, their standard errors)
from task configs made from our registry (:func:`crashlm.core.tasks.lm_eval_task_config`), so the
items and their formatting are exactly those the emulators are trained on.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence
from unittest import mock

import datasets
import lm_eval
import lm_eval.api.task
import torch
from lm_eval.evaluator import evaluate as lm_eval_evaluate
from lm_eval.tasks import TaskManager
from torch import nn
from tqdm.auto import tqdm

from crashlm import __version__
from crashlm.core.errors import RunFailure, UsageError
from crashlm.core.io import read_json, write_json
from crashlm.core.settings import check_choice
from crashlm.core.tasks import SOURCES, get_task, lm_eval_task_config
from crashlm.evaluation.lm import CrashlmLM, weights_dtype

RESULT_FORMAT = "crashlm-eval"
METRICS = ("acc", "acc_norm")


# ---------------------------------------------------------------------------------------------
# Results


@dataclass
class EvalResult:
    """Scores per task (acc, acc_norm, their standard errors, n), the exact configuration,
    lm-eval's own results for the tasks, and per-item log-likelihoods."""

    scores: dict[str, dict[str, float]]
    config: dict[str, Any]
    lm_eval: dict[str, Any]
    items: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"format": RESULT_FORMAT, "scores": self.scores, "config": self.config, "lm_eval": self.lm_eval,
                "items": self.items}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalResult:
        return cls(data["scores"], data["config"], data.get("lm_eval", {}), data.get("items", {}))

    def save(self, path: str | Path) -> Path:
        """Write the result as JSON, atomically."""
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> EvalResult:
        data = read_json(path, "evaluation result")
        if not isinstance(data, dict) or not isinstance(data.get("scores"), dict) or "config" not in data:
            raise UsageError(f"{path} is not a crashlm evaluation result (no scores/config)")
        return cls.from_dict(data)


# ---------------------------------------------------------------------------------------------
# Evaluation


def resolve_splits(tasks: Sequence[str], split: str | None = None, source: str = "offline") -> dict[str, str]:
    """The split each task is evaluated on (``split``, else the task's evaluation split);
    UsageError for unknown or repeated tasks and missing splits, before any model is loaded."""
    if not tasks:
        raise UsageError("give at least one task")
    if len(set(tasks)) != len(tasks):
        raise UsageError(f"a task is listed twice: {', '.join(tasks)}")
    check_choice(source, SOURCES, "data source")
    splits = {}
    for task in tasks:
        spec = get_task(task)
        splits[task] = split or spec.eval_split
        if splits[task] not in spec.splits(source):
            raise UsageError(f"task {task} has no {splits[task]!r} split ({source}); available: {', '.join(spec.splits(source))}")
    return splits


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """Silence lm-eval's and datasets' INFO/WARNING chatter and their progress bars (lm-eval's
    unlabelled per-task "building requests" bar included); only the scoring bar remains."""
    logger = logging.getLogger("lm_eval")
    level, bars = logger.level, datasets.utils.logging.is_progress_bar_enabled()
    verbosity = datasets.utils.logging.get_verbosity()
    logger.setLevel(logging.ERROR)
    datasets.utils.logging.set_verbosity_error()
    datasets.utils.logging.disable_progress_bar()
    try:
        with mock.patch.object(lm_eval.api.task, "tqdm", functools.partial(tqdm, disable=True)):
            yield
    finally:
        logger.setLevel(level)
        datasets.utils.logging.set_verbosity(verbosity)
        if bars:
            datasets.utils.logging.enable_progress_bar()


def _jsonable(value: Any) -> Any:
    """Keep what JSON can hold; numpy values become numbers, anything else (functions) a string."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return _jsonable(value.tolist())
    return str(value)


def _items(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "doc_id": s["doc"].get("doc_id", s["doc_id"]),
            "gold": int(s["target"]),
            "loglikelihoods": [float(r[0]) for r in s["filtered_resps"]],
            "acc": float(s["acc"]),
            "acc_norm": float(s["acc_norm"]),
        }
        for s in sorted(samples, key=lambda s: s["doc_id"])
    ]


def evaluate(
    model: nn.Module,
    tokenizer,
    tasks: Sequence[str],
    limit: int | None = None,
    split: str | None = None,
    batch_size: int = 16,
    description: dict | None = None,
    dtype: torch.dtype | None = None,
    source: str = "offline",
    progress: bool = True,
    max_length: int | None = None,
) -> EvalResult:
    """Zero-shot acc / acc_norm of ``model`` on the first ``limit`` items of each task's split.

    ``split`` None means each task's evaluation split (``TaskSpec.eval_split``); ``dtype`` None
    means bf16 autocast on native-bf16 hardware, else the weights' dtype. ``max_length`` caps
    the tokens read per request (None: the model's limit, as lm-eval); give training's
    ``max_length`` to score exactly what an adapter was trained and selected on. lm-eval's core
    ``evaluator.evaluate`` runs the tasks (``simple_evaluate`` would also reseed the global RNGs
    and spend seconds collecting environment details on every call).
    """
    splits = resolve_splits(list(tasks), split, source)
    lm = CrashlmLM(model, tokenizer, batch_size=batch_size, dtype=dtype, progress=progress, max_length=max_length)
    configs = {task: dict(lm_eval_task_config(task, splits[task], limit, source), num_fewshot=0) for task in splits}
    with _quiet_lm_eval():
        loaded = TaskManager(include_defaults=False).load(list(configs.values()))
        output = lm_eval_evaluate(lm=lm, task_dict=loaded, bootstrap_iters=1000, log_samples=True)
    if output is None:
        raise RunFailure("lm-eval returned no results")
    scores, items = {}, {}
    for task, config in configs.items():
        name = config["task"]
        numbers = output["results"][name]
        scores[task] = {key: float(numbers[f"{key},none"]) for m in METRICS for key in (m, f"{m}_stderr")}
        scores[task]["n"] = int(output["n-samples"][name]["effective"])
        items[task] = _items(output["samples"][name])
    names = [configs[t]["task"] for t in configs]
    run_config = {
        "tasks": list(splits),
        "splits": splits,
        "limit": limit,
        "batch_size": batch_size,
        "dtype": str(lm.dtype).removeprefix("torch."),
        "weights_dtype": str(weights_dtype(model)).removeprefix("torch."),
        "autocast": lm.autocast,
        "packed": lm.packed,
        "max_length": lm.max_length,
        "truncated_requests": lm.truncated,
        "device": str(lm.device),
        "num_fewshot": 0,
        "source": source,
        "lm_eval_version": lm_eval.__version__,
        "crashlm_version": __version__,
        "torch_version": torch.__version__,
        "model": description or {},
    }
    lm_eval_part = {key: {n: output[key][n] for n in names if n in output.get(key, {})}
                    for key in ("results", "configs", "versions", "n-shot", "higher_is_better", "n-samples")}
    return EvalResult(scores, run_config, _jsonable(lm_eval_part), items)
