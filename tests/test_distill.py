"""Distillation: the KD target of every plan layout, resuming after a kill, and ``crashlm distill``."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import crashlm.emulators.distill as distill
from crashlm.core.errors import UsageError
from crashlm.emulators.bundle import load_emulator, save_bundle
from crashlm.emulators.distill import DistillConfig, distill_emulator
from crashlm.emulators.emulator import build_emulator
from crashlm.emulators.plans import EmulatorSpec, LayerPlan, Sharing, uniform_plan
from crashlm.training.checkpoint import CheckpointStore, checkpoint_dir
from tests.cli import run_cli
from tests.conftest import interrupt_distillation
from tests.tiny import CORPUS, save_tiny, tiny_model

L = 6


pytestmark = pytest.mark.usefixtures("cpu_one_thread")


def teacher_and_emulator(kept: list[int], trainable: list[int], sharing: Sharing = Sharing.NONE):
    full, tokenizer = tiny_model("llama", L)
    spec = EmulatorSpec(LayerPlan(L, "custom", kept, trainable), sharing)
    return full, build_emulator(copy.deepcopy(full), tokenizer, spec)


def kd_of(teacher, emulator) -> torch.Tensor:
    batch = distill.TextBatches(emulator.tokenizer, CORPUS, 3, 32, seed=0).batch(1)
    positions = distill._middle_positions(emulator)
    _, kd = distill._distill_losses(teacher, emulator.model, positions, batch["input_ids"], batch["attention_mask"], False)
    return kd


@pytest.mark.parametrize("kept, trainable, sharing", [
    ([0, 2, 3, 5], [0, 5], Sharing.NONE),  # the paper's layout: bottom and top adapters
    ([0, 2, 3, 5], [0, 5], Sharing.COPIES),
    ([0, 2, 3, 5], [0, 5], Sharing.TIED),
    ([0, 2, 3, 5], [0], Sharing.NONE),  # one trainable layer, at the bottom: nothing distilled below it
    ([0, 1, 2, 4], [0, 1], Sharing.COPIES),  # every adapter below the distilled layers
    ([1, 2, 4, 5], [4, 5], Sharing.NONE),  # every adapter above them
])
def test_kd_reaches_the_distilled_layers_of_every_plan(kept, trainable, sharing):
    teacher, emulator = teacher_and_emulator(kept, trainable, sharing)
    for module in emulator.frozen_modules():
        module.requires_grad_(True)
    kd_of(teacher, emulator).backward()
    grads = [p.grad for module in emulator.frozen_modules() for p in module.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("kept, trainable, sharing", [
    ([0, 1, 2, 3, 5], [0, 3], Sharing.NONE),
    # Position 3 (removed) holds adapter 4 itself: the target is the input of position 3, the teacher's layer 3.
    ([0, 1, 2, 4, 5], [0, 4], Sharing.TIED),
])
def test_kd_compares_the_same_depth_in_both_models(kept, trainable, sharing):
    """Nothing is removed below the KD target, so the emulator's state there is the full model's."""
    teacher, emulator = teacher_and_emulator(kept, trainable, sharing)
    with torch.no_grad():
        assert float(kd_of(teacher, emulator)) == pytest.approx(0.0, abs=1e-12)


def test_distillation_resumes_after_a_kill_with_the_same_weights(tmp_path, monkeypatch):
    config = DistillConfig(steps=6, batch_size=2, lr=3e-3, eval_every=2, val_texts=3, max_length=32, bf16=False)
    texts, val_texts = CORPUS, CORPUS[-3:]

    def run(out, settings=config):
        teacher, emulator = teacher_and_emulator([0, 2, 3, 5], [0, 5])
        return distill_emulator(teacher, emulator, texts, settings, val_texts=val_texts, out_dir=out)

    reference = run(tmp_path / "reference")
    record = json.loads((tmp_path / "reference" / "crashlm.json").read_text())["distillation"]
    assert record == json.loads(json.dumps(reference))
    curve = record["validation_curve"]
    assert [p["step"] for p in curve] == [0, 2, 4, 6]
    assert record["chosen_step"] == min(curve[1:], key=lambda p: p["val_loss"])["step"]
    assert set(record["before"]) == set(record["after"]) == {"lm", "kd"} and record["after"]["kd"] < record["before"]["kd"]
    assert record["config"] == config.to_dict() and not checkpoint_dir(tmp_path / "reference").exists()

    class Killed(Exception):
        pass

    real_save = CheckpointStore.save

    def save_then_die(self, state, *args):
        real_save(self, state, *args)
        if state["step"] == 4:
            raise Killed

    monkeypatch.setattr(CheckpointStore, "save", save_then_die)
    out = tmp_path / "out"
    with pytest.raises(Killed):
        run(out)
    monkeypatch.undo()
    assert not out.exists() and json.loads((checkpoint_dir(out) / "latest.json").read_text())["step"] == 4
    with pytest.raises(UsageError, match="other settings"):
        run(out, DistillConfig(**{**config.to_dict(), "lr": 1e-3}))
    run(out)
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "reference" / "model.safetensors").read_bytes()
    assert json.loads((out / "crashlm.json").read_text())["distillation"]["validation_curve"] == curve
    assert not checkpoint_dir(out).exists()


def test_distillation_config_is_checked():
    for overrides in (dict(eval_every=0), dict(val_texts=0), dict(steps=0), dict(lr=0.0), dict(max_length=4)):
        with pytest.raises(UsageError):
            DistillConfig(**overrides).validate()
    with pytest.raises(UsageError, match="unknown distillation settings: text_task"):
        DistillConfig.from_dict({"text_task": "boolq"})


@pytest.mark.integration
def test_cli_distills_any_bundle_on_calibration_text_and_resumes(tmp_path, capsys, monkeypatch):
    teacher = save_tiny("llama", tmp_path / "teacher", L)  # the same seeded weights as tiny_model
    full, tokenizer = tiny_model("llama", L)
    bundle = save_bundle(build_emulator(full, tokenizer, EmulatorSpec(uniform_plan(L, 4, 2), Sharing.COPIES)),
                         tmp_path / "emulator")
    out = tmp_path / "distilled"
    args = ["distill", "--model", str(teacher), "--emulator", str(bundle), "--steps", "4", "--eval-every", "2",
            "--val-texts", "4", "--batch-size", "2", "--max-length", "32", "--no-bf16", "--out", str(out)]
    interrupt_distillation(monkeypatch, 3)
    assert run_cli(args, capsys)[0] == 130
    monkeypatch.undo()
    code, _, err = run_cli([*args, "--lr", "1e-3"], capsys)
    assert code == 2 and "other settings" in err and len(err.strip().splitlines()) == 1

    code, stdout, err = run_cli(args, capsys)
    assert code == 0, err
    assert "resuming from" in stdout and "kept step" in stdout
    records = json.loads((out / "crashlm.json").read_text())
    record = records["distillation"]
    assert [p["step"] for p in record["validation_curve"]] == [0, 2, 4] and record["val_texts"] == 4
    assert 0 <= records["fidelity"]["top1"] <= 1  # measured on the distilled emulator
    assert record["texts"] > 1000  # the calibration text's distill slice
    assert load_emulator(out).spec == load_emulator(bundle).spec
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "already exists" in err
