"""Logit and tuned lens: exactness at the output, the final norm, training, persistence, emulators, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from crashlm.analysis.lens import (
    LensStats,
    Trajectory,
    TunedLens,
    decode,
    emulator_depth,
    layer_log_probs,
    lens_statistics,
    token_states,
    trajectory,
)
from crashlm.analysis.tuned_lens import LensTrainConfig, train_tuned_lens
from crashlm.core.errors import UsageError
from crashlm.core.models import fingerprint, get_final_norm, get_layers, get_unembed
from crashlm.emulators.bundle import save_bundle
from crashlm.emulators.emulator import build_emulator
from crashlm.emulators.plans import EmulatorSpec, Sharing, uniform_plan
from tests.cli import run_cli
from tests.tiny import TINY_LAYOUTS, batch, save_tiny, tiny_model

TEXTS = [
    "The capital of France is Paris.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "A small model fine-tunes an adapter that plugs into the full model.",
    "The quick brown fox jumps over the lazy dog.",
]
# Random tiny models at the default init scale have nearly identical layers; a larger scale
# gives layers whose lens distributions differ by about a nat, so training has work to do.
SPREAD = dict(initializer_range=0.2)


def real_token_logits(model, tokenizer, texts=None) -> tuple[torch.Tensor, object]:
    """The model's own logits at the real (non-pad) tokens of a padded batch, and the states."""
    inputs = batch(tokenizer, texts)
    with torch.no_grad():
        logits = model(**inputs).logits
    states = token_states(model, tokenizer, texts or ["The capital of France is", "Water boils at one hundred degrees Celsius"])
    return logits[inputs["attention_mask"].bool()], states


# ---------------------------------------------------------------------------------------------
# Logit lens


@pytest.mark.parametrize("arch", TINY_LAYOUTS)
def test_logit_lens_at_the_last_layer_is_the_models_own_logits(arch):
    model, tokenizer = tiny_model(arch)
    expected, states = real_token_logits(model, tokenizer)
    assert states.states.shape[:2] == (len(get_layers(model)) + 1, expected.shape[0])
    torch.testing.assert_close(decode(model, states.states[-1], len(get_layers(model))), expected, rtol=1e-4, atol=1e-4)
    # An untrained (zero) tuned lens is the logit lens at every layer, not only the last.
    zero = TunedLens.for_model(model)
    torch.testing.assert_close(layer_log_probs(model, states.states, zero), layer_log_probs(model, states.states))


def test_logit_lens_applies_the_final_norm_before_the_unembedding():
    """The original code decoded lm_head(h); the lens must decode lm_head(norm(h))."""
    model, tokenizer = tiny_model("llama", **SPREAD)
    _, states = real_token_logits(model, tokenizer)
    hidden = states.states[2]
    with torch.no_grad():
        with_norm = get_unembed(model)(get_final_norm(model)(hidden))
        without_norm = get_unembed(model)(hidden)
    torch.testing.assert_close(decode(model, hidden, 2), with_norm)
    assert not torch.allclose(decode(model, hidden, 2), without_norm, atol=1e-3)


def test_token_states_follow_the_text_and_ignore_padding():
    model, tokenizer = tiny_model("gpt2")
    both = token_states(model, tokenizer, TEXTS[:2])
    alone = [token_states(model, tokenizer, [text]) for text in TEXTS[:2]]
    torch.testing.assert_close(both.states, torch.cat([a.states for a in alone], 1), rtol=1e-4, atol=1e-5)
    ids = tokenizer(TEXTS[0])["input_ids"]
    assert alone[0].targets.tolist() == [*ids[1:], -100]


def test_lens_statistics_at_the_output_match_the_models_loss():
    model, tokenizer = tiny_model("llama", **SPREAD)
    stats = lens_statistics(model, tokenizer, TEXTS[:1], name="tiny")
    ids = tokenizer(TEXTS[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert stats.kl_to_final[-1] == pytest.approx(0.0, abs=1e-6)
    assert stats.top1_agreement[-1] == 1.0
    assert stats.cross_entropy[-1] == pytest.approx(loss, rel=1e-5)
    assert stats.perplexity[-1] == pytest.approx(math.exp(loss), rel=1e-5)
    assert stats.tokens == ids.shape[1] and stats.predicted_tokens == ids.shape[1] - 1
    assert stats.depth == list(range(7)) and min(stats.kl_to_final[:-1]) > 0.01
    assert LensStats.from_dict(json.loads(json.dumps(stats.to_dict()))) == stats


def test_lens_statistics_do_not_depend_on_batching_or_chunking():
    model, tokenizer = tiny_model("opt", **SPREAD)
    a = lens_statistics(model, tokenizer, TEXTS, batch_size=4)
    b = lens_statistics(model, tokenizer, TEXTS, batch_size=1, chunk_tokens=3)
    for key in ("kl_to_final", "top1_agreement", "cross_entropy"):
        assert getattr(a, key) == pytest.approx(getattr(b, key), rel=1e-4, abs=1e-6)
    assert (a.tokens, a.predicted_tokens) == (b.tokens, b.predicted_tokens)


def test_trajectory_decodes_every_layer_at_every_prompt_position():
    model, tokenizer = tiny_model("llama", **SPREAD)
    prompt = "The capital of France is"
    path = trajectory(model, tokenizer, prompt, name="tiny")
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        probs = model(input_ids=ids).logits[0].softmax(-1)
    assert path.num_layers == 6 and len(path.top_tokens) == len(path.top_probs) == 7
    assert "".join(path.input_tokens) == prompt
    assert path.top_tokens[-1] == [tokenizer.decode([t]) for t in probs.argmax(-1).tolist()]
    assert path.top_probs[-1] == pytest.approx(probs.max(-1).values.tolist(), rel=1e-5)
    assert all(0.0 < p <= 1.0 for row in path.top_probs for p in row)
    assert Trajectory.from_dict(path.to_dict()) == path
    with pytest.raises(UsageError, match="empty"):
        trajectory(model, tokenizer, "  ")


# ---------------------------------------------------------------------------------------------
# Tuned lens


def test_tuned_lens_training_lowers_kl_at_every_layer_it_trained():
    model, tokenizer = tiny_model("llama", **SPREAD)
    before = lens_statistics(model, tokenizer, TEXTS)
    lens, losses = train_tuned_lens(model, tokenizer, TEXTS, LensTrainConfig(steps=25, lr=1e-2, warmup_steps=0))
    after = lens_statistics(model, tokenizer, TEXTS, lens)
    assert len(losses) == 25 and losses[-1] < 0.5 * losses[0]
    for layer in range(lens.num_layers):  # every translator: embeddings and layers 1..L-1
        assert after.kl_to_final[layer] < before.kl_to_final[layer], layer
    assert after.kl_to_final[-1] == before.kl_to_final[-1] == pytest.approx(0.0, abs=1e-6)
    assert all(p.requires_grad for p in model.parameters())  # the model was frozen only while training
    assert lens.training_config["steps"] == 25 and lens.training_config["texts"] == len(TEXTS)


def test_train_config_refuses_bad_values():
    with pytest.raises(UsageError, match="steps"):
        LensTrainConfig(steps=0)
    with pytest.raises(UsageError, match="lr"):
        LensTrainConfig(lr=float("nan"))
    with pytest.raises(UsageError, match="unknown"):
        LensTrainConfig.from_dict({"steps": 3, "nope": 1})
    assert LensTrainConfig.from_dict(LensTrainConfig(steps=3).to_dict()) == LensTrainConfig(steps=3)


def trained_lens(model, tokenizer, name="tiny"):
    lens, _ = train_tuned_lens(model, tokenizer, TEXTS[:2], LensTrainConfig(steps=3, lr=1e-2, warmup_steps=0),
                               name=name, base_fingerprint=fingerprint(model))
    return lens


def test_tuned_lens_save_load_round_trip(tmp_path):
    model, tokenizer = tiny_model("llama", **SPREAD)
    lens = trained_lens(model, tokenizer)
    lens.save(tmp_path / "lens")
    assert sorted(p.name for p in (tmp_path / "lens").iterdir()) == ["lens.json", "lens.safetensors"]
    loaded = TunedLens.load(tmp_path / "lens")
    assert (loaded.num_layers, loaded.hidden_size, loaded.model) == (6, 32, "tiny")
    assert loaded.base_fingerprint == fingerprint(model)
    assert loaded.training_config == json.loads(json.dumps(lens.training_config))
    for name, tensor in lens.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)
    states = token_states(model, tokenizer, TEXTS[:1]).states
    torch.testing.assert_close(layer_log_probs(model, states, loaded), layer_log_probs(model, states, lens))
    assert TunedLens.load(tmp_path / "lens" / "lens.json").num_layers == 6


def test_a_lens_for_another_model_is_refused(tmp_path):
    model, tokenizer = tiny_model("llama", **SPREAD)
    lens = trained_lens(model, tokenizer)
    shallow, _ = tiny_model("llama", num_layers=4)
    with pytest.raises(UsageError, match="trained for 6 layers of width 32, this model has 4 layers"):
        lens_statistics(shallow, tokenizer, TEXTS[:1], lens)
    wide, _ = tiny_model("llama", hidden_size=64)
    with pytest.raises(UsageError, match="width"):
        trajectory(wide, tokenizer, "The capital", lens)
    other, _ = tiny_model("mistral")  # same shape, other weights: only the fingerprint tells
    lens.check_model(other)
    with pytest.raises(UsageError, match="trained on another model"):
        lens.check_base(fingerprint(other))
    lens.check_base(fingerprint(model))


def test_damaged_or_foreign_lens_directories_are_usage_errors(tmp_path):
    model, tokenizer = tiny_model("llama")
    trained_lens(model, tokenizer).save(tmp_path / "lens")
    with pytest.raises(UsageError, match="not found"):
        TunedLens.load(tmp_path / "missing")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "lens.json").write_text('{"format": "something-else"}')
    with pytest.raises(UsageError, match="not a crashlm tuned lens"):
        TunedLens.load(tmp_path / "other")
    weights = tmp_path / "lens" / "lens.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(UsageError, match="sha256"):
        TunedLens.load(tmp_path / "lens")


# ---------------------------------------------------------------------------------------------
# Emulators


def tiny_emulator(sharing: bool):
    model, tokenizer = tiny_model("llama", **SPREAD)
    plan = uniform_plan(6, k=4, trainable=2, base_fingerprint=fingerprint(model))
    return build_emulator(model, tokenizer, EmulatorSpec(plan, Sharing.COPIES if sharing else Sharing.NONE))


def test_emulator_states_map_to_full_model_depth_through_the_plan_slots():
    dropped = tiny_emulator(sharing=False)
    assert [s.source for s in dropped.slots] == dropped.plan.kept
    assert emulator_depth(dropped) == [0, *(s + 1 for s in dropped.plan.kept)]
    shared = tiny_emulator(sharing=True)
    assert emulator_depth(shared) == list(range(7))


def test_a_tuned_lens_decodes_emulator_states_with_the_translators_of_their_depth():
    full, tokenizer = tiny_model("llama", **SPREAD)
    lens = trained_lens(full, tokenizer)
    emulator = tiny_emulator(sharing=False)
    depth = emulator_depth(emulator)  # [0, 1, 2, 5, 6] for kept layers 0, 1, 4, 5
    states = token_states(emulator.model, tokenizer, TEXTS[:1]).states
    decoded = layer_log_probs(emulator.model, states, lens, depth)
    for state, index in enumerate([*depth[:-1], 6]):
        expected = decode(emulator.model, states[state], index, lens).log_softmax(-1)
        torch.testing.assert_close(decoded[state], expected)
    stats = lens_statistics(emulator.model, tokenizer, TEXTS, lens, depth=depth, name="emu")
    assert stats.depth == depth and stats.num_layers == 4 and stats.kl_to_final[-1] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(UsageError, match="depth"):
        lens_statistics(emulator.model, tokenizer, TEXTS, lens, depth=[0, 1, 2])


# ---------------------------------------------------------------------------------------------
# Command line


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "texts.txt"
    path.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    return path


def test_cli_help_of_lens_and_lens_train(capsys):
    code, out, _ = run_cli(["lens", "--help"], capsys)
    assert code == 0 and "--emulator" in out and "train" in out
    code, out, _ = run_cli(["lens", "train", "--help"], capsys)
    assert code == 0 and "--steps" in out and "--emulator" not in out


def test_cli_lens_with_an_emulator_and_a_trained_lens(tiny_llama_dir, text_file, tmp_path, capsys):
    model, tokenizer = tiny_model("llama")  # the same weights as tiny_llama_dir
    plan = uniform_plan(6, k=4, trainable=2, base_fingerprint=fingerprint(model))
    save_bundle(build_emulator(model, tokenizer, EmulatorSpec(plan)), tmp_path / "uniform-emu")

    lens_dir = tmp_path / "tuned"
    code, out, err = run_cli(["lens", "train", "--model", str(tiny_llama_dir), "--text", str(text_file),
                              "--steps", "3", "--batch-size", "2", "--out", str(lens_dir)], capsys)
    assert code == 0, err
    assert "6 translators, 3 steps on 4 texts" in " ".join(out.split())
    meta = json.loads((lens_dir / "lens.json").read_text())
    assert meta["training"]["source"] == "text:texts.txt" and len(meta["training"]["losses"]) == 3

    out_dir = tmp_path / "lens"
    code, out, err = run_cli(["lens", "--model", str(tiny_llama_dir), "--emulator", str(tmp_path / "uniform-emu"),
                              "--lens", "tuned", "--lens-path", str(lens_dir), "--text", str(text_file),
                              "--samples", "3", "--prompt", "The capital of France", "--out", str(out_dir)], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "lens.json", "lens_curves.png", "trajectory.png", "trajectory_uniform-emu.png"]
    record = json.loads((out_dir / "lens.json").read_text())
    assert record["settings"]["lens"] == "tuned" and record["settings"]["samples"] == 3
    full, emulator = (LensStats.from_dict(item) for item in record["models"])
    assert (full.num_layers, emulator.num_layers) == (6, 4)
    assert emulator.depth == [0, *(s + 1 for s in plan.kept)] and emulator.model.startswith("uniform-emu (uniform")
    assert full.lens == emulator.lens == "tuned"
    assert [Trajectory.from_dict(t).num_layers for t in record["trajectories"]] == [6, 4]


@pytest.mark.integration
def test_cli_lens_on_a_task(tiny_llama_dir, tmp_path, capsys):
    code, out, err = run_cli(["lens", "--model", str(tiny_llama_dir), "--task", "piqa", "--samples", "2",
                              "--max-length", "32", "--out", str(tmp_path / "lens")], capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "lens" / "lens.json").read_text())
    assert record["settings"]["source"] == "piqa" and record["models"][0]["samples"] == 2
    assert "logit lens, 2 samples" in " ".join(out.split())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--lens", "fancy"], "unknown lens 'fancy'"),
        (["--lens", "tuned"], "--lens tuned needs --lens-path"),
        (["--lens", "tuned", "--lens-path", "NOWHERE"], "tuned lens not found"),
        (["--lens-path", "NOWHERE"], "--lens-path applies to --lens tuned"),
        (["--text", "EMPTY"], "has no non-empty line"),
        (["--samples", "0"], "--samples must be a positive integer"),
        (["--prompt", " "], "--prompt is empty"),
        (["--emulator", "NOWHERE"], "emulator bundle not found"),
    ],
)
def test_cli_lens_bad_inputs_exit_2_with_one_line(tiny_llama_dir, tmp_path, capsys, args, message):
    (tmp_path / "empty.txt").write_text("\n  \n")
    args = [str(tmp_path / "empty.txt") if a == "EMPTY" else str(tmp_path / "x") if a == "NOWHERE" else a for a in args]
    out = tmp_path / "out"
    code, _, err = run_cli(["lens", "--model", str(tiny_llama_dir), *args, "--out", str(out)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in " ".join(err.split())
    assert not out.exists()


def test_cli_a_lens_for_another_model_exits_2(tiny_llama_dir, text_file, tmp_path, capsys):
    model, tokenizer = tiny_model("llama", **SPREAD)  # same shape as tiny_llama_dir, other weights
    trained_lens(model, tokenizer).save(tmp_path / "lens")
    code, _, err = run_cli(["lens", "train", "--model", str(tiny_llama_dir), "--text", str(tmp_path / "none.txt"),
                            "--out", str(tmp_path / "t")], capsys)
    assert code == 2 and "--text file not found" in err
    code, _, err = run_cli(["lens", "--model", str(tiny_llama_dir), "--lens", "tuned", "--lens-path", str(tmp_path / "lens"),
                            "--text", str(text_file), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "trained on another model" in err and len(err.strip().splitlines()) == 1
    plan = uniform_plan(6, k=4, trainable=2, base_fingerprint=fingerprint(model))
    save_bundle(build_emulator(model, tokenizer, EmulatorSpec(plan)), tmp_path / "foreign-emu")
    code, _, err = run_cli(["lens", "--model", str(tiny_llama_dir), "--emulator", str(tmp_path / "foreign-emu"),
                            "--text", str(text_file), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "was built from another model" in " ".join(err.split())
    gpt2 = save_tiny("gpt2", tmp_path / "gpt2", num_layers=4)
    code, _, err = run_cli(["lens", "--model", str(gpt2), "--lens", "tuned", "--lens-path", str(tmp_path / "lens"),
                            "--text", str(text_file), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "trained on another model" in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# The real model


@pytest.mark.integration
def test_cli_lens_and_lens_train_on_the_real_model(tmp_path, capsys):
    code, out, err = run_cli(["lens", "train", "--samples", "4", "--steps", "2", "--batch-size", "2",
                              "--max-length", "24", "--out", str(tmp_path / "tuned")], capsys)
    assert code == 0, err
    lens = TunedLens.load(tmp_path / "tuned")
    assert (lens.num_layers, lens.hidden_size, lens.model) == (30, 576, "smollm2-135m")
    code, out, err = run_cli(["lens", "--samples", "2", "--max-length", "48", "--lens", "tuned", "--lens-path",
                              str(tmp_path / "tuned"), "--out", str(tmp_path / "lens")], capsys)
    assert code == 0, err
    stats = LensStats.from_dict(json.loads((tmp_path / "lens" / "lens.json").read_text())["models"][0])
    assert stats.num_layers == 30 and stats.top1_agreement[-1] == 1.0
    # The real model is sharper at its output than at its first layers (a random one is not).
    assert stats.cross_entropy[-1] < min(stats.cross_entropy[:5])
    assert stats.kl_to_final[-2] < stats.kl_to_final[1]
    assert (tmp_path / "lens" / "trajectory.png").stat().st_size > 10_000
