"""The paper's comparison table from one command: plans, emulators, training, plug-in, evaluation.

For every task, strategy and seed the pipeline runs, in order: the layer plan, the emulator
bundle (what the model owner would send, with its fidelity), zero-shot evaluation of the
emulator (Emu ZS), adapter training on the emulator, evaluation of the emulator with the adapter
(Emu FT) and of the full model with the adapter plugged in (Plug-in); plus the full model
zero-shot (Full ZS) and full fine-tuning (Full FT) at the learning rate of its own grid. With
``distill`` every strategy also gets a "+ KD" run on its emulator distilled from the full model.
Each step's output file is its checkpoint: a re-run skips what exists, so an interrupted run
continues where it stopped (training and distillation resume from their last checkpoint).

Layout of ``RUN_DIR``::

    config.json                        the configuration (a re-run must match it)
    <task>/full_zs.json                evaluation results (one JSON per evaluation)
    <task>/full_ft/lr.json             the full fine-tuning learning rate chosen on validation loss
    <task>/full_ft/lr<lr>/seed<s>/model/  fully fine-tuned model, and eval.json beside it
    <task>/similarity/                 layer similarity of the task's training inputs (CRaSh)
    plans/<rule>.json                  plans that read no task data, made once for every task
    <task>/<strategy>/plan.json        layer plan, clusters.png beside it
    fidelity/<key>.json                each distinct emulator's fidelity, copied into its bundles
    <task>/<strategy>/emulator/        emulator bundle; emu_zs.json beside it
    <task>/<strategy>/lr.json          with --adapter-lrs: the adapter learning rate chosen on validation loss
    <task>/<strategy>/lr_grid/lr<lr>/adapter/  with --adapter-lrs: the first seed's adapter at each rate
    <task>/<strategy>/seed<s>/adapter/ trained adapter; emu_ft.json, plugin.json beside it
    <task>/<strategy>-kd/              the same on the distilled emulator (its bundle a copy)
    distilled/<key>/                   one distilled bundle per distinct emulator, for every task and seed
    <task>/training_curves.png         every validation curve of the task
    table.json, table.md, table.png, fidelity.png, report.html
"""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Callable

from rich.console import Console
from torch import nn

from crashlm.analysis.removal import RemovalScores
from crashlm.analysis.similarity import SimilarityResult, compute_similarity
from crashlm.core.errors import UsageError
from crashlm.core.io import atomic_dir, read_json, write_json
from crashlm.core.models import load_model
from crashlm.core.tasks import ANALYSIS_SPLIT
from crashlm.emulators.bundle import MANIFEST, load_emulator, read_records, save_bundle
from crashlm.emulators.distill import calibration_inputs, distill_emulator
from crashlm.emulators.emulator import build_emulator
from crashlm.emulators.fidelity import spec_fidelity
from crashlm.emulators.finetune import train_adapter
from crashlm.emulators.plans import EmulatorSpec, LayerPlan
from crashlm.emulators.plugin import ADAPTER_META
from crashlm.emulators.strategies import (
    CALIBRATION,
    SIMILARITY,
    get_strategy,
    plan_for,
    removal_scores,
)
from crashlm.emulators.targets import resolve_target
from crashlm.evaluation.run import evaluate
from crashlm.experiments.offsite_config import (
    AUTO_K,
    DISTILLED_DIR,
    FIDELITY_DIR,
    KD_SUFFIX,
    LR_CHOICE,
    PLANS_DIR,
    OffsiteConfig,
    adapter_grid_dir,
    base_strategy,
    emulator_key,
    full_ft_dir,
)
from crashlm.experiments.offsite_table import build_table, write_table
from crashlm.outputs.plotting import plot_clusters
from crashlm.outputs.report import write_report
from crashlm.training.full import TRAINING_META, train_full

# What a re-run may change: tasks, strategies and seeds may grow. Every other setting decides what
# a finished step produced (the checkpoint frequency of training does not).
_GROWING_FIELDS = ("tasks", "strategies", "seeds", "full_ft", "distill", "distill_strategies")


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:  # no hard links on this file system
        shutil.copy2(source, target)


def _link_tree(source: Path, target: Path) -> None:
    """Fill ``target`` with ``source``'s files, hard-linked where the file system allows."""
    shutil.copytree(source, target, copy_function=_link_or_copy, dirs_exist_ok=True)


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
        # A setting added after the run was made held its default value there.
        defaults = _fixed_settings(OffsiteConfig().to_dict())
        changed = [name for name in new if old.get(name, defaults.get(name)) != new[name]]
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
        self._scores: RemovalScores | None = None  # one calibration recording for every strategy and task

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

    # -- the full model --------------------------------------------------------------------

    def _train_full(self, task: str, seed: int, lr: float, out: Path) -> None:
        model, tokenizer = load_model(self.config.model)
        train_full(model, tokenizer, replace(self.config.training(task, seed), lr=lr), out, resume=True)

    def _choose_lr(self, path: Path, label: str, lrs: list[float], trained: Callable[[float], Path]) -> float:
        """The learning rate of a grid with the lowest best validation loss; ``trained(lr)`` trains (or
        finds) the first seed's run at ``lr`` and returns its training record. ``path`` records every
        candidate's loss and is the step's checkpoint."""

        def choose() -> None:
            candidates = []
            for lr in lrs:
                record = read_json(trained(lr), "training record")["training"]
                candidates.append({"lr": lr, "best_val_loss": record["best_val_loss"]})
            chosen = min(candidates, key=lambda candidate: candidate["best_val_loss"])["lr"]
            write_json(path, {"seed": self.config.seeds[0], "chosen": chosen, "candidates": candidates})

        self._step(path, f"{label} learning rate of {', '.join(f'{lr:g}' for lr in lrs)}", choose)
        return read_json(path, "learning-rate choice")["chosen"]

    def full_ft_lr(self, task: str) -> float:
        """Full fine-tuning's learning rate for ``task``: the first seed trains once per candidate, the
        lowest best validation loss wins (``<task>/full_ft/lr.json`` records every candidate's)."""
        c, seed = self.config, self.config.seeds[0]

        def trained(lr: float) -> Path:
            model_dir = full_ft_dir(self.run_dir, task, lr, seed) / "model"
            self._step(model_dir, f"{task}: full fine-tuning, lr {lr:g}, seed {seed}",
                       lambda: self._train_full(task, seed, lr, model_dir))
            return model_dir / TRAINING_META

        return self._choose_lr(self.run_dir / task / "full_ft" / LR_CHOICE, f"{task}: full fine-tuning", c.full_ft_lrs,
                               trained)

    def adapter_lr(self, task: str, run: str, bundle: Path) -> float:
        """The adapter's learning rate for ``task`` on the run's emulator: ``--lr``, or with
        ``--adapter-lrs`` the grid's rate of lowest best validation loss on the emulator, each
        candidate trained on the first seed (``<task>/<run>/lr.json`` records every candidate's)."""
        c, seed = self.config, self.config.seeds[0]
        if not c.adapter_lrs:
            return c.train.lr

        def trained(lr: float) -> Path:
            adapter = adapter_grid_dir(self.run_dir, task, run, lr)
            self._step(adapter, f"{task}: {run} adapter training, lr {lr:g}, seed {seed}",
                       lambda: train_adapter(load_emulator(bundle), replace(c.training(task, seed), lr=lr), adapter,
                                             resume=True))
            return adapter / ADAPTER_META

        return self._choose_lr(self.run_dir / task / run / LR_CHOICE, f"{task}: {run} adapter", c.adapter_lrs, trained)

    def full_model_rows(self, task: str) -> None:
        c = self.config
        self._step(self.run_dir / task / "full_zs.json", f"{task}: full model zero-shot",
                   lambda: self._evaluate(self.run_dir / task / "full_zs.json", task, model=c.model))
        if not c.full_ft:
            return
        lr = self.full_ft_lr(task)
        for seed in c.seeds:
            seed_dir = full_ft_dir(self.run_dir, task, lr, seed)
            self._step(seed_dir / "model", f"{task}: full fine-tuning, lr {lr:g}, seed {seed}",
                       lambda seed=seed, seed_dir=seed_dir: self._train_full(task, seed, lr, seed_dir / "model"))
            self._step(seed_dir / "eval.json", f"{task}: full FT evaluation, seed {seed}",
                       lambda seed_dir=seed_dir: self._evaluate(seed_dir / "eval.json", task, model=str(seed_dir / "model")))

    # -- emulators ---------------------------------------------------------------------------

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

    def _removal_scores(self, model: nn.Module, tokenizer) -> RemovalScores:
        if self._scores is None:
            self._scores = removal_scores(model, tokenizer, self.config.calibration_samples)
        return self._scores

    def _make_plan(self, task: str, strategy: str, model: nn.Module | None, tokenizer) -> LayerPlan:
        c = self.config
        full, tok = (model, tokenizer) if model is not None else load_model(c.model)
        entry = get_strategy(strategy)
        similarity = self.similarity(task, full, tok) if SIMILARITY in entry.needs else None
        scores = self._removal_scores(full, tok) if CALIBRATION in entry.needs or c.k == AUTO_K else None
        return plan_for(full, strategy, k=c.k, trainable=c.trainable, similarity=similarity, scores=scores, task=task,
                        max_loss_increase=c.max_loss_increase, model_name=c.model, tokenizer=tok)

    def plan(self, task: str, strategy: str, model: nn.Module | None = None, tokenizer=None) -> LayerPlan:
        """The strategy's plan for ``task`` (its figure first: the plan file is the step's checkpoint).

        A plan that reads no task data (every strategy but CRaSh's) is made once, under
        ``plans/<rule>.json``, and each task's ``plan.json`` is a copy of it."""
        sdir = self.run_dir / task / strategy
        entry = get_strategy(strategy)
        shared = None if SIMILARITY in entry.needs else self.run_dir / PLANS_DIR / f"{entry.rule}.json"
        if shared is not None:
            self._step(shared, f"{entry.rule} plan (every task)",
                       lambda: self._make_plan(task, strategy, model, tokenizer).save(shared))

        def make() -> None:
            plan = LayerPlan.load(shared) if shared else self._make_plan(task, strategy, model, tokenizer)
            similarity = SimilarityResult.load(self.run_dir / task / "similarity" / "similarity.json") \
                if SIMILARITY in entry.needs else None
            plot_clusters(plan, sdir / "clusters.png", matrix=similarity.cka if similarity else None)
            plan.save(sdir / "plan.json")

        self._step(sdir / "plan.json", f"{task}: {strategy} plan", make)
        return LayerPlan.load(sdir / "plan.json")

    def _build(self, task: str, strategy: str, bundle: Path) -> None:
        model, tokenizer = load_model(self.config.model)
        spec = get_strategy(strategy).spec(self.plan(task, strategy, model, tokenizer))
        # Measured before building, which consumes the model (an untrained emulator is its slots'
        # layers of the full model), and once per distinct emulator: a plan that reads no task
        # data gives every task the same one.
        record = self._fidelity_record(spec)
        self._step(record, f"{task}: fidelity of every emulator of the task not yet measured (one full-model pass)",
                   lambda: self._measure_fidelity(task, model, tokenizer))
        save_bundle(build_emulator(model, tokenizer, spec), bundle, extra={"fidelity": read_json(record)})

    def _fidelity_record(self, spec: EmulatorSpec) -> Path:
        return self.run_dir / FIDELITY_DIR / f"{emulator_key(spec)}.json"

    def _measure_fidelity(self, task: str, model: nn.Module, tokenizer) -> None:
        """Fidelity of each of the task's emulators that has no record yet, in one call: the full
        model's states and logits on the held-out text are computed once for all of them."""
        specs = [get_strategy(strategy).spec(self.plan(task, strategy, model, tokenizer))
                 for strategy in self.config.strategies]
        missing = {self._fidelity_record(spec): spec for spec in specs if not self._fidelity_record(spec).exists()}
        measured = spec_fidelity(model, tokenizer, {str(record): spec for record, spec in missing.items()},
                                 bf16=self.config.train.bf16)
        for record in missing:
            write_json(record, measured[str(record)].to_dict())

    def distilled(self, task: str, strategy: str) -> Path:
        """The distilled bundle of the strategy's emulator for ``task``: made once per distinct emulator."""
        c, spec = self.config, get_strategy(strategy).spec(self.plan(task, strategy))
        out = self.run_dir / DISTILLED_DIR / emulator_key(spec)

        def distill() -> None:
            model, tokenizer = load_model(c.model)
            emulator = build_emulator(model, tokenizer, spec)
            teacher, _ = load_model(c.model)
            config = c.distillation()
            texts, val_texts = calibration_inputs(config)
            distill_emulator(teacher, emulator, texts, config, val_texts=val_texts, out_dir=out, fidelity=True)

        self._step(out, f"distillation of the {strategy} emulator (shared by every task and seed that has it)", distill)
        return out

    def _copy_distilled(self, task: str, strategy: str, bundle: Path) -> None:
        """The task's "+ KD" bundle: the shared distilled one, hard-linked, recording this task's plan."""
        shared, spec = self.distilled(task, strategy), get_strategy(strategy).spec(self.plan(task, strategy))
        with atomic_dir(bundle) as tmp:
            _link_tree(shared, tmp)
            records = read_records(tmp)
            if records["spec"] != spec.to_dict():  # the same emulator, planned on another task's similarity
                write_json(tmp / MANIFEST, {**records, "spec": spec.to_dict()})

    def strategy_rows(self, task: str, run: str) -> None:
        c = self.config
        sdir = self.run_dir / task / run
        bundle = sdir / "emulator"
        if run.endswith(KD_SUFFIX):
            self._step(bundle, f"{task}: {run} emulator", lambda: self._copy_distilled(task, base_strategy(run), bundle))
        else:
            self._step(bundle, f"{task}: {run} emulator", lambda: self._build(task, run, bundle))
        self._step(sdir / "emu_zs.json", f"{task}: {run} emulator zero-shot",
                   lambda: self._evaluate(sdir / "emu_zs.json", task, emulator=str(bundle)))
        lr = self.adapter_lr(task, run, bundle)
        for seed in c.seeds:
            seed_dir = sdir / f"seed{seed}"
            adapter = seed_dir / "adapter"

            def train(seed=seed, adapter=adapter):
                if c.adapter_lrs and seed == c.seeds[0]:  # the grid trained it already
                    with atomic_dir(adapter) as tmp:
                        _link_tree(adapter_grid_dir(self.run_dir, task, run, lr), tmp)
                else:
                    train_adapter(load_emulator(bundle), replace(c.training(task, seed), lr=lr), adapter, resume=True)

            self._step(adapter, f"{task}: {run} adapter training, seed {seed}", train)
            self._step(seed_dir / "emu_ft.json", f"{task}: {run} emulator + adapter, seed {seed}",
                       lambda seed_dir=seed_dir, adapter=adapter: self._evaluate(
                           seed_dir / "emu_ft.json", task, emulator=str(bundle), adapter=str(adapter)))
            self._step(seed_dir / "plugin.json", f"{task}: {run} plug-in, seed {seed}",
                       lambda seed_dir=seed_dir, adapter=adapter: self._evaluate(
                           seed_dir / "plugin.json", task, model=c.model, adapter=str(adapter)))

    def run(self) -> dict:
        self.config.validate()
        _check_run_dir(self.run_dir, self.config)
        for task in self.config.tasks:
            self.full_model_rows(task)
            for run in self.config.strategy_runs():
                self.strategy_rows(task, run)
        table = build_table(self.run_dir, self.config)
        write_table(self.run_dir, table, self.config)
        write_report(self.run_dir)
        return table


def run_offsite(config: OffsiteConfig, run_dir: str | Path, console: Console | None = None) -> dict:
    """Run (or continue) a table run and return the table."""
    return Pipeline(config, Path(run_dir), console).run()
