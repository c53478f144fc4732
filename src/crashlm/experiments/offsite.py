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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, ClassVar

from rich.console import Console
from torch import nn

from crashlm.analysis.similarity import SimilarityResult, compute_similarity
from crashlm.core.assets import DEFAULT_MODEL
from crashlm.core.errors import UsageError
from crashlm.core.io import atomic_path, read_json, write_json
from crashlm.core.models import load_config, load_model
from crashlm.core.settings import Settings, setting
from crashlm.core.tasks import ANALYSIS_SPLIT, get_task
from crashlm.emulators import plans
from crashlm.emulators.bundle import load_emulator, save_bundle
from crashlm.emulators.distill import DistillConfig, distill_emulator, distillation_texts
from crashlm.emulators.emulator import build_emulator
from crashlm.emulators.finetune import train_adapter
from crashlm.emulators.strategies import SIMILARITY, STRATEGIES, get_strategy, plan_for
from crashlm.emulators.targets import resolve_target
from crashlm.evaluation.run import evaluate
from crashlm.outputs.plotting import plot_clusters, plot_offsite_table
from crashlm.outputs.report import write_report
from crashlm.outputs.tables import table_markdown
from crashlm.training.config import TrainConfig
from crashlm.training.full import train_full

# The OFT + KD row: the uniform emulator distilled from the full model before training.
DISTILLED_RUN, DISTILLED_BASE, DISTILLED_LABEL = "uniform-kd", "uniform", "OFT + KD"
# What a re-run may change: tasks, strategies and seeds may grow. Every other setting decides what
# a finished step produced (the checkpoint frequency of training does not).
_GROWING_FIELDS = ("tasks", "strategies", "seeds", "full_ft", "distill")


def _offsite_training() -> TrainConfig:
    return TrainConfig(train_samples=2000)


@dataclass
class OffsiteConfig(Settings):
    """Everything that defines a table run (stored as ``RUN_DIR/config.json``).

    ``train`` is the training of every adapter and full fine-tuning of the table; its task and
    seed are set per run from ``tasks`` and ``seeds``.
    """

    what: ClassVar[str] = "offsite"

    model: str = setting(DEFAULT_MODEL, "Base model (alias, HF directory, .gguf file or hub id).")
    tasks: list[str] = setting(help="Tasks (each needs a train split).", factory=lambda: ["piqa"])
    strategies: list[str] = setting(help=f"Emulator strategies: {', '.join(STRATEGIES)}.",
                                    factory=lambda: ["uniform", "crash", "crash-share"])
    full_ft: bool = setting(True, "Include the full fine-tuning upper baseline.")
    distill: bool = setting(False, "Add the OFT + KD row (the uniform emulator distilled on offline text).")
    k: int | None = setting(None, "Kept layers per emulator. Default: half the layers.")
    trainable: int = setting(plans.DEFAULT_TRAINABLE, "Trainable (adapter) layers.")
    similarity_samples: int = setting(128, "Training examples used for the CRaSh layer similarity.")
    eval_limit: int | None = setting(300, "Evaluation items per task.")
    eval_split: str | None = setting(None, "Evaluation split. Default: each task's paper split.")
    seeds: list[int] = setting(help="Seeds of the trained rows.", factory=lambda: [1])
    distill_steps: int = setting(100, "Distillation steps for --distill.")
    train: TrainConfig = setting(help="Training of the adapters and of full fine-tuning.", factory=_offsite_training)

    def validate(self) -> None:
        for task in self.tasks:
            spec = get_task(task)
            if "train" not in spec.splits():
                raise UsageError(f"task {task} has no train split here (evaluation only); offsite needs trainable tasks")
            if self.eval_split is not None and self.eval_split not in spec.splits():
                raise UsageError(f"task {task} has no {self.eval_split!r} split; available: {', '.join(spec.splits())}")
        unknown = [s for s in self.strategies if s not in STRATEGIES]
        if unknown:
            raise UsageError(f"unknown strategies {', '.join(unknown)}; choose from {', '.join(STRATEGIES)}")
        if not self.strategies and not self.full_ft:
            raise UsageError("nothing to run: give strategies or --full-ft")
        if self.train.lora and self.full_ft:
            raise UsageError("LoRA trains adapter layers, full fine-tuning trains every weight: drop --lora or add --no-full-ft")
        self.check_positive("trainable", "similarity_samples", "distill_steps")
        self.check_positive("eval_limit", "k", optional=True)
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise UsageError("seeds must be distinct and at least one")
        if self.tasks:
            self.training(self.tasks[0], self.seeds[0]).validate()
        depth = load_config(self.model).num_hidden_layers  # a missing or unsupported model fails here, fast
        if self.strategies or self.distill:
            plans.check_k(plans.default_k(depth) if self.k is None else self.k, depth, self.trainable)

    def training(self, task: str, seed: int) -> TrainConfig:
        """The training settings of one (task, seed) run."""
        return replace(self.train, task=task, seed=seed)

    def strategy_runs(self) -> list[str]:
        """Strategies to run, with the distilled uniform emulator (OFT + KD) when asked."""
        return list(self.strategies) + ([DISTILLED_RUN] if self.distill else [])


def _fixed_settings(config: dict, prefix: str = "") -> dict:
    """The settings a re-run must keep, flattened to dotted names (``train.lr``)."""
    fixed = {}
    for key, value in config.items():
        name = prefix + key
        if name in _GROWING_FIELDS or name == "train.checkpoint_every":
            continue
        fixed.update(_fixed_settings(value, name + ".") if isinstance(value, dict) else {name: value})
    return fixed


def _check_run_dir(run_dir: Path, config: OffsiteConfig) -> None:
    """A run directory belongs to one configuration; tasks, strategies and seeds may grow."""
    path = run_dir / "config.json"
    if path.exists():
        old, new = _fixed_settings(read_json(path, "run configuration")), _fixed_settings(config.to_dict())
        changed = [name for name in new if old.get(name) != new[name]]
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

    def _evaluate(self, out: Path, task: str, **target) -> None:

        resolved = resolve_target(**target)
        model, tokenizer, description = resolved.model, resolved.tokenizer, resolved.description
        result = evaluate(model, tokenizer, [task], limit=self.config.eval_limit, split=self.config.eval_split,
                          batch_size=16, description=description, max_length=self.config.train.max_length)
        result.save(out)

    # -- steps -----------------------------------------------------------------------------

    def full_model_rows(self, task: str) -> None:
        c = self.config
        self._step(self.run_dir / task / "full_zs.json", f"{task}: full model zero-shot",
                   lambda: self._evaluate(self.run_dir / task / "full_zs.json", task, model=c.model))
        if not c.full_ft:
            return

        for seed in c.seeds:
            seed_dir = self.run_dir / task / "full_ft" / f"seed{seed}"

            def train(seed=seed, seed_dir=seed_dir):
                model, tokenizer = load_model(c.model)
                train_full(model, tokenizer, self.config.training(task, seed), seed_dir / "model", resume=True)

            self._step(seed_dir / "model", f"{task}: full fine-tuning, seed {seed}", train)
            self._step(seed_dir / "eval.json", f"{task}: full FT evaluation, seed {seed}",
                       lambda seed_dir=seed_dir: self._evaluate(seed_dir / "eval.json", task, model=str(seed_dir / "model")))

    def similarity(self, task: str, model: nn.Module, tokenizer) -> SimilarityResult:
        """The task's layer similarity of the full ``model``, computed once and shared by the CRaSh strategies.

        It runs on the task's training inputs, never on evaluation items.
        """
        c = self.config
        path = self.run_dir / task / "similarity" / "similarity.json"

        def compute() -> None:
            compute_similarity(c.model, task=task, samples=c.similarity_samples, split=ANALYSIS_SPLIT, model=model,
                               tokenizer=tokenizer).save(path.parent)

        self._step(path, f"{task}: layer similarity (CKA)", compute)
        return SimilarityResult.load(path)

    def strategy_rows(self, task: str, strategy: str) -> None:
        c = self.config
        base = get_strategy(DISTILLED_BASE if strategy == DISTILLED_RUN else strategy)
        sdir = self.run_dir / task / strategy
        bundle = sdir / "emulator"

        def build() -> None:
            model, tokenizer = load_model(c.model)
            similarity = self.similarity(task, model, tokenizer) if SIMILARITY in base.needs else None
            plan = plan_for(model, base.name, k=c.k, trainable=c.trainable, similarity=similarity, task=task,
                            model_name=c.model)
            plan.save(sdir / "plan.json")
            plot_clusters(plan, sdir / "clusters.png", matrix=similarity.cka if similarity else None)
            emulator = build_emulator(model, tokenizer, base.spec(plan))
            if strategy == DISTILLED_RUN:
                distillation = DistillConfig(steps=c.distill_steps, batch_size=c.train.batch_size)
                teacher, _ = load_model(c.model)
                emulator = distill_emulator(teacher, emulator, distillation_texts(distillation), distillation)
            save_bundle(emulator, bundle)

        self._step(bundle, f"{task}: {strategy} emulator", build)
        self._step(sdir / "emu_zs.json", f"{task}: {strategy} emulator zero-shot",
                   lambda: self._evaluate(sdir / "emu_zs.json", task, emulator=str(bundle)))
        for seed in c.seeds:
            seed_dir = sdir / f"seed{seed}"
            adapter = seed_dir / "adapter"

            def train(seed=seed, adapter=adapter):

                train_adapter(load_emulator(bundle), self.config.training(task, seed), adapter, resume=True)

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
            if isinstance(relative, str):
                paths = [run_dir / task / relative]
            else:
                paths = [run_dir / task / relative(s) for s in config.seeds]
            out[task] = [_acc(p, task) for p in paths if p.exists()]
        return out

    rows = [_row("Full ZS", collect("full_zs.json"))]
    if config.full_ft:
        rows.append(_row("Full FT", collect(lambda s: f"full_ft/seed{s}/eval.json")))
    for strategy in config.strategy_runs():
        label = DISTILLED_LABEL if strategy == DISTILLED_RUN else get_strategy(strategy).label
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
    write_json(run_dir / "table.json", table)
    with atomic_path(run_dir / "table.md") as tmp:
        tmp.write_text(table_markdown(table), encoding="utf-8")
    plot_offsite_table(table, run_dir / "table.png")


def run_offsite(config: OffsiteConfig, run_dir: str | Path, console: Console | None = None) -> dict:
    """Run (or continue) a table run and return the table."""
    return Pipeline(config, Path(run_dir), console).run()
