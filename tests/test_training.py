"""Training engine: adapter training, best checkpoint, determinism, kill + resume, NaN stop, LoRA,
full fine-tuning, distillation and a 2-process accelerate run, on tiny random models.

Training data is a small slice of the real offline ARC-Easy train split (quick to parse in each
subprocess). Every test runs torch on one thread: small matmuls are faster that way, and a fixed
thread count keeps runs bit-comparable.
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

import crashlm.training.full as full_ft
import crashlm.training.loop as loop
import crashlm.training.runtime as runtime
import crashlm.training.task as task
from crashlm.analysis.similarity import SimilarityResult
from crashlm.cli import main
from crashlm.core.attention import IMPLEMENTATION
from crashlm.core.errors import RunFailure, UsageError
from crashlm.core.models import get_layers, held_in_bf16
from crashlm.core.scoring import mean_answer_loss
from crashlm.emulators.bundle import load_emulator, save_bundle
from crashlm.emulators.distill import DistillConfig, TextBatches, distill_emulator, distillation_loss
from crashlm.emulators.emulator import build_emulator
from crashlm.emulators.finetune import train_adapter
from crashlm.emulators.plans import EmulatorSpec, Sharing
from crashlm.emulators.plugin import (
    ADAPTER_META,
    ADAPTER_WEIGHTS,
    apply_adapter,
    load_adapter,
)
from crashlm.emulators.strategies import get_strategy, plan_for
from crashlm.training.checkpoint import checkpoint_dir
from crashlm.training.config import TrainConfig
from crashlm.training.data import split_examples
from crashlm.training.full import train_full
from tests.tiny import CORPUS, TINY_ARCHS, batch, save_tiny, tiny_model

L, K, TRAINABLE = 6, 4, 2
REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}


pytestmark = pytest.mark.usefixtures("cpu_one_thread")


def tiny_config(**overrides) -> TrainConfig:
    settings = dict(task="arc_easy", train_samples=24, val_samples=8, max_steps=4, batch_size=4, max_length=40,
                    lr=1e-3, eval_every=2, bf16=False)
    return TrainConfig(**{**settings, **overrides})


def similarity(num_layers: int) -> SimilarityResult:
    adjacent = [0.5 + 0.4 * ((5 * i) % num_layers) / num_layers for i in range(num_layers)]
    cka = [[1.0] * (num_layers + 1) for _ in range(num_layers + 1)]
    return SimilarityResult(model="tiny", task="synthetic", samples=8, pooling="mean", estimator="biased",
                            minibatch=None, num_layers=num_layers, cka=cka, adjacent=adjacent)


def full_and_emulator(arch: str, strategy: str, share_trainable: bool = False):
    """A tiny full model (kept intact) and an emulator built from a copy of it."""
    full, tokenizer = tiny_model(arch, L)
    plan = plan_for(full, strategy, K, TRAINABLE, similarity(L), model_name="tiny")
    sharing = Sharing.TIED if share_trainable else get_strategy(strategy).sharing
    emulator = build_emulator(copy.deepcopy(full), tokenizer, EmulatorSpec(plan, sharing))
    return full, emulator


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """A tiny Llama uniform emulator bundle, for runs that load it fresh (CLI, resume, accelerate)."""
    _, emulator = full_and_emulator("llama", "uniform")
    return save_bundle(emulator, tmp_path_factory.mktemp("bundle") / "emulator")


def position(emulator, source: int) -> int:
    """The first emulator position holding adapter layer ``source``."""
    return next(slot.position for slot in emulator.slots if slot.trainable and slot.source == source)


def adapter_storage(emulator) -> set[int]:
    """Storage addresses of the adapter layers' tensors (state_dict makes new tensor objects each call)."""
    return {t.data_ptr() for layer in emulator.adapter_layers().values() for t in layer.state_dict().values()}


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def adapter_bytes(path: Path) -> bytes:
    return (path / ADAPTER_WEIGHTS).read_bytes()


# ---------------------------------------------------------------------------------------------
# Configuration and data


def test_config_round_trip_and_validation():
    config = tiny_config(lora=4, schedule="linear")
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    bad = [dict(task="nope"), dict(val_samples=0), dict(batch_size=-1), dict(max_steps=0), dict(lr=0.0),
           dict(lr=float("nan")), dict(schedule="step"), dict(warmup_ratio=1.0), dict(lora=0), dict(max_length=4),
           dict(eval_every=0), dict(data_source="web")]
    for overrides in bad:
        with pytest.raises(UsageError):
            tiny_config(**overrides).validate()
    with pytest.raises(UsageError, match="unknown training settings"):
        TrainConfig.from_dict({"task": "piqa", "learning_rate": 1.0})


@pytest.mark.integration
def test_validation_docs_are_fixed_held_out_train_docs():
    train_a, val_a = split_examples(tiny_config(seed=1, train_samples=50, val_samples=20))
    train_b, val_b = split_examples(tiny_config(seed=7, train_samples=None, val_samples=20))
    assert [ex.doc_id for ex in val_a] == [ex.doc_id for ex in val_b]  # the seed does not move them
    assert len(train_a) == 50 and len(train_b) == 2251 - 20
    assert not {ex.doc_id for ex in val_a} & {ex.doc_id for ex in train_b}
    with pytest.raises(UsageError, match="too few"):
        split_examples(tiny_config(task="arc_challenge", val_samples=5000))
    with pytest.raises(UsageError):
        split_examples(tiny_config(task="sciq"))  # evaluation-only task: no train split


# ---------------------------------------------------------------------------------------------
# Adapter training and plug-in


@pytest.mark.integration
@pytest.mark.parametrize("arch, strategy, share_trainable", [
    ("llama", "crash-share", True), ("gpt2", "uniform", False), ("opt", "crash", False), ("gpt_neox", "crash-share", False),
])
def test_plan_emulator_train_plugin(tmp_path, arch, strategy, share_trainable):
    full, emulator = full_and_emulator(arch, strategy, share_trainable)
    layers_before = [id(layer) for layer in get_layers(emulator.model)]
    before = snapshot(emulator.model)
    out = train_adapter(emulator, tiny_config(), tmp_path / "adapter")

    # Only adapter weights changed; shared positions still hold one module object.
    assert [id(layer) for layer in get_layers(emulator.model)] == layers_before
    adapter = adapter_storage(emulator)
    after = emulator.model.state_dict()
    for name, tensor in after.items():
        if tensor.data_ptr() not in adapter:
            assert torch.equal(tensor, before[name]), f"frozen tensor {name} changed"
    changed = [n for n, t in after.items() if t.data_ptr() in adapter and not torch.equal(t, before[n])]
    assert changed
    assert {id(p) for p in emulator.model.parameters() if p.requires_grad} == \
        {id(p) for layer in emulator.adapter_layers().values() for p in layer.parameters()}

    # The adapter holds the trained layers at their source indices, with the run's record.
    loaded = load_adapter(out)
    assert loaded.sources == emulator.plan.trainable
    for source, layer in emulator.adapter_layers().items():
        for name, tensor in layer.state_dict().items():
            assert torch.equal(loaded.state[source][name], tensor)
    meta = json.loads((out / ADAPTER_META).read_text())
    assert [point["step"] for point in meta["validation_curve"]] == [0, 2, 4]
    assert meta["training"]["best_step"] in (2, 4) and meta["training"]["config"]["task"] == "arc_easy"
    assert len(meta["training"]["train_losses"]) == 4
    assert not checkpoint_dir(out).exists()

    # Plug-in: the full model's layers at the plan's positions become the adapter, the rest stay.
    original = snapshot(full)
    apply_adapter(full, loaded)
    for index, layer in enumerate(get_layers(full)):
        for name, tensor in layer.state_dict().items():
            expected = loaded.state[index][name] if index in loaded.sources else original[f"{_prefix(full)}{index}.{name}"]
            assert torch.equal(tensor, expected)
    with torch.no_grad():
        assert torch.isfinite(full(**batch(emulator.tokenizer)).logits).all()


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_frozen_weights_are_held_in_bf16_and_restored_exactly(arch):
    _, emulator = full_and_emulator(arch, "crash-share")
    emulator.freeze()
    model = emulator.model
    # One weight that bf16 holds exactly: it comes back by upcasting, the others as they were.
    exact = next(p for p in model.parameters() if not p.requires_grad and p.dim() == 2)
    with torch.no_grad():
        exact.copy_(exact.bfloat16().float())
    before = {id(p): p.detach().clone() for p in model.parameters()}
    params = {id(p): p for p in model.parameters()}.values()
    frozen = [p for p in params if not p.requires_grad]
    inputs = batch(emulator.tokenizer)

    def loss() -> float:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return float(model(**inputs, labels=inputs["input_ids"]).loss)

    reference = loss()
    with pytest.raises(KeyboardInterrupt), held_in_bf16(model, True) as held:
        assert held == len(frozen) > 0  # a shared module (crash-share) or a tied embedding counts once
        assert all(p.dtype == torch.bfloat16 for p in frozen)
        assert all(p.dtype == torch.float32 for p in params if p.requires_grad)
        held_loss = loss()
        raise KeyboardInterrupt  # an interrupted run gives the weights back too
    # The same products but for the bf16 residual stream, norm weights and embeddings.
    assert held_loss == pytest.approx(reference, rel=2e-2)
    for p in model.parameters():
        assert p.dtype == torch.float32 and torch.equal(p.detach(), before[id(p)])
    with held_in_bf16(model, False) as held:
        assert held == 0 and all(p.dtype == torch.float32 for p in model.parameters())


def test_offloaded_weights_are_left_alone():
    model, _ = tiny_model("llama", 2)
    module = get_layers(model)[1].mlp.down_proj.to("meta")  # as accelerate leaves an offloaded weight
    offloaded = module.weight
    with held_in_bf16(model, True, frozen_only=False) as held:
        assert held == len(list(model.parameters())) - 1 and offloaded.dtype == torch.float32
    assert offloaded.device.type == "meta" and all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.integration
def test_bf16_training_holds_frozen_weights_in_bf16_and_gives_them_back(tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "use_bf16", lambda requested, device: requested)
    _, emulator = full_and_emulator("qwen3", "uniform")
    frozen = {name: t.clone() for name, t in emulator.model.state_dict().items()
              if t.data_ptr() not in adapter_storage(emulator)}
    out = train_adapter(emulator, tiny_config(bf16=True), tmp_path / "adapter")
    training = json.loads((out / ADAPTER_META).read_text())["training"]
    assert training["mixed_precision"] == "bf16" and training["frozen_parameters_in_bf16"] > 0
    assert training["attention"] == IMPLEMENTATION  # short sequences: explicit products on a CPU
    after = emulator.model.state_dict()
    assert all(after[name].dtype == torch.float32 and torch.equal(after[name], t) for name, t in frozen.items())
    assert all(t.dtype == torch.float32 for t in load_adapter(out).state[emulator.plan.trainable[0]].values())


def _prefix(model) -> str:
    from crashlm.core.models import arch_spec

    return arch_spec(model).layers + "."


@pytest.mark.integration
def test_best_checkpoint_by_validation_loss_is_what_gets_saved(tmp_path, monkeypatch):
    _, emulator = full_and_emulator("llama", "uniform")
    scripted = iter([5.0, 3.0, 1.0, 2.0])  # steps 0, 2, 4, 6: step 4 is best
    seen = {}

    def fake_validate(self):
        seen[self.step] = self._trainable_state()
        return next(scripted)

    monkeypatch.setattr(loop.TrainingLoop, "_validate", fake_validate)
    out = train_adapter(emulator, tiny_config(max_steps=6), tmp_path / "adapter")
    meta = json.loads((out / ADAPTER_META).read_text())
    assert meta["training"]["best_step"] == 4 and meta["training"]["best_val_loss"] == 1.0
    assert [p["val_loss"] for p in meta["validation_curve"]] == [5.0, 3.0, 1.0, 2.0]
    saved = load_file(str(out / ADAPTER_WEIGHTS))
    names = {f"layers.{s}.{n}": f"model.layers.{position(emulator, s)}.{n}"
             for s, layer in emulator.adapter_layers().items() for n in layer.state_dict()}
    for key, param_name in names.items():
        assert torch.equal(saved[key], seen[4][param_name])
    assert any(not torch.equal(saved[k], seen[6][p]) for k, p in names.items())


@pytest.mark.integration
def test_untrained_weights_are_only_a_reference(tmp_path, monkeypatch):
    _, emulator = full_and_emulator("llama", "uniform")
    scripted = iter([1.0, 2.0, 3.0])  # training only makes it worse: the best TRAINED step is kept
    monkeypatch.setattr(loop.TrainingLoop, "_validate", lambda self: next(scripted))
    meta = json.loads((train_adapter(emulator, tiny_config(), tmp_path / "a") / ADAPTER_META).read_text())
    assert meta["training"]["best_step"] == 2 and meta["training"]["initial_val_loss"] == 1.0


@pytest.mark.integration
def test_same_seed_is_bit_identical_and_seed_matters(tmp_path, bundle, monkeypatch):
    # bf16 autocast even where it is emulated (and slow): its path must be deterministic too.
    monkeypatch.setattr(runtime, "use_bf16", lambda requested, device: requested)
    config = tiny_config(bf16=True)
    a = train_adapter(load_emulator(bundle), config, tmp_path / "a")
    b = train_adapter(load_emulator(bundle), config, tmp_path / "b")
    c = train_adapter(load_emulator(bundle), tiny_config(bf16=True, seed=2), tmp_path / "c")
    assert json.loads((a / ADAPTER_META).read_text())["training"]["mixed_precision"] == "bf16"
    assert adapter_bytes(a) == adapter_bytes(b)
    assert adapter_bytes(a) != adapter_bytes(c)


@pytest.mark.integration
def test_nan_loss_stops_keeps_checkpoint_and_resumes(tmp_path, bundle, monkeypatch):
    config = tiny_config(max_steps=6, checkpoint_every=1)
    reference = train_adapter(load_emulator(bundle), config, tmp_path / "reference")

    real, calls = task.batch_answer_loss, {"n": 0}

    def poisoned(model, batch):
        calls["n"] += 1
        loss = real(model, batch)
        return loss * float("nan") if calls["n"] == 4 else loss  # step 4's micro-batch

    monkeypatch.setattr(task, "batch_answer_loss", poisoned)
    out = tmp_path / "adapter"
    with pytest.raises(RunFailure, match=r"non-finite loss at step 4; last good checkpoint kept in .*adapter\.partial"):
        train_adapter(load_emulator(bundle), config, out)
    assert not out.exists()
    assert json.loads((checkpoint_dir(out) / "latest.json").read_text())["step"] == 3
    with pytest.raises(UsageError, match="--resume"):
        train_adapter(load_emulator(bundle), config, out)

    monkeypatch.setattr(task, "batch_answer_loss", real)
    train_adapter(load_emulator(bundle), config, out, resume=True)
    assert adapter_bytes(out) == adapter_bytes(reference)
    assert not checkpoint_dir(out).exists()


@pytest.mark.integration
def test_resume_refuses_other_settings(tmp_path, bundle, monkeypatch):
    out = tmp_path / "adapter"
    monkeypatch.setattr(task, "batch_answer_loss", lambda model, batch: torch.tensor(float("inf"), requires_grad=True))
    with pytest.raises(RunFailure):
        train_adapter(load_emulator(bundle), tiny_config(), out)
    monkeypatch.undo()
    with pytest.raises(UsageError, match="other settings"):
        train_adapter(load_emulator(bundle), tiny_config(lr=5e-4), out, resume=True)


@pytest.mark.integration
def test_sigkill_then_resume_is_bit_identical(tmp_path, bundle):
    """The CLI killed with SIGKILL after a checkpoint, rerun with --resume: the same adapter bytes."""
    config = tiny_config(max_steps=40, batch_size=2, max_length=32, checkpoint_every=2, eval_every=10, bf16=True, seed=3)
    reference = train_adapter(load_emulator(bundle), config, tmp_path / "reference")
    out = tmp_path / "adapter"
    args = [sys.executable, "-m", "crashlm", "train", "--emulator", str(bundle), "--task", "arc_easy",
            "--train-samples", "24", "--val-samples", "8", "--max-steps", "40", "--batch-size", "2",
            "--max-length", "32", "--lr", "1e-3", "--eval-every", "10", "--checkpoint-every", "2", "--seed", "3",
            "--out", str(out)]
    process = subprocess.Popen(args, env=ENV, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    latest = checkpoint_dir(out) / "latest.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if latest.is_file() and json.loads(latest.read_text())["step"] >= 2:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()[-2000:]
    assert not out.exists(), "the run finished before it could be killed"
    step = json.loads(latest.read_text())["step"]
    assert 2 <= step < 40

    resumed = subprocess.run(args + ["--resume"], env=ENV, cwd=tmp_path, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout
    assert adapter_bytes(out) == adapter_bytes(reference)
    assert not checkpoint_dir(out).exists()


# ---------------------------------------------------------------------------------------------
# LoRA, full fine-tuning, distillation


@pytest.mark.integration
def test_lora_is_merged_into_plain_layer_weights(tmp_path):
    _, emulator = full_and_emulator("llama", "uniform")
    before = snapshot(emulator.model)
    config = tiny_config(lora=2, lr=1e-2)
    out = train_adapter(emulator, config, tmp_path / "adapter")
    saved = load_file(str(out / ADAPTER_WEIGHTS))
    assert not any("lora" in key or "base_layer" in key for key in saved)
    assert not any("lora" in name for name, _ in emulator.model.named_parameters())
    meta = json.loads((out / ADAPTER_META).read_text())
    # LoRA trains the linear weights only: norms stay, projections move.
    for key, tensor in saved.items():
        _, source, name = key.split(".", 2)
        original = before[f"model.layers.{position(emulator, int(source))}.{name}"]
        assert torch.equal(tensor, original) == ("norm" in name), key
    # The merged layers score the validation docs exactly as the LoRA model did at its best step.
    _, val = split_examples(config)
    merged = mean_answer_loss(emulator.model, emulator.tokenizer, val, batch_size=4, max_length=config.max_length)
    assert merged == pytest.approx(meta["training"]["best_val_loss"], rel=1e-5)
    # And the adapter loads into a fresh emulator with the same result.
    _, fresh = full_and_emulator("llama", "uniform")
    apply_adapter(fresh, load_adapter(out))
    with torch.no_grad():
        assert torch.allclose(fresh.model(**batch(fresh.tokenizer)).logits,
                              emulator.model(**batch(emulator.tokenizer)).logits, atol=1e-6)


@pytest.mark.integration
def test_full_finetuning_writes_a_loadable_hf_model(tmp_path):
    model, tokenizer = tiny_model("opt", L)
    before = snapshot(model)
    out = train_full(model, tokenizer, tiny_config(max_steps=2), tmp_path / "full")
    loaded = AutoModelForCausalLM.from_pretrained(out)
    state = loaded.state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in model.state_dict().items())
    assert sum(not torch.equal(before[n], t) for n, t in state.items()) > len(state) // 2  # all kinds of weights train
    record = json.loads((out / full_ft.TRAINING_META).read_text())
    assert record["format"] == full_ft.FULL_FORMAT and record["training"]["kind"] == "full"
    assert [p["step"] for p in record["validation_curve"]] == [0, 2]
    assert (out / "tokenizer.json").is_file()


def test_distillation_lowers_kd_and_trains_only_the_middle(tmp_path):
    teacher, emulator = full_and_emulator("llama", "uniform")
    texts = CORPUS * 2
    adapter = adapter_storage(emulator)
    before = snapshot(emulator.model)
    config = DistillConfig(steps=12, batch_size=4, lr=3e-3, bf16=False)
    start = distillation_loss(teacher, emulator, texts, config)
    distill_emulator(teacher, emulator, texts, config)
    end = distillation_loss(teacher, emulator, texts, config)
    assert end["kd"] < 0.7 * start["kd"]
    after = emulator.model.state_dict()
    middle = [n for n, t in after.items() if n.startswith("model.layers.") and t.data_ptr() not in adapter]
    assert any(not torch.equal(after[n], before[n]) for n in middle)
    assert all(torch.equal(after[n], before[n]) for n in after if n not in middle)  # adapters, embeddings, head
    assert {id(p) for p in emulator.model.parameters() if p.requires_grad} == \
        {id(p) for layer in emulator.adapter_layers().values() for p in layer.parameters()}
    reloaded = load_emulator(save_bundle(emulator, tmp_path / "distilled"))
    assert distillation_loss(teacher, reloaded, texts, config)["kd"] == pytest.approx(end["kd"], rel=1e-5)


def test_distillation_refuses_another_teacher():
    _, emulator = full_and_emulator("llama", "uniform")
    other, _ = tiny_model("llama", L, hidden_act="gelu")
    with pytest.raises(UsageError, match="not this emulator's base model"):
        distill_emulator(other, emulator, CORPUS, DistillConfig(steps=1, batch_size=2))


def test_distillation_batches_are_a_function_of_the_step():
    """A batch source of the loop: any step's batch, asked in any order, is that step's batch."""
    _, emulator = full_and_emulator("llama", "uniform")
    texts = CORPUS[:5]
    in_order = TextBatches(emulator.tokenizer, texts, 3, 32, seed=4)
    expected = [in_order.batch(step)["input_ids"] for step in range(1, 8)]
    shuffled = TextBatches(emulator.tokenizer, texts, 3, 32, seed=4)
    for step in (6, 2, 7, 1, 5, 3, 4):
        assert torch.equal(shuffled.batch(step)["input_ids"], expected[step - 1])


# ---------------------------------------------------------------------------------------------
# The loop on its own


def _toy_loop(acc, loss_fn, **options):
    """A linear model trained 4 steps on one batch of 2 rows (6 tokens)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    batch = {"x": torch.arange(6.0).reshape(2, 3), "attention_mask": torch.ones(2, 3, dtype=torch.long)}
    return model, loop.TrainingLoop(acc, model, dict(model.named_parameters()), loss_fn, lambda step: [batch], 4,
                                    lr=0.1, schedule=loop.warmup_schedule("cosine", 0.25), grad_clip=1.0, **options)


def test_a_loss_function_may_back_propagate_itself():
    """manual_backward: the loss function runs backward piece by piece, the loop only steps."""
    def whole(model, batch):
        return model(batch["x"]).pow(2).mean()

    acc = runtime.accelerator(bf16=False)

    def pieces(model, batch):
        total = 0.0
        for row in batch["x"]:
            part = model(row[None]).pow(2).mean() / len(batch["x"])
            acc.backward(part)
            total += part.item()
        return torch.tensor(total, dtype=torch.float64)

    one, run_one = _toy_loop(acc, whole)
    a = run_one.run()
    two, run_two = _toy_loop(acc, pieces, manual_backward=True)
    b = run_two.run()
    assert len(a.record["train_losses"]) == 4 and a.record["tokens"] == 4 * 6 and a.curve == []
    assert b.record["train_losses"] == pytest.approx(a.record["train_losses"], rel=1e-6)
    assert torch.allclose(one.weight, two.weight, atol=1e-6) and not one.training


def test_a_loop_without_checkpoints_stops_on_a_non_finite_loss():
    calls = {"n": 0}

    def loss(model, batch):
        calls["n"] += 1
        return model(batch["x"]).mean() * (float("nan") if calls["n"] == 3 else 1.0)

    _, run = _toy_loop(runtime.accelerator(bf16=False), loss, name="toy training")
    with pytest.raises(RunFailure, match=r"^toy training stopped: non-finite loss at step 3$"):
        run.run()


# ---------------------------------------------------------------------------------------------
# Multi-process and CLI


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.integration
def test_two_processes_match_one_with_doubled_accumulation(tmp_path, bundle):
    """`accelerate launch` with the shipped 2-process CPU config (gloo) vs one process, grad-accum 2."""
    common = ["--emulator", str(bundle), "--task", "arc_easy", "--train-samples", "32", "--val-samples", "8",
              "--max-steps", "4", "--batch-size", "4", "--max-length", "40", "--lr", "1e-3", "--eval-every", "2",
              "--no-bf16"]
    two = tmp_path / "two"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(REPO / "configs" / "accelerate_cpu_2proc.yaml"), "--main_process_port", str(_free_port()),
              "-m", "crashlm", "train", *common, "--out", str(two)]
    result = subprocess.run(launch, env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    one = train_adapter(load_emulator(bundle), tiny_config(train_samples=32, max_length=40, grad_accum=2), tmp_path / "one")
    two_meta, one_meta = (json.loads((d / ADAPTER_META).read_text()) for d in (two, one))
    assert two_meta["training"]["num_processes"] == 2 and one_meta["training"]["num_processes"] == 1
    assert two_meta["training"]["train_losses"] == pytest.approx(one_meta["training"]["train_losses"], rel=1e-5)
    assert [p["val_loss"] for p in two_meta["validation_curve"]] == \
        pytest.approx([p["val_loss"] for p in one_meta["validation_curve"]], rel=1e-5)


@pytest.mark.integration
def test_cli_train_and_usage_errors(tmp_path, bundle, capsys):
    out = tmp_path / "adapter"
    main(["train", "--emulator", str(bundle), "--task", "arc_easy", "--train-samples", "16", "--val-samples", "8",
          "--max-steps", "2", "--batch-size", "4", "--max-length", "32", "--no-bf16", "--out", str(out)])
    text = capsys.readouterr().out
    assert "trained adapter layers [0, 5]" in text and "best" in text and str(out) in text
    cases = [
        (["--emulator", str(bundle), "--out", str(out)], "already exists"),
        (["--model", "x", "--out", str(tmp_path / "m")], "add --full"),
        (["--out", str(tmp_path / "m")], "give --emulator"),
        (["--emulator", str(bundle), "--epochs", "1", "--max-steps", "2", "--out", str(tmp_path / "m")], "not both"),
        (["--emulator", str(bundle), "--lora", "0", "--out", str(tmp_path / "m")], "lora must be"),
    ]
    (tmp_path / "junk.partial").mkdir()
    cases.append((["--emulator", str(bundle), "--out", str(tmp_path / "junk")], "not a crashlm training checkpoint"))
    for args, message in cases:
        with pytest.raises(SystemExit) as exc:
            main(["train", "--task", "arc_easy", *args])
        assert exc.value.code == 2
        assert message in capsys.readouterr().err


@pytest.mark.integration
def test_cli_full_finetuning_and_distill(tmp_path, bundle, capsys):
    teacher = save_tiny("llama", tmp_path / "teacher", L)  # the bundle's base model (same seeded weights)
    main(["train", "--model", str(teacher), "--full", "--task", "arc_easy", "--train-samples", "8", "--val-samples",
          "4", "--max-steps", "1", "--batch-size", "4", "--max-length", "32", "--out", str(tmp_path / "full")])
    assert "trained all weights" in capsys.readouterr().out
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "full").config.num_hidden_layers == L

    out = tmp_path / "distilled"
    main(["distill", "--model", str(teacher), "--emulator", str(bundle), "--steps", "2", "--batch-size", "2",
          "--max-length", "32", "--out", str(out)])
    assert "KD" in capsys.readouterr().out
    assert load_emulator(out).plan.trainable == load_emulator(bundle).plan.trainable
    with pytest.raises(SystemExit) as exc:
        main(["distill", "--model", str(teacher), "--emulator", str(bundle), "--out", str(out)])
    assert exc.value.code == 2 and "already exists" in capsys.readouterr().err


@pytest.mark.integration
def test_real_model_adapter_round(tmp_path):
    """SmolLM2-135M: a uniform emulator trains 2 steps on 16 PIQA docs; the adapter plugs into the model."""
    from crashlm.core.models import load_model
    from crashlm.emulators.plugin import plug_in

    model, tokenizer = load_model("smollm2-135m")
    emulator = build_emulator(model, tokenizer, EmulatorSpec(plan_for(model, "uniform", model_name="smollm2-135m")))
    out = train_adapter(emulator, TrainConfig(task="piqa", train_samples=16, val_samples=8, max_steps=2,
                                              batch_size=8, max_length=64), tmp_path / "adapter")
    meta = json.loads((out / ADAPTER_META).read_text())
    assert meta["sources"] == emulator.plan.trainable and meta["training"]["best_val_loss"] < 10
    plugged = plug_in("smollm2-135m", out, tmp_path / "plugged")
    assert (plugged / "model.safetensors").is_file()


@pytest.mark.parametrize("name", ["cosine", "linear"])
@pytest.mark.parametrize("total", [1, 7, 100, 1013])
def test_warmup_schedules_give_transformers_learning_rates(name, total):
    """Our schedules replace transformers' (whose import pulls in peft); the rates must be the same floats."""
    reference = {"cosine": get_cosine_schedule_with_warmup, "linear": get_linear_schedule_with_warmup}[name]
    params = [torch.nn.Parameter(torch.zeros(1))]
    ours_opt, ref_opt = torch.optim.AdamW(params, lr=1e-4), torch.optim.AdamW(params, lr=1e-4)
    ours = loop.warmup_schedule(name, 0.06)(ours_opt, total)
    ref = reference(ref_opt, math.ceil(0.06 * total), total)  # the warmup the old code passed
    for _ in range(total + 2):
        assert ours.get_last_lr() == ref.get_last_lr()
        ours_opt.step(), ref_opt.step(), ours.step(), ref.step()
