"""The settings of an offsite table run, and the names its runs and directories follow.

Shared by the pipeline (:mod:`crashlm.experiments.offsite`) and the table built from its run
directory (:mod:`crashlm.experiments.offsite_table`).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

from crashlm.core.assets import DEFAULT_MODEL
from crashlm.core.calibration import CALIBRATION_TASK
from crashlm.core.errors import UsageError
from crashlm.core.models import load_config
from crashlm.core.settings import Settings, setting
from crashlm.core.tasks import get_task
from crashlm.emulators import plans
from crashlm.emulators.distill import DistillConfig
from crashlm.emulators.plans import EmulatorSpec
from crashlm.emulators.strategies import (
    DEFAULT_CALIBRATION_SAMPLES,
    DEFAULT_MAX_LOSS_INCREASE,
    STRATEGIES,
    get_strategy,
)
from crashlm.training.config import TrainConfig

# A "+ KD" run is "<strategy>-kd"; the distilled uniform emulator keeps the paper's label.
KD_SUFFIX, KD_PAPER_LABELS = "-kd", {"uniform-kd": "OFT + KD"}
DISTILLED_DIR, FIDELITY_DIR, LR_CHOICE, LR_GRID_DIR, PLANS_DIR = "distilled", "fidelity", "lr.json", "lr_grid", "plans"
AUTO_K = "auto"  # --k auto: each strategy's K chosen on calibration loss


def _offsite_training() -> TrainConfig:
    return TrainConfig(train_samples=2000)


def _learning_rates(lrs: list[float]) -> bool:
    """A learning-rate grid: distinct, positive, finite, at least one."""
    return bool(lrs) and len(set(lrs)) == len(lrs) and all(math.isfinite(lr) and lr > 0 for lr in lrs)


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
    adapter_lrs: list[float] | None = setting(
        None, "Adapter learning rates: per task and emulator, the first seed trains once per rate and the lowest best "
              "validation loss on the emulator (all the data owner can measure) sets the rate of every seed. "
              "Default: --lr alone.")
    distill: bool = setting(False, "Add a '+ KD' row per strategy: its emulator distilled on calibration text.")
    distill_strategies: list[str] | None = setting(
        None, "With --distill: the strategies that get a '+ KD' row (each one of --strategies). Default: all of them.")
    k: int | str | None = setting(
        None, "Kept layers per emulator: a number, or 'auto' (per strategy, the smallest K whose untrained emulator's "
              "calibration loss is within --max-loss-increase of the full model's). Default: half the layers. The model's "
              "depth removes nothing: the adapter trains on the full model, the ceiling of transfer.")
    max_loss_increase: float = setting(DEFAULT_MAX_LOSS_INCREASE,
                                       "--k auto: allowed relative increase of the calibration loss.")
    trainable: int = setting(plans.DEFAULT_TRAINABLE, "Trainable (adapter) layers.")
    similarity_samples: int = setting(128, "Training examples used for the CRaSh layer similarity.")
    calibration_samples: int = setting(DEFAULT_CALIBRATION_SAMPLES,
                                       "Calibration paragraphs the calibration strategies score removals on.")
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
        if self.full_ft and not _learning_rates(self.full_ft_lrs):
            raise UsageError("--full-ft-lrs must be distinct positive learning rates, at least one")
        if self.adapter_lrs is not None and not _learning_rates(self.adapter_lrs):
            raise UsageError("--adapter-lrs must be distinct positive learning rates, at least one")
        self.check_positive("trainable", "similarity_samples", "calibration_samples", "distill_steps")
        extra = sorted(set(self.distill_strategies or ()) - set(self.strategies))
        if extra:
            raise UsageError(f"distill_strategies must be among the strategies; {', '.join(extra)} is not")
        self.check_positive("eval_limit", optional=True)
        if isinstance(self.k, str):
            if self.k != AUTO_K:
                raise UsageError(f"--k must be a positive integer or '{AUTO_K}', got {self.k!r}")
        else:
            self.check_positive("k", optional=True)
        self.check_number("max_loss_increase", open_low=True)
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise UsageError("seeds must be distinct and at least one")
        if self.tasks:
            self.training(self.tasks[0], self.seeds[0]).validate()
        depth = load_config(self.model).num_hidden_layers  # a missing or unsupported model fails here, fast
        if self.strategies:
            k = self.trainable if self.k == AUTO_K else plans.default_k(depth) if self.k is None else self.k
            plans.check_k(k, depth, self.trainable)

    def training(self, task: str, seed: int) -> TrainConfig:
        """The training settings of one (task, seed) run."""
        return replace(self.train, task=task, seed=seed)

    def distillation(self) -> DistillConfig:
        """The settings of every distillation of the table."""
        return DistillConfig(steps=self.distill_steps, batch_size=self.train.batch_size, bf16=self.train.bf16)

    def strategy_runs(self) -> list[str]:
        """Runs of the strategy rows: each strategy, then each one's "+ KD" run when asked."""
        distilled = [s for s in self.strategies if self.distill_strategies is None or s in self.distill_strategies]
        return list(self.strategies) + ([s + KD_SUFFIX for s in distilled] if self.distill else [])


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


def adapter_grid_dir(run_dir: Path, task: str, run: str, lr: float) -> Path:
    """Where ``--adapter-lrs`` trains the first seed's adapter at ``lr`` (the chosen one is linked to ``seed<s>/``)."""
    return run_dir / task / run / LR_GRID_DIR / f"lr{lr:g}" / "adapter"


