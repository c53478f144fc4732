"""The paper's comparison table from one command: plans, emulators, training, plug-in, evaluation.

For every task, strategy and seed the pipeline runs, in order: the layer plan, the emulator
bundle (what the model owner would send), zero-shot evaluation of the emulator (Emu ZS), adapter
training on the emulator, evaluation of the emulator with the adapter (Emu FT) and of the full
model with the adapter plugged in (Plug-in); plus the full model zero-shot (Full ZS) and full
fine-tuning (Full FT). Each step's output file is its checkpoint: a re-run skips what exists,
so an interrupted run continues where it stopped.

Layout of ``RUN_DIR``::

    config.json                       the configuration (a re-run must match it)
    <task>/full_zs.json               evaluation results (one JSON per evaluation)
    <task>/full_ft/seed<s>/model/     fully fine-tuned model, and eval.json beside it
    <task>/similarity/                layer similarity of the task's training inputs (CRaSh)
    <task>/<strategy>/plan.json       layer plan, clusters.png beside it
    <task>/<strategy>/emulator/       emulator bundle; emu_zs.json beside it
    <task>/<strategy>/seed<s>/adapter/  trained adapter; emu_ft.json, plugin.json beside it
    table.json, table.md, table.png   the table
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

from rich.console import Console

from crashlm.core.assets import DEFAULT_MODEL
from crashlm.core.errors import UsageError
from crashlm.core.io import read_json, write_json
from crashlm.emulators import plans
from crashlm.outputs.tables import table_markdown

STRATEGY_NAMES = {
    "uniform": "Uniform",
    "crash": "CRaSh w/o sharing",
    "crash-share": "CRaSh",
    "uniform-kd": "OFT + KD",
}
# Fields that change what a finished step would have produced; a re-run must keep them.
_FROZEN_FIELDS = (
    "model", "k", "trainable", "similarity_samples", "train_samples", "val_samples", "epochs",
    "max_steps", "lr", "batch_size", "grad_accum", "eval_every", "eval_limit", "eval_split", "distill_steps",
    "max_length",
)


@dataclass
class OffsiteConfig:
    """Everything that defines a table run (stored as ``RUN_DIR/config.json``)."""

    model: str = DEFAULT_MODEL
    tasks: list[str] = field(default_factory=lambda: ["piqa"])
    strategies: list[str] = field(default_factory=lambda: ["uniform", "crash", "crash-share"])
    full_ft: bool = True
    distill: bool = False
    k: int | None = None
    trainable: int = plans.DEFAULT_TRAINABLE
    similarity_samples: int = 128
    train_samples: int | None = 2000
    val_samples: int = 200
    epochs: int = 1
    max_steps: int | None = None
    lr: float = 1e-4
    batch_size: int = 8
    grad_accum: int = 1
    eval_every: int | None = None  # validation loss every K steps; None: once per epoch
    eval_limit: int | None = 300
    eval_split: str | None = None
    seeds: list[int] = field(default_factory=lambda: [1])
    distill_steps: int = 100
    max_length: int = 256

    def validate(self) -> None:
        from crashlm.core.tasks import get_task
        from crashlm.emulators.emulator import EMULATOR_STRATEGIES

        for task in self.tasks:
            spec = get_task(task)
            if "train" not in spec.splits():
                raise UsageError(f"task {task} has no train split here (evaluation only); offsite needs trainable tasks")
            if self.eval_split is not None and self.eval_split not in spec.splits():
                raise UsageError(f"task {task} has no {self.eval_split!r} split; available: {', '.join(spec.splits())}")
        unknown = [s for s in self.strategies if s not in EMULATOR_STRATEGIES]
        if unknown:
            raise UsageError(f"unknown strategies {', '.join(unknown)}; choose from {', '.join(EMULATOR_STRATEGIES)}")
        if not self.strategies and not self.full_ft:
            raise UsageError("nothing to run: give strategies or --full-ft")
        for name in ("trainable", "similarity_samples", "val_samples", "epochs", "batch_size", "grad_accum",
                     "distill_steps", "max_length"):
            if getattr(self, name) <= 0:
                raise UsageError(f"{name.replace('_', '-')} must be positive")
        for name in ("train_samples", "max_steps", "eval_every", "eval_limit", "k"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UsageError(f"{name.replace('_', '-')} must be positive")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise UsageError("seeds must be distinct and at least one")
        from crashlm.core.models import load_config

        depth = load_config(self.model).num_hidden_layers  # a missing or unsupported model fails here, fast
        if self.strategies or self.distill:
            plans.check_k(plans.default_k(depth) if self.k is None else self.k, depth, self.trainable)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "OffsiteConfig":
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})

    def strategy_runs(self) -> list[str]:
        """Strategies to run, with the distilled uniform emulator (OFT + KD) when asked."""
        return list(self.strategies) + (["uniform-kd"] if self.distill else [])


def _check_run_dir(run_dir: Path, config: OffsiteConfig) -> None:
    """A run directory belongs to one configuration; tasks, strategies and seeds may grow."""
    path = run_dir / "config.json"
    if path.exists():
        old = read_json(path, "run configuration")
        changed = [name for name in _FROZEN_FIELDS if old.get(name) != getattr(config, name)]
        if changed:
            raise UsageError(
                f"{run_dir} holds a run with other settings ({', '.join(changed)}); choose another --out"
            )
    elif run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise UsageError(f"{run_dir} exists and is not a crashlm offsite run; choose another --out")
    write_json(path, config.to_dict())


class Pipeline:
    """Runs the steps of one table; every step is skipped when its output already exists."""

    def __init__(self, config: OffsiteConfig, run_dir: Path, console: Console | None = None):
        self.config = config
        self.run_dir = Path(run_dir)
        self.console = console or Console()

    # -- helpers ---------------------------------------------------------------------------

    def _step(self, output: Path, label: str, work: Callable[[], None]) -> Path:
        if output.exists():
            self.console.print(f"[dim]skip[/dim] {label} ({output.relative_to(self.run_dir)} exists)")
        else:
            self.console.print(f"[bold]run[/bold]  {label}")
            work()
        return output

    def _train_config(self, task: str, seed: int):
        from crashlm.training.loop import TrainConfig

        c = self.config
        return TrainConfig(
            task=task, train_samples=c.train_samples, val_samples=c.val_samples, epochs=c.epochs,
            max_steps=c.max_steps, lr=c.lr, batch_size=c.batch_size, grad_accum=c.grad_accum, seed=seed,
            eval_every=c.eval_every, max_length=c.max_length,
        )

    def _evaluate(self, out: Path, task: str, **target) -> None:
        from crashlm.emulators.plugin import load_target
        from crashlm.evaluation.run import evaluate

        model, tokenizer, description = load_target(**target)
        result = evaluate(model, tokenizer, [task], limit=self.config.eval_limit, split=self.config.eval_split,
                          batch_size=16, description=description, max_length=self.config.max_length)
        result.save(out)

    # -- steps -----------------------------------------------------------------------------

    def full_model_rows(self, task: str) -> None:
        c = self.config
        self._step(self.run_dir / task / "full_zs.json", f"{task}: full model zero-shot",
                   lambda: self._evaluate(self.run_dir / task / "full_zs.json", task, model=c.model))
        if not c.full_ft:
            return
        from crashlm.core.models import load_model
        from crashlm.training.loop import train_full

        for seed in c.seeds:
            seed_dir = self.run_dir / task / "full_ft" / f"seed{seed}"

            def train(seed=seed, seed_dir=seed_dir):
                model, tokenizer = load_model(c.model)
                train_full(model, tokenizer, self._train_config(task, seed), seed_dir / "model", resume=True)

            self._step(seed_dir / "model", f"{task}: full fine-tuning, seed {seed}", train)
            self._step(seed_dir / "eval.json", f"{task}: full FT evaluation, seed {seed}",
                       lambda seed_dir=seed_dir: self._evaluate(seed_dir / "eval.json", task, model=str(seed_dir / "model")))

    def similarity(self, task: str):
        """The task's layer similarity, computed once and shared by the CRaSh strategies.

        It runs on the task's training inputs, never on evaluation items.
        """
        from crashlm.analysis.similarity import SimilarityResult, compute_similarity

        c = self.config
        path = self.run_dir / task / "similarity" / "similarity.json"

        def compute() -> None:
            compute_similarity(c.model, task=task, samples=c.similarity_samples, split="train").save(path.parent)

        self._step(path, f"{task}: layer similarity (CKA)", compute)
        return SimilarityResult.load(path)

    def strategy_rows(self, task: str, strategy: str) -> None:
        c = self.config
        base = "uniform" if strategy == "uniform-kd" else strategy
        sdir = self.run_dir / task / strategy
        bundle = sdir / "emulator"

        def build() -> None:
            from crashlm.core.models import load_model
            from crashlm.core.tasks import load_examples
            from crashlm.emulators.emulator import (
                build_emulator,
                make_plan,
                save_bundle,
            )
            from crashlm.outputs.plotting import plot_clusters

            similarity = None if base == "uniform" else self.similarity(task)
            model, tokenizer = load_model(c.model)
            plan = make_plan(model, base, k=c.k, trainable=c.trainable, similarity=similarity, task=task, model_name=c.model)
            plan.save(sdir / "plan.json")
            plot_clusters(plan, sdir / "clusters.png", matrix=similarity.cka if similarity else None)
            emulator = build_emulator(model, tokenizer, plan, sharing=base == "crash-share")
            if strategy == "uniform-kd":
                from crashlm.training.loop import distill_emulator

                teacher, _ = load_model(c.model)
                texts = [ex.context for ex in load_examples("boolq", "train", limit=c.distill_steps * c.batch_size)]
                emulator = distill_emulator(teacher, emulator, texts, steps=c.distill_steps, batch_size=c.batch_size)
            save_bundle(emulator, bundle)

        self._step(bundle, f"{task}: {strategy} emulator", build)
        self._step(sdir / "emu_zs.json", f"{task}: {strategy} emulator zero-shot",
                   lambda: self._evaluate(sdir / "emu_zs.json", task, emulator=str(bundle)))
        for seed in c.seeds:
            seed_dir = sdir / f"seed{seed}"
            adapter = seed_dir / "adapter"

            def train(seed=seed, adapter=adapter):
                from crashlm.emulators.emulator import load_emulator
                from crashlm.training.loop import train_adapter

                train_adapter(load_emulator(bundle), self._train_config(task, seed), adapter, resume=True)

            self._step(adapter, f"{task}: {strategy} adapter training, seed {seed}", train)
            self._step(seed_dir / "emu_ft.json", f"{task}: {strategy} emulator + adapter, seed {seed}",
                       lambda seed_dir=seed_dir, adapter=adapter: self._evaluate(
                           seed_dir / "emu_ft.json", task, emulator=str(bundle), adapter=str(adapter)))
            self._step(seed_dir / "plugin.json", f"{task}: {strategy} plug-in, seed {seed}",
                       lambda seed_dir=seed_dir, adapter=adapter: self._evaluate(
                           seed_dir / "plugin.json", task, model=c.model, adapter=str(adapter)))

    def run(self) -> dict:
        self.config.validate()
        _check_run_dir(self.run_dir, self.config)
        for task in self.config.tasks:
            self.full_model_rows(task)
            for strategy in self.config.strategy_runs():
                self.strategy_rows(task, strategy)
        from crashlm.outputs.report import write_report

        table = build_table(self.run_dir, self.config)
        write_table(self.run_dir, table)
        write_report(self.run_dir)
        return table


# ---------------------------------------------------------------------------------------------
# The table


def _acc(path: Path, task: str) -> float:
    return float(read_json(path, "evaluation result")["scores"][task]["acc"])


def _row(name: str, per_task: dict[str, list[float]]) -> dict:
    scores = {t: statistics.fmean(v) for t, v in per_task.items() if v}
    spread = {t: (statistics.stdev(v) if len(v) > 1 else 0.0) for t, v in per_task.items() if v}
    complete = len(scores) == len(per_task)
    return {
        "name": name,
        "scores": scores,
        "spread": spread,
        "runs": {t: len(v) for t, v in per_task.items()},
        "average": statistics.fmean(scores.values()) if complete and scores else None,
    }


def build_table(run_dir: Path, config: OffsiteConfig) -> dict:
    """Collect every finished evaluation under ``run_dir`` into the table's rows."""
    tasks = list(config.tasks)

    def collect(relative: Callable[[int], str] | str) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {}
        for task in tasks:
            paths = [run_dir / task / relative] if isinstance(relative, str) else [run_dir / task / relative(s) for s in config.seeds]
            out[task] = [_acc(p, task) for p in paths if p.exists()]
        return out

    rows = [_row("Full ZS", collect("full_zs.json"))]
    if config.full_ft:
        rows.append(_row("Full FT", collect(lambda s: f"full_ft/seed{s}/eval.json")))
    for strategy in config.strategy_runs():
        label = STRATEGY_NAMES[strategy]
        rows.append(_row(f"{label}, Emu ZS", collect(f"{strategy}/emu_zs.json")))
        rows.append(_row(f"{label}, Emu FT", collect(lambda s, st=strategy: f"{st}/seed{s}/emu_ft.json")))
        rows.append(_row(f"{label}, Plug-in", collect(lambda s, st=strategy: f"{st}/seed{s}/plugin.json")))
    zs = rows[0]["average"]
    ft = rows[1]["average"] if config.full_ft else None
    for row in rows:
        # Share of the full fine-tuning gain that a plug-in recovers (as CRaSh, Zhang et al. 2023, reports it).
        if row["name"].endswith("Plug-in") and None not in (zs, ft, row["average"]) and not math.isclose(ft, zs):
            row["gain_recovered"] = (row["average"] - zs) / (ft - zs)
    return {"model": config.model, "tasks": tasks, "seeds": list(config.seeds), "metric": "acc", "rows": rows,
            "config": config.to_dict()}


def write_table(run_dir: Path, table: dict) -> None:
    from crashlm.core.io import atomic_path
    from crashlm.outputs.plotting import plot_offsite_table

    write_json(run_dir / "table.json", table)
    with atomic_path(run_dir / "table.md") as tmp:
        tmp.write_text(table_markdown(table), encoding="utf-8")
    plot_offsite_table(table, run_dir / "table.png")


def run_offsite(config: OffsiteConfig, run_dir: str | Path, console: Console | None = None) -> dict:
    """Run (or continue) a table run and return the table."""
    return Pipeline(config, Path(run_dir), console).run()
