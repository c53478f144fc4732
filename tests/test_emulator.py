"""Emulators, bundles, adapters and plug-in, on tiny random models of several architectures.

Every full model here has its weights perturbed with seeded noise, so no two tensors of
different layers are equal (fresh norms are all ones everywhere): the privacy check can then
see any removed layer's tensor that a bundle might hold.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import crashlm
from crashlm.analysis.similarity import SimilarityResult
from crashlm.core import assets
from crashlm.core.errors import UsageError
from crashlm.core.models import fingerprint, get_layers, load_model
from crashlm.emulators.bundle import (
    BASE_WEIGHTS,
    LAYER_WEIGHTS,
    MANIFEST,
    is_bundle,
    leaked_tensors,
    load_emulator,
    read_manifest,
    save_bundle,
)
from crashlm.emulators.emulator import build_emulator
from crashlm.emulators.plans import EmulatorSpec, LayerPlan, Sharing, SlotKind
from crashlm.emulators.plugin import (
    ADAPTER_META,
    ADAPTER_WEIGHTS,
    PLUGIN_META,
    apply_adapter,
    load_adapter,
    save_adapter,
)
from crashlm.emulators.strategies import get_strategy, plan_for, strategy_name
from crashlm.emulators.targets import resolve_target
from tests.cli import run_cli
from tests.tiny import batch, tiny_model

L, K, TRAINABLE = 8, 5, 2
HF_WEIGHTS = "model.safetensors"  # what save_pretrained writes: a bundle without sharing
ARCHS = ["llama", "gpt2", "opt", "gemma3_text", "gpt_neox"]
# (strategy, share_trainable): every slot layout, the tied one included.
LAYOUTS = [("uniform", False), ("crash", False), ("crash-share", False), ("crash-share", True)]


def synthetic_similarity(num_layers: int) -> SimilarityResult:
    """A similarity profile with distinct adjacent values (clusters of unequal sizes)."""
    adjacent = [0.5 + 0.45 * ((7 * i) % num_layers) / num_layers for i in range(num_layers)]
    cka = [[1.0 if i == j else 0.5 for j in range(num_layers + 1)] for i in range(num_layers + 1)]
    for i, value in enumerate(adjacent):
        cka[i][i + 1] = cka[i + 1][i] = value
    return SimilarityResult(model="tiny", task="synthetic", samples=8, pooling="mean", estimator="biased",
                            minibatch=None, num_layers=num_layers, cka=cka, adjacent=adjacent)


@functools.lru_cache(maxsize=None)
def _full(arch: str, tied: bool):
    model, tokenizer = tiny_model(arch, L, tie_word_embeddings=tied)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    return model, tokenizer


def full_model(arch: str, tied: bool = False):
    """A fresh copy of the perturbed tiny model (build_emulator consumes its input)."""
    model, tokenizer = _full(arch, tied)
    return copy.deepcopy(model), tokenizer


def logits(model, tokenizer) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch(tokenizer)).logits


def emulator_of(arch: str, strategy: str, share_trainable: bool = False, tied: bool = False):
    model, tokenizer = full_model(arch, tied)
    plan = plan_for(model, strategy, K, TRAINABLE, synthetic_similarity(L), model_name="tiny")
    sharing = Sharing.TIED if share_trainable else get_strategy(strategy).sharing
    return build_emulator(model, tokenizer, EmulatorSpec(plan, sharing))


def assert_stack_follows_plan(emulator, full) -> None:
    """Positions hold the plan's modules: right source weights, one object per key, only adapters train."""
    slots = emulator.slots
    layers = get_layers(emulator.model)
    assert len(layers) == len(slots) == emulator.model.config.num_hidden_layers
    original = get_layers(full)
    for slot, layer in zip(slots, layers):
        for name, tensor in layer.state_dict().items():
            assert torch.equal(tensor, original[slot.source].state_dict()[name]), (slot, name)
    for a in slots:
        for b in slots:
            assert (layers[a.position] is layers[b.position]) == (a.key == b.key)
    adapter = {id(p) for layer in emulator.adapter_layers().values() for p in layer.parameters()}
    assert {id(p) for p in emulator.model.parameters() if p.requires_grad} == adapter
    assert {id(p) for p in emulator.trainable_parameters()} == adapter
    assert sorted(emulator.adapter_layers()) == emulator.plan.trainable


def words(text: str) -> str:
    """``text`` with rich's line wrapping undone."""
    return " ".join(text.split())


def assert_one_line(error: pytest.ExceptionInfo) -> None:
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------------------------------------
# Building


@pytest.mark.parametrize("share_trainable", [False, True])
def test_sharing_fills_each_removed_position_with_the_nearest_kept_layer(share_trainable):
    # Kept 1, 4, 6; 1 and 6 train. Position 5 is a tie between 4 and 6: the higher (6) wins.
    full, tokenizer = full_model("llama")
    plan = LayerPlan(L, "custom", kept=[1, 4, 6], trainable=[1, 6], base_fingerprint=fingerprint(full))
    sharing = Sharing.TIED if share_trainable else Sharing.COPIES
    emulator = build_emulator(full_model("llama")[0], tokenizer, EmulatorSpec(plan, sharing))
    layers, original = get_layers(emulator.model), get_layers(full)
    sources = [1, 1, 1, 4, 4, 6, 6, 6]
    for position, source in enumerate(sources):
        assert torch.equal(layers[position].mlp.up_proj.weight, original[source].mlp.up_proj.weight), position
    assert layers[3] is layers[4]  # a frozen kept layer is shared as the same module
    adapters = emulator.adapter_layers()
    assert layers[1] is adapters[1] and layers[6] is adapters[6]
    for position, source in [(0, 1), (2, 1), (5, 6), (7, 6)]:
        # The trainable neighbour: tied with --share-trainable, else one frozen copy per source.
        assert (layers[position] is adapters[source]) == share_trainable
        assert all(p.requires_grad == share_trainable for p in layers[position].parameters())
    assert (layers[0] is layers[2]) and (layers[5] is layers[7])
    assert emulator.summary()["unique_layers"] == (3 if share_trainable else 5)


def test_copies_are_frozen_clones_and_training_an_adapter_leaves_them_alone():
    emulator = emulator_of("llama", "crash-share")
    copies = emulator.layers(SlotKind.COPY)
    assert copies and set(emulator.modules_by_key()) >= {f"copy.{source}" for source in copies}
    for source, clone in copies.items():
        adapter = emulator.adapter_layers()[source]
        assert clone not in emulator.adapter_layers().values() and clone in emulator.frozen_modules()
        assert not any(p.requires_grad for p in clone.parameters())
        before = {n: t.clone() for n, t in clone.state_dict().items()}
        with torch.no_grad():
            for p in adapter.parameters():
                p.add_(1.0)
        assert all(torch.equal(t, before[n]) for n, t in clone.state_dict().items())


def test_plan_for_checks_k_before_anything_and_stamps_the_model():
    model, _ = full_model("llama")
    with pytest.raises(UsageError, match="out of range"):
        plan_for(model, "crash", k=L + 1, trainable=TRAINABLE)  # no similarity needed to fail
    with pytest.raises(UsageError, match="unknown emulator strategy"):
        plan_for(model, "random")
    plan = plan_for(model, "uniform", k=K, trainable=TRAINABLE, model_name="tiny")
    assert plan.base_fingerprint == fingerprint(model) and plan.model == "tiny" and plan.k == K
    with pytest.raises(UsageError, match="6 layers"):
        plan_for(model, "crash", k=K, similarity=synthetic_similarity(6))


def test_a_plan_for_another_model_is_refused():
    model, tokenizer = full_model("llama")
    other, _ = full_model("gpt2")
    plan = plan_for(other, "uniform", K, TRAINABLE)
    with pytest.raises(UsageError, match="another base model"):
        build_emulator(model, tokenizer, EmulatorSpec(plan))


# ---------------------------------------------------------------------------------------------
# Bundles


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("strategy, share_trainable", LAYOUTS)
def test_emulator_follows_the_plan_and_its_bundle_round_trips_without_removed_layers(
    arch, strategy, share_trainable, tmp_path
):
    emulator = emulator_of(arch, strategy, share_trainable)
    full, tokenizer = full_model(arch)
    assert_stack_follows_plan(emulator, full)
    kinds = {slot.kind for slot in emulator.slots}
    held = {SlotKind.ADAPTER, SlotKind.FROZEN}
    if strategy == "crash-share":
        assert len(emulator.slots) == L and emulator.model.config.use_cache is False
        assert kinds == (held if share_trainable else held | {SlotKind.COPY})
    else:
        assert [s.source for s in emulator.slots] == emulator.plan.kept and kinds == held
    assert emulator.strategy == strategy
    expected = logits(emulator.model, tokenizer)
    assert expected.shape[-1] == full.config.vocab_size and torch.isfinite(expected).all()

    bundle = save_bundle(emulator, tmp_path / "bundle")
    assert is_bundle(bundle)
    loaded = load_emulator(bundle)
    assert loaded.slots == emulator.slots and loaded.base_fingerprint == emulator.base_fingerprint
    assert_stack_follows_plan(loaded, full)
    assert torch.equal(logits(loaded.model, tokenizer), expected)
    assert torch.equal(logits(crashlm.load_emulator(bundle).model, tokenizer), expected)  # the package-level entry

    # Privacy: no tensor of a removed layer; the same check does see the kept ones.
    assert leaked_tensors(bundle, full) == []
    assert leaked_tensors(bundle, full, layers=emulator.plan.kept)

    manifest = json.loads((bundle / MANIFEST).read_text())
    assert strategy_name(read_manifest(bundle).spec) == strategy and manifest["spec"] == emulator.spec.to_dict()
    if get_strategy(strategy).shares:
        assert set(manifest["sha256"]) == {LAYER_WEIGHTS, BASE_WEIGHTS}
        stored = {".".join(name.split(".")[1:3]) for name in load_file(bundle / LAYER_WEIGHTS)}
        assert stored == set(loaded.modules_by_key())  # each unique module once
    else:
        assert set(manifest["sha256"]) == {HF_WEIGHTS}
        plain = AutoModelForCausalLM.from_pretrained(bundle)
        assert torch.equal(logits(plain, tokenizer), expected)


def test_tied_embeddings_are_stored_once_and_tied_again(tmp_path):
    emulator = emulator_of("llama", "crash-share", tied=True)
    expected = logits(emulator.model, emulator.tokenizer)
    bundle = save_bundle(emulator, tmp_path / "bundle")
    assert "lm_head.weight" not in load_file(bundle / BASE_WEIGHTS)
    loaded = load_emulator(bundle)
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight
    assert torch.equal(logits(loaded.model, loaded.tokenizer), expected)


def test_leak_check_compares_a_bfloat16_bundle_with_the_float32_model(tmp_path):
    """A bf16 copy of a layer is that layer: the check casts the model's tensors to the bundle's dtype."""
    full, tokenizer = full_model("gpt2")
    plan = plan_for(full, "crash", K, TRAINABLE, synthetic_similarity(L))
    emulator = build_emulator(full_model("gpt2")[0].to(torch.bfloat16), tokenizer, EmulatorSpec(plan, Sharing.COPIES))
    bundle = save_bundle(emulator, tmp_path / "bundle")
    assert {t.dtype for t in load_file(bundle / LAYER_WEIGHTS).values()} == {torch.bfloat16}
    assert leaked_tensors(bundle, full) == []
    leaked = leaked_tensors(bundle, full, layers=plan.kept)
    assert {int(name.split(".")[1]) for name in leaked} == set(plan.kept)


@pytest.mark.parametrize("strategy", ["crash", "crash-share"])
@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_tensor_file_is_refused_in_one_line(strategy, damage, tmp_path):
    bundle = save_bundle(emulator_of("llama", strategy), tmp_path / "bundle")
    target = bundle / (LAYER_WEIGHTS if get_strategy(strategy).shares else HF_WEIGHTS)
    data = bytearray(target.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        del data[len(data) // 2:]
    target.write_bytes(bytes(data))
    with pytest.raises(UsageError, match="does not match its recorded sha256") as error:
        load_emulator(bundle)
    assert_one_line(error)
    if damage == "flip":
        return  # with a matching hash, a flipped value is a valid (other) model: only the hash can tell

    # Even with the manifest edited to match, a truncated file is a one-line error.
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["sha256"][target.name] = hashlib.sha256(bytes(data)).hexdigest()
    (bundle / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UsageError) as error:
        load_emulator(bundle)
    assert_one_line(error)


def test_not_a_bundle_is_a_usage_error(tmp_path):
    assert not is_bundle(tmp_path)
    with pytest.raises(UsageError, match="not found"):
        load_emulator(tmp_path / "missing")
    (tmp_path / MANIFEST).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(UsageError, match="not a crashlm emulator bundle"):
        load_emulator(tmp_path)


def test_bundle_with_missing_tensor_file_is_refused(tmp_path):
    bundle = save_bundle(emulator_of("gpt2", "crash-share"), tmp_path / "bundle")
    (bundle / BASE_WEIGHTS).unlink()
    with pytest.raises(UsageError, match="missing"):
        load_emulator(bundle)


def as_version_1(bundle, spec: EmulatorSpec) -> None:
    """Rewrite a bundle's manifest as crashlm wrote it before specs: strategy, flags, slots and layout too."""
    manifest = json.loads((bundle / MANIFEST).read_text())
    del manifest["spec"]
    manifest.update(version=1, layout="deduplicated" if spec.shares else "transformers", strategy=strategy_name(spec),
                    plan=spec.plan.to_dict(), sharing=spec.shares, share_trainable=spec.sharing is Sharing.TIED,
                    slots=[{"position": s.position, "source": s.source, "module": s.key} for s in spec.slots])
    (bundle / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("strategy, share_trainable", LAYOUTS)
def test_the_manifest_states_each_fact_once_and_a_version_1_bundle_still_loads(strategy, share_trainable, tmp_path):
    emulator = emulator_of("llama", strategy, share_trainable)
    bundle = save_bundle(emulator, tmp_path / "bundle")
    manifest = json.loads((bundle / MANIFEST).read_text())
    assert set(manifest) == {"format", "version", "spec", "base_fingerprint", "summary", "crashlm_version",
                             "transformers_version", "torch_version", "sha256"}
    assert manifest["version"] == 2 and manifest["spec"]["sharing"] == emulator.sharing.value

    as_version_1(bundle, emulator.spec)
    loaded = load_emulator(bundle)
    assert loaded.spec == emulator.spec and loaded.strategy == strategy
    assert torch.equal(logits(loaded.model, loaded.tokenizer), logits(emulator.model, emulator.tokenizer))
    manifest = json.loads((bundle / MANIFEST).read_text())
    (bundle / MANIFEST).write_text(json.dumps({**manifest, "slots": manifest["slots"][::-1]}))
    with pytest.raises(UsageError, match="do not follow from the bundle's plan"):
        load_emulator(bundle)


# ---------------------------------------------------------------------------------------------
# Adapters and plug-in


def adapter_from(emulator, path, base_fingerprint: str | None = None):
    """The emulator's adapter layers as they are now, saved as an adapter directory."""
    return save_adapter(emulator.adapter_layers(), path, base_fingerprint or emulator.base_fingerprint,
                        emulator.plan, training={"steps": 0}, validation_curve=[])


@pytest.mark.parametrize(
    "arch, strategy", [(arch, "crash-share") for arch in ARCHS] + [("llama", "uniform"), ("llama", "crash")]
)
def test_an_untrained_adapter_plugged_in_gives_the_original_logits(arch, strategy, tmp_path):
    emulator = emulator_of(arch, strategy)
    adapter = load_adapter(adapter_from(emulator, tmp_path / "adapter"))
    assert adapter.sources == emulator.plan.trainable
    full, tokenizer = full_model(arch)
    expected = logits(full, tokenizer)
    apply_adapter(full, adapter)
    assert torch.equal(logits(full, tokenizer), expected)


def test_plug_in_positions_are_the_plans_trainable_layers(tmp_path):
    emulator = emulator_of("llama", "crash-share")
    trained = {source: layer.mlp.down_proj.weight for source, layer in emulator.adapter_layers().items()}
    with torch.no_grad():
        for weight in trained.values():
            weight.add_(0.5)
    adapter = load_adapter(adapter_from(emulator, tmp_path / "adapter"))

    # Full model: exactly the trained tensors of the plan's trainable layers change.
    full, _ = full_model("llama")
    before = {n: t.clone() for n, t in full.state_dict().items()}
    apply_adapter(full, adapter)
    changed = {n for n, t in full.state_dict().items() if not torch.equal(t, before[n])}
    assert changed == {f"model.layers.{s}.mlp.down_proj.weight" for s in emulator.plan.trainable}

    # Emulator: the adapter positions take the weights; the frozen copies keep the pretrained ones.
    fresh = load_emulator(save_bundle(emulator_of("llama", "crash-share"), tmp_path / "bundle"))
    apply_adapter(fresh, adapter)
    layers = get_layers(fresh.model)
    for slot in fresh.slots:
        weight = layers[slot.position].mlp.down_proj.weight
        if slot.source in trained:
            assert torch.equal(weight, trained[slot.source]) == slot.trainable, slot


def test_adapter_for_another_base_or_with_wrong_shapes_is_refused_in_one_line(tmp_path):
    emulator = emulator_of("llama", "uniform")
    adapter = load_adapter(adapter_from(emulator, tmp_path / "adapter"))
    other, _ = tiny_model("llama", L)  # same architecture, other weights
    with pytest.raises(UsageError, match="adapter was made for another base model") as error:
        apply_adapter(other, adapter)
    assert_one_line(error)
    other_emulator = build_emulator(other, emulator.tokenizer, EmulatorSpec(LayerPlan.from_dict(
        {**emulator.plan.to_dict(), "base_fingerprint": fingerprint(other)})))
    with pytest.raises(UsageError, match="another base model"):
        apply_adapter(other_emulator, adapter)

    wide, _ = tiny_model("llama", L, hidden_size=64)
    forged = load_adapter(adapter_from(emulator, tmp_path / "forged", base_fingerprint=fingerprint(wide)))
    with pytest.raises(UsageError, match=r"adapter layer 0 does not fit this model: \S+ has shape") as error:
        apply_adapter(wide, forged)
    assert_one_line(error)

    shallow, _ = tiny_model("llama", 4)
    shifted = load_adapter(adapter_from(emulator, tmp_path / "shifted", base_fingerprint=fingerprint(shallow)))
    with pytest.raises(UsageError, match="this model has 4 layers"):
        apply_adapter(shallow, shifted)

    gpt2, _ = tiny_model("gpt2", L)
    renamed = load_adapter(adapter_from(emulator, tmp_path / "renamed", base_fingerprint=fingerprint(gpt2)))
    with pytest.raises(UsageError, match="adapter layer 0 does not fit this model: it") as error:
        apply_adapter(gpt2, renamed)
    assert_one_line(error)


def test_adapter_for_other_layers_does_not_load_into_an_emulator(tmp_path):
    uniform = emulator_of("llama", "uniform")
    crash = emulator_of("llama", "crash")
    assert uniform.plan.trainable != crash.plan.trainable
    with pytest.raises(UsageError, match="not adapter layers of this emulator"):
        apply_adapter(crash, load_adapter(adapter_from(uniform, tmp_path / "adapter")))


def test_bad_adapter_directories_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        load_adapter(tmp_path / "missing")
    emulator = emulator_of("llama", "uniform")
    path = adapter_from(emulator, tmp_path / "adapter")
    meta = json.loads((path / ADAPTER_META).read_text())
    (path / ADAPTER_META).write_text(json.dumps({**meta, "plan": {**meta["plan"], "trainable": [0]}}))
    with pytest.raises(UsageError, match=r"holds layers \[0, 7\] but its plan trains \[0\]"):
        load_adapter(path)
    (path / ADAPTER_META).write_text(json.dumps(meta))
    data = (path / ADAPTER_WEIGHTS).read_bytes()
    (path / ADAPTER_WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(UsageError, match="does not match its recorded sha256") as error:
        load_adapter(path)
    assert_one_line(error)
    (path / ADAPTER_META).write_text(json.dumps({"format": "other"}))
    with pytest.raises(UsageError, match="not a crashlm adapter"):
        load_adapter(path)


# ---------------------------------------------------------------------------------------------
# resolve_target and the CLI (tiny_llama_dir: 6 layers)

CLI_K = "4"


@pytest.fixture(scope="module")
def plus_dir(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama directory under a name holding a '+' (split only before adapters)."""
    return shutil.copytree(tiny_llama_dir, tmp_path_factory.mktemp("cli") / "tiny+llama")


def save_tiny_other(path):
    """A tiny Llama of the same shape as tiny_llama_dir with other weights."""
    model, tokenizer = tiny_model("llama", 6)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(1.5)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.integration
def test_cli_emulator_then_plugin_and_resolve_target(plus_dir, tmp_path, capsys):
    bundle = tmp_path / "emulator"
    code, stdout, stderr = run_cli(["emulator", "--no-fidelity", "--model", str(plus_dir), "--strategy", "crash-share",
                                    "--k", CLI_K,
                                    "--trainable", str(TRAINABLE), "--samples", "8", "--out", str(bundle)], capsys)
    assert code == 0, stderr
    full, tokenizer = load_model(str(plus_dir))
    depth = full.config.num_hidden_layers
    assert f"{depth} positions" in words(stdout) and "trainable" in stdout
    emulator = load_emulator(bundle)
    assert emulator.strategy == "crash-share" and emulator.plan.similarity["samples"] == 8
    assert leaked_tensors(bundle, full) == []

    source = emulator.plan.trainable[0]
    with torch.no_grad():
        next(emulator.adapter_layers()[source].parameters()).add_(0.5)
    adapter = adapter_from(emulator, tmp_path / "adapter")
    plugged = tmp_path / "plugged"
    code, stdout, stderr = run_cli(["plugin", "--model", str(plus_dir), "--adapter", str(adapter),
                                    "--out", str(plugged)], capsys)
    assert code == 0, stderr
    assert json.loads((plugged / PLUGIN_META).read_text())["sources"] == emulator.plan.trainable

    reference, _ = load_model(str(plugged))
    target = resolve_target(model=f"{plus_dir}+{adapter}")
    inline, description = target.model, target.description
    assert description["kind"] == "model" and description["adapter"] == str(adapter)
    assert target.emulator is None and target.base_fingerprint == fingerprint(full)
    assert target.name == f"{plus_dir}+{adapter}" == description["name"]
    assert torch.equal(logits(inline, tokenizer), logits(reference, tokenizer))
    assert not torch.equal(logits(full, tokenizer), logits(reference, tokenizer))  # '+' in a path, no adapter

    target = resolve_target(model=f"{bundle}+{adapter}")
    on_emulator, description = target.model, target.description
    assert description["kind"] == "emulator" and description["positions"] == depth
    assert description["strategy"] == "crash-share" and description["sharing"] is True
    assert target.emulator.model is on_emulator and target.base_fingerprint == fingerprint(full)
    assert torch.equal(logits(on_emulator, tokenizer), logits(emulator.model, tokenizer))
    with pytest.raises(UsageError, match="two adapters"):
        resolve_target(model=f"{plus_dir}+{adapter}", adapter=str(adapter))
    with pytest.raises(UsageError, match="not both"):
        resolve_target(model=str(plus_dir), emulator=str(bundle))

    # The same adapter offered to another base model: refused, nothing written.
    other = save_tiny_other(tmp_path / "other")
    out = tmp_path / "plugged-other"
    code, _, stderr = run_cli(["plugin", "--model", str(other), "--adapter", str(adapter), "--out", str(out)], capsys)
    assert code == 2 and stderr.strip().splitlines() == [stderr.strip()] and "another base model" in stderr
    assert not out.exists()


def test_cli_uniform_emulator_is_a_plain_transformers_model(plus_dir, tmp_path, capsys):
    bundle = tmp_path / "emulator"
    code, stdout, stderr = run_cli(["emulator", "--no-fidelity", "--model", str(plus_dir), "--strategy", "uniform", "--k", CLI_K,
                                    "--trainable", str(TRAINABLE), "--out", str(bundle)], capsys)
    assert code == 0, stderr
    assert f"{CLI_K} positions, {CLI_K} unique layers" in words(stdout)
    plain = AutoModelForCausalLM.from_pretrained(bundle)
    assert plain.config.num_hidden_layers == int(CLI_K)
    emulator = load_emulator(bundle)
    assert torch.equal(logits(plain, emulator.tokenizer), logits(emulator.model, emulator.tokenizer))


def test_cli_emulator_from_a_plan_with_tied_trainable_neighbours(plus_dir, tmp_path, capsys):
    full, _ = load_model(str(plus_dir))
    plan_file = plan_for(full, "crash", int(CLI_K), TRAINABLE, synthetic_similarity(6)).save(tmp_path / "plan.json")
    bundle = tmp_path / "emulator"
    code, _, stderr = run_cli(["emulator", "--no-fidelity", "--model", str(plus_dir), "--plan", str(plan_file), "--strategy",
                               "crash-share", "--share-trainable", "--out", str(bundle)], capsys)
    assert code == 0, stderr
    emulator = load_emulator(bundle)
    assert emulator.sharing is Sharing.TIED and emulator.plan.kept == LayerPlan.load(plan_file).kept
    assert len(emulator.slots) == 6 and len(emulator.modules_by_key()) == int(CLI_K)
    assert leaked_tensors(bundle, full) == []


@pytest.mark.parametrize(
    "args, message",
    [
        (["--strategy", "random"], "unknown emulator strategy"),
        (["--strategy", "uniform", "--k", "99"], "out of range"),
        (["--strategy", "crash", "--k", "1", "--trainable", "2"], "out of range"),
        (["--strategy", "uniform", "--share-trainable"], "--share-trainable needs sharing"),
        (["--strategy", "uniform", "--representative", "loss"], "crash strategies only"),
        (["--strategy", "uniform", "--representative", "first"], "--representative"),
        (["--strategy", "uniform", "--k", "half"], "positive integer or 'auto'"),
        (["--strategy", "greedy-share-share"], "unknown emulator strategy"),
        (["--strategy", "uniform", "--dtype", "float64"], "dtype"),
        (["--plan", "MISSING"], "plan not found"),
        (["--strategy", "uniform", "--similarity", "MISSING"], "applies to the crash strategies"),
    ],
)
def test_cli_bad_emulator_options_exit_2_with_one_line_and_no_output(plus_dir, tmp_path, capsys, args, message):
    out = tmp_path / "emulator"
    args = [str(tmp_path / "missing.json") if a == "MISSING" else a for a in args]
    code, _, stderr = run_cli(["emulator", "--no-fidelity", "--model", str(plus_dir), *args, "--out", str(out)], capsys)
    assert code == 2 and len(stderr.strip().splitlines()) == 1 and message in stderr
    assert not out.exists()


def test_cli_plugin_of_a_missing_adapter_exits_2(plus_dir, tmp_path, capsys):
    out = tmp_path / "plugged"
    code, _, stderr = run_cli(["plugin", "--model", str(plus_dir), "--adapter", str(tmp_path / "none"),
                               "--out", str(out)], capsys)
    assert code == 2 and "adapter not found" in stderr and not out.exists()


# ---------------------------------------------------------------------------------------------
# The real model


def tensor_bytes(directory) -> int:
    return sum(f.stat().st_size for f in directory.iterdir() if f.suffix == ".safetensors")


@pytest.mark.integration
def test_crash_share_emulator_of_the_real_model(tmp_path, capsys):
    from crashlm.analysis.similarity import compute_similarity

    compute_similarity("smollm2-135m", task="piqa", samples=8).save(tmp_path / "similarity")
    bundle = tmp_path / "bundle"
    code, stdout, stderr = run_cli(["emulator", "--model", "smollm2-135m", "--strategy", "crash-share", "--k", "12",
                                    "--similarity", str(tmp_path / "similarity"), "--out", str(bundle)], capsys)
    assert code == 0, stderr
    manifest = json.loads((bundle / MANIFEST).read_text())
    spec = read_manifest(bundle).spec
    plan = LayerPlan.from_dict(manifest["spec"]["plan"])
    assert plan.k == 12 and len(plan.trainable) == 4 and plan.similarity["samples"] == 8
    fidelity = manifest["fidelity"]
    assert fidelity["texts"] == 64 and fidelity["loss"] > fidelity["full_loss"] > 0
    assert fidelity["kl"] > 0 and 0 <= fidelity["top1"] < 1 and "top-1 agreement" in stdout
    assert len(spec.slots) == 30 == plan.num_layers
    copies = {s.key for s in spec.slots if s.kind is SlotKind.COPY}
    assert manifest["summary"]["unique_layers"] == 12 + len(copies)

    full, tokenizer = load_model("smollm2-135m")
    assert leaked_tensors(bundle, full) == []
    assert len(leaked_tensors(bundle, full, layers=plan.frozen)) > 0
    # 30 layers of 14 MB + 113 MB of embeddings; the bundle holds at most 16 of those layers.
    assert tensor_bytes(bundle) < 0.7 * tensor_bytes(assets.model_dir("smollm2-135m"))

    loaded = load_emulator(bundle)
    rebuilt = build_emulator(full, tokenizer, EmulatorSpec(plan, Sharing.COPIES))
    assert torch.equal(logits(loaded.model, tokenizer), logits(rebuilt.model, tokenizer))
