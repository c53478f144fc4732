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
    <task>/<strategy>/plan.json        layer plan, clusters.png beside it
    <task>/<strategy>/emulator/        emulator bundle; emu_zs.json beside it
    <task>/<strategy>/seed<s>/adapter/ trained adapter; emu_ft.json, plugin.json beside it
    <task>/<strategy>-kd/              the same on the distilled emulator (its bundle a copy)
    distilled/<key>/                   one distilled bundle per distinct emulator, for every task and seed
    <task>/training_curves.png         every validation curve of the task
    table.json, table.md, table.png, fidelity.png, report.html
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import statistics
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, ClassVar

from rich.console import Console
from torch import nn

from crashlm.analysis.similarity import SimilarityResult, compute_similarity
from crashlm.core.assets import DEFAULT_MODEL
from crashlm.core.calibration import CALIBRATION_TASK
from crashlm.core.errors import UsageError
from crashlm.core.io import atomic_dir, atomic_path, read_json, write_json
from crashlm.core.models import load_config, load_model
from crashlm.core.settings import Settings, setting
from crashlm.core.tasks import ANALYSIS_SPLIT, get_task
from crashlm.emulators import plans
from crashlm.emulators.bundle import MANIFEST, load_emulator, read_records, save_bundle
from crashlm.emulators.distill import DistillConfig, calibration_inputs, distill_emulator
from crashlm.emulators.emulator import build_emulator
from crashlm.emulators.fidelity import emulator_fidelity
from crashlm.emulators.finetune import train_adapter
from crashlm.emulators.plans import EmulatorSpec, LayerPlan
from crashlm.emulators.plugin import ADAPTER_META
from crashlm.emulators.strategies import SIMILARITY, STRATEGIES, get_strategy, plan_for
from crashlm.emulators.targets import resolve_target
from crashlm.evaluation.run import evaluate
from crashlm.outputs.plotting import plot_clusters, plot_fidelity_gain, plot_offsite_table, plot_training_curves
from crashlm.outputs.report import CURVES_FIGURE, FIDELITY_FIGURE, write_report
from crashlm.outputs.tables import gain_recovered, table_markdown, table_row
from crashlm.training.config import TrainConfig
from crashlm.training.full import TRAINING_META, train_full

# A "+ KD" run is "<strategy>-kd"; the distilled uniform emulator keeps the paper's label.
KD_SUFFIX, KD_PAPER_LABELS = "-kd", {"uniform-kd": "OFT + KD"}
DISTILLED_DIR, LR_CHOICE = "distilled", "lr.json"
# What a re-run may change: tasks, strategies and seeds may grow. Every other setting decides what
# a finished step produced (the checkpoint frequency of training does not).
_GROWING_FIELDS = ("tasks", "strategies", "seeds", "full_ft", "distill")


def _offsite_training() -> TrainConfig:
    return TrainConfig(train_samples=2000)


def _known_strategy(name: str) -> bool:
    try:
        get_strategy(name)
    except UsageError:
        return False
    return True


@dataclass
class OffsiteConfig(Settings):
    """Everything that defines a table run (stored as ``RUN_DIR/config.json``).

    ``train`` is the training of every adapter and full fine-tuning of the table (full
    fine-tuning takes its learning rate from ``full_ft_lrs``); its task and seed are set per run
    from ``tasks`` and ``seeds``.
    """

    what: ClassVar[str] = "offsite"

    model: str = setting(DEFAULT_MODEL, "Base model (alias, HF directory, .gguf file or hub id).")
    tasks: list[str] = setting(help="Tasks (each needs a train split).", factory=lambda: ["piqa"])
    strategies: list[str] = setting(help=f"Emulator strategies: {', '.join(STRATEGIES)}.",
                                    factory=lambda: ["uniform", "crash", "crash-share"])
    full_ft: bool = setting(True, "Include the full fine-tuning upper baseline.")
    full_ft_lrs: list[float] = setting(
        help="Full fine-tuning learning rates: the first seed trains once per rate, the lowest best validation loss "
             "sets the rate of every seed (Offsite-Tuning's full fine-tuning uses 2e-5).",
        factory=lambda: [2e-5, 5e-5, 1e-4])
    distill: bool = setting(False, "Add a '+ KD' row per strategy: its emulator distilled on calibration text.")
    k: int | None = setting(None, "Kept layers per emulator. Default: half the layers.")
    trainable: int = setting(plans.DEFAULT_TRAINABLE, "Trainable (adapter) layers.")
    similarity_samples: int = setting(128, "Training examples used for the CRaSh layer similarity.")
    eval_limit: int | None = setting(300, "Evaluation items per task.")
    eval_split: str | None = setting(None, "Evaluation split. Default: each task's paper split.")
    seeds: list[int] = setting(help="Seeds of the trained rows.", factory=lambda: [1])
    distill_steps: int = setting(100, "Most distillation steps (--distill); the step kept has the best held-out loss.")
    train: TrainConfig = setting(help="Training of the adapters and of full fine-tuning.", factory=_offsite_training)

    def validate(self) -> None:
        for task in self.tasks:
            if task == CALIBRATION_TASK:
                raise UsageError(f"task {task} cannot be a downstream task here: its training paragraphs are the "
                                 "calibration text that chooses, distils and judges the emulators")
            spec = get_task(task)
            if "train" not in spec.splits():
                raise UsageError(f"task {task} has no train split here (evaluation only); offsite needs trainable tasks")
            if self.eval_split is not None and self.eval_split not in spec.splits():
                raise UsageError(f"task {task} has no {self.eval_split!r} split; available: {', '.join(spec.splits())}")
        unknown = [s for s in self.strategies if not _known_strategy(s)]
        if unknown:
            raise UsageError(f"unknown strategies {', '.join(unknown)}; choose from {', '.join(STRATEGIES)}")
        if not self.strategies and not self.full_ft:
            raise UsageError("nothing to run: give strategies or --full-ft")
        if self.train.lora and self.full_ft:
            raise UsageError("LoRA trains adapter layers, full fine-tuning trains every weight: drop --lora or add --no-full-ft")
        if self.full_ft and (not self.full_ft_lrs or len(set(self.full_ft_lrs)) != len(self.full_ft_lrs)
                             or not all(math.isfinite(lr) and lr > 0 for lr in self.full_ft_lrs)):
            raise UsageError("--full-ft-lrs must be distinct positive learning rates, at least one")
        self.check_positive("trainable", "similarity_samples", "distill_steps")
        self.check_positive("eval_limit", "k", optional=True)
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise UsageError("seeds must be distinct and at least one")
        if self.tasks:
            self.training(self.tasks[0], self.seeds[0]).validate()
        depth = load_config(self.model).num_hidden_layers  # a missing or unsupported model fails here, fast
        if self.strategies:
            plans.check_k(plans.default_k(depth) if self.k is None else self.k, depth, self.trainable)

    def training(self, task: str, seed: int) -> TrainConfig:
        """The training settings of one (task, seed) run."""
        return replace(self.train, task=task, seed=seed)

    def distillation(self) -> DistillConfig:
        """The settings of every distillation of the table."""
        return DistillConfig(steps=self.distill_steps, batch_size=self.train.batch_size, bf16=self.train.bf16)

    def strategy_runs(self) -> list[str]:
        """Runs of the strategy rows: each strategy, then each one's "+ KD" run when asked."""
        return list(self.strategies) + ([s + KD_SUFFIX for s in self.strategies] if self.distill else [])


def base_strategy(run: str) -> str:
    """The strategy whose emulator a run uses ("uniform-kd": "uniform")."""
    return run.removesuffix(KD_SUFFIX)


def run_label(run: str) -> str:
    """The table label of a run: the strategy's, with " + KD" for a distilled one."""
    label = get_strategy(base_strategy(run)).label
    return KD_PAPER_LABELS.get(run, f"{label} + KD") if run.endswith(KD_SUFFIX) else label


def emulator_key(spec: EmulatorSpec) -> str:
    """What makes two emulators the same (plan and sharing, not the settings of the similarity behind the plan)."""
    data = spec.to_dict()
    data["plan"] = {k: v for k, v in data["plan"].items() if k != "similarity"}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def full_ft_dir(run_dir: Path, task: str, lr: float, seed: int) -> Path:
    return run_dir / task / "full_ft" / f"lr{lr:g}" / f"seed{seed}"


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:  # no hard links on this file system
        shutil.copy2(source, target)


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

    # -- the full model --------------------------------------------------------------------

    def _train_full(self, task: str, seed: int, lr: float, out: Path) -> None:
        model, tokenizer = load_model(self.config.model)
        train_full(model, tokenizer, replace(self.config.training(task, seed), lr=lr), out, resume=True)

    def full_ft_lr(self, task: str) -> float:
        """Full fine-tuning's learning rate for ``task``: the first seed trains once per candidate, the
        lowest best validation loss wins (``<task>/full_ft/lr.json`` records every candidate's)."""
        c, path = self.config, self.run_dir / task / "full_ft" / LR_CHOICE

        def choose() -> None:
            seed, candidates = c.seeds[0], []
            for lr in c.full_ft_lrs:
                model_dir = full_ft_dir(self.run_dir, task, lr, seed) / "model"
                self._step(model_dir, f"{task}: full fine-tuning, lr {lr:g}, seed {seed}",
                           lambda lr=lr, model_dir=model_dir: self._train_full(task, seed, lr, model_dir))
                record = read_json(model_dir / TRAINING_META, "training record")["training"]
                candidates.append({"lr": lr, "best_val_loss": record["best_val_loss"]})
            chosen = min(candidates, key=lambda candidate: candidate["best_val_loss"])["lr"]
            write_json(path, {"seed": seed, "chosen": chosen, "candidates": candidates})

        self._step(path, f"{task}: full fine-tuning learning rate of {', '.join(f'{lr:g}' for lr in c.full_ft_lrs)}",
                   choose)
        return read_json(path, "learning-rate choice")["chosen"]

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

    def plan(self, task: str, strategy: str, model: nn.Module | None = None, tokenizer=None) -> LayerPlan:
        """The strategy's plan for ``task`` (its figure first: the plan file is the step's checkpoint)."""
        c, sdir = self.config, self.run_dir / task / strategy

        def make() -> None:
            full, tok = (model, tokenizer) if model is not None else load_model(c.model)
            needs_similarity = SIMILARITY in get_strategy(strategy).needs
            similarity = self.similarity(task, full, tok) if needs_similarity else None
            plan = plan_for(full, strategy, k=c.k, trainable=c.trainable, similarity=similarity, task=task,
                            model_name=c.model, tokenizer=tok)
            plot_clusters(plan, sdir / "clusters.png", matrix=similarity.cka if similarity else None)
            plan.save(sdir / "plan.json")

        self._step(sdir / "plan.json", f"{task}: {strategy} plan", make)
        return LayerPlan.load(sdir / "plan.json")

    def _build(self, task: str, strategy: str, bundle: Path) -> None:
        model, tokenizer = load_model(self.config.model)
        plan = self.plan(task, strategy, model, tokenizer)
        emulator = build_emulator(model, tokenizer, get_strategy(strategy).spec(plan))
        full, _ = load_model(self.config.model)
        fidelity = emulator_fidelity(full, emulator, bf16=self.config.train.bf16)
        save_bundle(emulator, bundle, extra={"fidelity": fidelity.to_dict()})

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
            shutil.copytree(shared, tmp, copy_function=_link_or_copy, dirs_exist_ok=True)
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
        for seed in c.seeds:
            seed_dir = sdir / f"seed{seed}"
            adapter = seed_dir / "adapter"

            def train(seed=seed, adapter=adapter):
                train_adapter(load_emulator(bundle), self.config.training(task, seed), adapter, resume=True)

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


# ---------------------------------------------------------------------------------------------
# The table


def _acc(path: Path, task: str) -> float:
    return float(read_json(path, "evaluation result")["scores"][task]["acc"])


def _bundle_records(run_dir: Path, config: OffsiteConfig, key: str) -> dict[str, dict[str, dict]]:
    """``{run: {task: record}}``: the ``key`` record of every emulator bundle of the run that has one."""
    found: dict[str, dict[str, dict]] = {}
    for run in config.strategy_runs():
        for task in config.tasks:
            bundle = run_dir / task / run / "emulator"
            records = read_records(bundle) if (bundle / MANIFEST).is_file() else {}
            if key in records:
                found.setdefault(run, {})[task] = records[key]
    return found


def build_table(run_dir: Path, config: OffsiteConfig) -> dict:
    """Collect every finished evaluation under ``run_dir`` into the table's rows."""
    tasks, seeds = list(config.tasks), list(config.seeds)
    lrs = {t: read_json(p, "learning-rate choice") for t in tasks if (p := run_dir / t / "full_ft" / LR_CHOICE).exists()}

    def collect(path_of: Callable[[str, int], Path | None], runs: list[int] = seeds) -> dict[str, dict[int, float]]:
        paths = {task: {seed: path_of(task, seed) for seed in runs} for task in tasks}
        return {t: {s: _acc(p, t) for s, p in found.items() if p is not None and p.exists()} for t, found in paths.items()}

    zero_shot = collect(lambda t, s: run_dir / t / "full_zs.json", [0])
    rows = [table_row("Full ZS", zero_shot)]
    full_ft = collect(lambda t, s: full_ft_dir(run_dir, t, lrs[t]["chosen"], s) / "eval.json" if t in lrs else None)
    if config.full_ft:
        rows.append(table_row("Full FT", full_ft, lr={t: choice["chosen"] for t, choice in lrs.items()}))
    for run in config.strategy_runs():
        def at(name: str, run: str = run) -> Callable[[str, int], Path]:
            return lambda t, s: run_dir / t / run / name.format(seed=s)

        label = run_label(run)
        rows.append(table_row(f"{label}, Emu ZS", collect(at("emu_zs.json"), [0]), run=run))
        rows.append(table_row(f"{label}, Emu FT", collect(at("seed{seed}/emu_ft.json")), run=run))
        plugin = collect(at("seed{seed}/plugin.json"))
        gain = gain_recovered(zero_shot, full_ft, plugin) if config.full_ft else {}
        rows.append(table_row(f"{label}, Plug-in", plugin, run=run, **gain))
    distilled = {run: {task: {key: record[key] for key in ("chosen_step", "before", "after")}
                       for task, record in by_task.items()}
                 for run, by_task in _bundle_records(run_dir, config, "distillation").items()}
    return {"model": config.model, "tasks": tasks, "seeds": seeds, "metric": "acc", "rows": rows, "full_ft_lr": lrs,
            "fidelity": _bundle_records(run_dir, config, "fidelity"), "distillation": distilled,
            "config": config.to_dict()}


def task_curves(run_dir: Path, task: str, config: OffsiteConfig) -> dict[str, list[tuple[str, list, list]]]:
    """The validation curves of ``task``: each training's answer-token loss, each distillation's held-out LM loss."""
    answer: list[tuple[str, list, list]] = []
    distillation: list[tuple[str, list, list]] = []

    def add(lines: list, label: str, curve: list[dict]) -> None:
        lines.append((label, [point["step"] for point in curve], [point["val_loss"] for point in curve]))

    choice = run_dir / task / "full_ft" / LR_CHOICE
    lr = read_json(choice, "learning-rate choice")["chosen"] if choice.exists() else None
    for seed in config.seeds:
        path = full_ft_dir(run_dir, task, lr, seed) / "model" / TRAINING_META if lr is not None else None
        if path is not None and path.exists():
            add(answer, f"Full FT (lr {lr:g}), seed {seed}", read_json(path, "training record")["validation_curve"])
    for run in config.strategy_runs():
        for seed in config.seeds:
            path = run_dir / task / run / f"seed{seed}" / "adapter" / ADAPTER_META
            if path.exists():
                add(answer, f"{run_label(run)}, seed {seed}", read_json(path, "adapter record")["validation_curve"])
        bundle = run_dir / task / run / "emulator"
        if run.endswith(KD_SUFFIX) and (bundle / MANIFEST).is_file():
            add(distillation, run_label(run), read_records(bundle)["distillation"]["validation_curve"])
    panels = {"validation loss (answer tokens)": answer, "distillation: held-out calibration LM loss": distillation}
    return {name: lines for name, lines in panels.items() if lines}


def write_table(run_dir: Path, table: dict, config: OffsiteConfig) -> None:
    """The table as JSON, Markdown and a figure; the fidelity-against-gain figure; each task's curves."""
    write_json(run_dir / "table.json", table)
    with atomic_path(run_dir / "table.md") as tmp:
        tmp.write_text(table_markdown(table), encoding="utf-8")
    plot_offsite_table(table, run_dir / "table.png")
    points = []
    for row in table["rows"]:
        kls = [record["kl"] for record in table["fidelity"].get(row.get("run"), {}).values()]
        if "gain_recovered" in row and kls:
            points.append((run_label(row["run"]), statistics.fmean(kls), row["gain_recovered"], row["gain_recovered_std"]))
    if points:
        plot_fidelity_gain(points, run_dir / FIDELITY_FIGURE, f"Fidelity and transfer on {Path(config.model).name}")
    for task in config.tasks:
        panels = task_curves(run_dir, task, config)
        if panels:
            plot_training_curves(panels, run_dir / task / CURVES_FIGURE, f"{task}: validation curves")


def run_offsite(config: OffsiteConfig, run_dir: str | Path, console: Console | None = None) -> dict:
    """Run (or continue) a table run and return the table."""
    return Pipeline(config, Path(run_dir), console).run()
