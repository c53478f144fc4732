"""Zero-shot quality of emulators as layers are removed: answer-token loss against K.

How much a model tolerates layer removal decides whether offsite-tuning can work on it at all:
the adapter is trained on the emulator, so an emulator far from the full model gives gradients
far from the full model's. This script builds the uniform (Offsite-Tuning), CRaSh w/o sharing
and CRaSh (sharing) emulators for several K from one CKA similarity and reports each one's mean
answer-token cross-entropy on validation items (the training loss, no tuning), next to the full
model (K = L), and the loss of the full model without each single layer (which layers matter).

    .venv/bin/python benchmarks/emulator_depth.py --similarity runs/demo/piqa/similarity/similarity.json \
        [--task piqa] [--ks 26,22,18,15] [--limit 48]

The similarity is a ``similarity.json`` of the same model (``crashlm similarity`` or the one
``crashlm offsite`` writes under RUN_DIR/<task>/similarity/). The last printed line is one JSON
object.
"""

from __future__ import annotations

import argparse
import json

import torch

from crashlm.analysis.similarity import SimilarityResult
from crashlm.core.models import get_layers, load_model, set_layers
from crashlm.core.scoring import mean_answer_loss
from crashlm.core.tasks import load_examples
from crashlm.emulators.emulator import build_emulator
from crashlm.emulators.plans import DEFAULT_TRAINABLE
from crashlm.emulators.strategies import get_strategy, plan_for

STRATEGIES = ("uniform", "crash", "crash-share")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--similarity", required=True, help="similarity.json of the same model")
    parser.add_argument("--task", default="piqa")
    parser.add_argument("--ks", default="26,22,18,15", help="comma-separated kept-layer counts")
    parser.add_argument("--limit", type=int, default=48, help="validation items")
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    similarity = SimilarityResult.load(args.similarity)
    examples = load_examples(args.task, "validation", limit=args.limit)
    ks = [int(k) for k in args.ks.split(",")]

    def loss(model, tokenizer) -> float:
        return mean_answer_loss(model, tokenizer, examples, max_length=args.max_length)

    model, tokenizer = load_model(args.model, dtype=torch.float32)
    depth = similarity.num_layers
    full = loss(model, tokenizer)
    without = []
    for layer in range(depth):
        model, tokenizer = load_model(args.model, dtype=torch.float32)
        keep = [i for i in range(depth) if i != layer]
        set_layers(model, [get_layers(model)[i] for i in keep], keep)
        without.append(loss(model, tokenizer))
    adjacent = similarity.adjacent_layers
    rows = {strategy: {} for strategy in STRATEGIES}
    removed = {strategy: {} for strategy in STRATEGIES}
    print(f"{args.model}, {args.task}: {len(examples)} validation items; full model ({depth} layers) loss {full:.3f}")
    print("| layer | loss without it | CKA with the previous layer |")
    print("|---|---|---|")
    for layer, value in enumerate(without):
        print(f"| {layer} | {value:.3f} | {adjacent[layer - 1]:.3f} |" if layer else f"| {layer} | {value:.3f} | |")
    print("| K | " + " | ".join(STRATEGIES) + " |")
    print("|---|" + "---|" * len(STRATEGIES))
    for k in ks:
        for strategy in STRATEGIES:
            model, tokenizer = load_model(args.model, dtype=torch.float32)  # build_emulator consumes the model
            plan = plan_for(model, strategy, k, DEFAULT_TRAINABLE, similarity, model_name=args.model)
            emulator = build_emulator(model, tokenizer, get_strategy(strategy).spec(plan))
            rows[strategy][k] = loss(emulator.model, tokenizer)
            removed[strategy][k] = sorted(set(range(depth)) - set(plan.kept))
        print(f"| {k} | " + " | ".join(f"{rows[s][k]:.3f}" for s in STRATEGIES) + " |", flush=True)
    for k in ks:
        print(f"removed at K={k}: " + "; ".join(f"{s} {removed[s][k]}" for s in STRATEGIES if s != "crash-share"))
    print(json.dumps({"model": args.model, "task": args.task, "items": len(examples), "num_layers": depth,
                      "full_loss": full, "loss_without_layer": without,
                      "loss": {s: {str(k): v for k, v in r.items()} for s, r in rows.items()},
                      "removed": {s: {str(k): v for k, v in r.items()} for s, r in removed.items()}}))


if __name__ == "__main__":
    main()
