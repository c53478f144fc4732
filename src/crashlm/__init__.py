"""crashlm: fine-tune LLMs without the full model (CRaSh emulators on Offsite-Tuning).

The Python API, by layer (docs/architecture.md). Names are imported on first use: ``import
crashlm`` takes 0.01 s, the modules behind it (torch, transformers, lm-eval) about 2.4 s.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "crashlm.core.models": ("load_model", "load_tokenizer", "fingerprint"),
    "crashlm.core.tasks": ("get_task", "load_examples"),
    "crashlm.core.scoring": ("encode_pair", "encode_request"),
    "crashlm.training.config": ("TrainConfig",),
    "crashlm.training.full": ("train_full",),
    "crashlm.evaluation.run": ("evaluate", "EvalResult"),
    "crashlm.analysis.similarity": ("compute_similarity", "SimilarityResult"),
    "crashlm.analysis.lens": ("lens_statistics", "trajectory", "TunedLens"),
    "crashlm.analysis.tuned_lens": ("train_tuned_lens", "LensTrainConfig"),
    "crashlm.analysis.divergence": ("compute_divergence",),
    "crashlm.analysis.landscape": ("landscape_1d", "landscape_2d", "Landscape1DConfig", "Landscape2DConfig"),
    "crashlm.emulators.plans": ("LayerPlan", "EmulatorSpec", "Sharing"),
    "crashlm.emulators.strategies": ("plan_for", "register", "get_strategy", "STRATEGIES", "removal_scores"),
    "crashlm.emulators.fidelity": ("spec_fidelity", "emulator_fidelity", "Fidelity"),
    "crashlm.emulators.emulator": ("Emulator", "build_emulator"),
    "crashlm.emulators.bundle": ("save_bundle", "load_emulator", "verify_bundle", "leaked_tensors"),
    "crashlm.emulators.finetune": ("train_adapter",),
    "crashlm.emulators.distill": ("distill_emulator",),
    "crashlm.emulators.plugin": ("load_adapter", "apply_adapter", "plug_in"),
    "crashlm.emulators.targets": ("resolve_target",),
    "crashlm.experiments.offsite": ("OffsiteConfig", "run_offsite"),
    "crashlm.experiments.fidelity": ("FidelityConfig", "run_fidelity"),
    "crashlm.core.calibration": ("calibration_texts",),
}
_MODULE_OF = {name: module for module, names in _API.items() for name in names}

__all__ = ["__version__", *_MODULE_OF]


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'crashlm' has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE_OF[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
