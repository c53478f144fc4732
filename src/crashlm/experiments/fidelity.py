"""The strategy x K fidelity table: which untrained emulator stays closest to its full model.

``crashlm fidelity`` builds every plan of ``strategies`` at every K from one recording of the
full model on the calibration search slice (CRaSh's layer similarity from the training inputs of
``similarity_task``, as the offsite pipeline does), then scores all of them at once on the held-out
slice (:func:`~crashlm.emulators.fidelity.spec_fidelity`). Nothing is trained: this is what decides
which emulators are worth an offsite-tuning run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from crashlm.analysis.similarity import compute_similarity
from crashlm.core.assets import DEFAULT_MODEL
from crashlm.core.io import atomic_path, write_json
from crashlm.core.models import load_config, load_model, num_layers
from crashlm.core.settings import Settings, setting
from crashlm.core.tasks import ANALYSIS_SPLIT, get_task
from crashlm.emulators import plans
from crashlm.emulators.fidelity import FIDELITY_LENGTH, FIDELITY_TEXTS, heldout_texts, spec_fidelity
from crashlm.emulators.strategies import (
    DEFAULT_CALIBRATION_SAMPLES,
    SIMILARITY,
    STRATEGIES,
    get_strategy,
    plan_for,
    removal_scores,
)
from crashlm.outputs.fidelity import fidelity_markdown, plot_fidelity


@dataclass
class FidelityConfig(Settings):
    """What ``crashlm fidelity`` measures."""

    what: ClassVar[str] = "fidelity"

    model: str = setting(DEFAULT_MODEL, "Full model (alias, HF directory, .gguf file or hub id).")
    strategies: list[str] = setting(help="Strategies (any registered one, or <name>-share).",
                                    factory=lambda: list(STRATEGIES))
    ks: list[int] | None = setting(None, "Emulator sizes K. Default: half the layers.")
    trainable: int = setting(plans.DEFAULT_TRAINABLE, "Trainable (adapter) layers.")
    calibration_samples: int = setting(DEFAULT_CALIBRATION_SAMPLES,
                                       "Calibration paragraphs the strategies search on (search slice).")
    texts: int = setting(FIDELITY_TEXTS, "Held-out calibration paragraphs fidelity is measured on.")
    max_length: int = setting(FIDELITY_LENGTH, "Truncate calibration paragraphs to this many tokens.")
    similarity_task: str = setting("piqa", "Task whose training inputs give CRaSh's layer similarity.")
    similarity_samples: int = setting(128, "Training examples for that similarity.")

    def validate(self) -> None:
        for name in self.strategies:
            get_strategy(name)
        get_task(self.similarity_task)
        self.check_positive("trainable", "calibration_samples", "texts", "similarity_samples")
        self.check_positive("max_length", minimum=8)
        depth = load_config(self.model).num_hidden_layers
        for k in self.ks or [plans.default_k(depth)]:
            plans.check_k(k, depth, self.trainable)


def run_fidelity(config: FidelityConfig, out_dir: str | Path) -> dict:
    """Measure the table and write ``fidelity.json``, ``fidelity.md`` and ``fidelity.png`` under ``out_dir``."""
    config.validate()
    started = time.perf_counter()
    model, tokenizer = load_model(config.model)
    depth = num_layers(model)
    ks = sorted(set(config.ks or [plans.default_k(depth)]), reverse=True)
    entries = [get_strategy(name) for name in config.strategies]
    similarity = None
    if any(SIMILARITY in entry.needs for entry in entries):
        similarity = compute_similarity(config.model, task=config.similarity_task, samples=config.similarity_samples,
                                        split=ANALYSIS_SPLIT, model=model, tokenizer=tokenizer)
    scores = removal_scores(model, tokenizer, config.calibration_samples, config.max_length)
    specs, rows = {}, []
    for entry in entries:
        for k in ks:
            plan = plan_for(model, entry.name, k, config.trainable, similarity, scores=scores,
                            model_name=config.model, tokenizer=tokenizer)
            specs[f"{entry.name}@{k}"] = entry.spec(plan)
            rows.append({"strategy": entry.name, "label": entry.label, "k": k, "kept": plan.kept,
                         "trainable": plan.trainable})
    measured = spec_fidelity(model, tokenizer, specs, heldout_texts(config.texts), config.max_length)
    for row in rows:
        row["fidelity"] = measured[f"{row['strategy']}@{row['k']}"].to_dict()
    table = {"model": config.model, "num_layers": depth, "ks": ks, "rows": rows,
             "full_loss": rows[0]["fidelity"]["full_loss"] if rows else None,
             "calibration": scores.settings, "seconds": round(time.perf_counter() - started, 1),
             "config": config.to_dict()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "fidelity.json", table)
    with atomic_path(out_dir / "fidelity.md") as tmp:
        tmp.write_text(fidelity_markdown(table), encoding="utf-8")
    plot_fidelity(table, out_dir / "fidelity.png")
    return table
