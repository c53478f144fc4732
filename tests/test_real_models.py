"""Both embedded models, on small slices of real data: `crashlm eval` scores what lm-eval's own
HFLM scores (SmolLM2 adds no BOS, Gemma 3 does), and Gemma 3 270M runs the pipeline end to end
(similarity, emulator, a few training steps, plug-in)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from crashlm.core.tasks import lm_eval_task_config
from crashlm.evaluation.run import EvalResult, _quiet_lm_eval
from tests.cli import run_cli

pytestmark = pytest.mark.integration

ITEMS = 100


def _hflm_acc(alias: str, tasks: list[str]) -> dict[str, float]:
    """lm-eval's own evaluator and HFLM, fp32, on the items and prompts crashlm evaluates."""
    from lm_eval.evaluator import evaluate as lm_eval_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from crashlm.core.models import load_model

    model, tok = load_model(alias, dtype=torch.float32)
    configs = [dict(lm_eval_task_config(task, "validation", ITEMS), num_fewshot=0) for task in tasks]
    with _quiet_lm_eval():
        loaded = TaskManager(include_defaults=False).load(configs)
        output = lm_eval_evaluate(lm=HFLM(pretrained=model, tokenizer=tok, batch_size=16), task_dict=loaded,
                                  bootstrap_iters=0)
    return {task: output["results"][config["task"]]["acc,none"] for task, config in zip(tasks, configs)}


@pytest.mark.parametrize("alias", ["smollm2-135m", "gemma3-270m"])
def test_crashlm_eval_equals_hflm_on_the_first_100_validation_items(alias, tmp_path, capsys):
    out = tmp_path / "eval.json"
    code, stdout, stderr = run_cli(["eval", "--model", alias, "--tasks", "piqa,arc_easy", "--split", "validation",
                                    "--limit", str(ITEMS), "--dtype", "float32", "--out", str(out)], capsys)
    assert code == 0, stderr
    ours = EvalResult.load(out)
    reference = _hflm_acc(alias, ["piqa", "arc_easy"])
    for task, acc in reference.items():
        assert ours.scores[task]["n"] == ITEMS
        assert abs(ours.scores[task]["acc"] - acc) <= 1 / ITEMS + 1e-9, (task, ours.scores[task]["acc"], acc)


def test_gemma3_pipeline_similarity_emulator_training_plugin(tmp_path, capsys):
    code, _, stderr = run_cli(["similarity", "--model", "gemma3-270m", "--task", "arc_easy", "--samples", "8",
                               "--max-length", "48", "--out", str(tmp_path / "sim")], capsys)
    assert code == 0, stderr
    similarity = json.loads((tmp_path / "sim" / "similarity.json").read_text())
    assert similarity["num_layers"] == 18 and similarity["split"] == "train" and similarity["last_state"] == "norm"

    # Fidelity (64 texts through a 262k-word unembedding: minutes on an fp32 CPU) is tested on its own.
    code, _, stderr = run_cli(["emulator", "--model", "gemma3-270m", "--strategy", "crash-share", "--k", "8",
                               "--similarity", str(tmp_path / "sim"), "--no-fidelity", "--out", str(tmp_path / "emu")],
                              capsys)
    assert code == 0, stderr
    code, _, stderr = run_cli(["train", "--emulator", str(tmp_path / "emu"), "--task", "arc_easy", "--train-samples", "8",
                               "--val-samples", "4", "--max-steps", "2", "--batch-size", "4", "--max-length", "48",
                               "--out", str(tmp_path / "adapter")], capsys)
    assert code == 0, stderr
    adapter = json.loads((tmp_path / "adapter" / "adapter.json").read_text())
    curve = [point["val_loss"] for point in adapter["validation_curve"]]
    # A K = 8 of 18 emulator is far from the model (its loss starts above 20 nats): only sanity here.
    assert len(curve) >= 2 and all(math.isfinite(loss) and loss > 0 for loss in curve)
    assert adapter["sources"] == json.loads((tmp_path / "emu" / "crashlm.json").read_text())["spec"]["plan"]["trainable"]

    code, _, stderr = run_cli(["plugin", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "plugged")], capsys)
    assert code == 0, stderr
    code, _, stderr = run_cli(["eval", "--model", str(tmp_path / "plugged"), "--tasks", "arc_easy", "--limit", "4",
                               "--out", str(tmp_path / "plugged.json")], capsys)
    assert code == 0, stderr
    assert EvalResult.load(tmp_path / "plugged.json").scores["arc_easy"]["n"] == 4
