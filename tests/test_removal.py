"""Layer replay, removal scores, the calibration strategies' rules and emulator fidelity.

The rules are checked on hand-made score profiles (a stand-in stack whose loss is a known
function of the kept layers); replay and fidelity on tiny random models of several architectures.
"""

from __future__ import annotations

import math

import pytest
import torch

from crashlm.analysis.removal import LayerStack, RemovalScores
from crashlm.core.errors import UsageError
from crashlm.core.models import get_layers, num_layers
from crashlm.core.scoring import IGNORE_INDEX, next_token_targets, text_batches
from crashlm.emulators.emulator import build_emulator
from crashlm.emulators.fidelity import _Reference, _Totals, emulator_fidelity, gradient_agreement, spec_fidelity
from crashlm.emulators.plans import EmulatorSpec, LayerPlan, Sharing, SlotKind
from crashlm.emulators.plugin import apply_adapter, load_adapter, save_adapter
from crashlm.emulators.strategies import STRATEGIES, get_strategy, plan_for
from tests.tiny import CORPUS, tiny_model

ARCHS = ("llama", "gpt2", "gemma3_text", "opt")
L = 8


class HandMadeStack:
    """A stack whose loss is ``base + sum of removed layers' costs + pair * (#removed adjacent pairs)``."""

    def __init__(self, costs: list[float], pair: float = 0.0):
        self.costs, self.pair, self.num_layers, self.calls = costs, pair, len(costs), 0

    def loss(self, sequence) -> float:
        removed = sorted(set(range(self.num_layers)) - set(sequence))
        adjacent = sum(1 for a, b in zip(removed, removed[1:]) if b == a + 1)
        return 1.0 + sum(self.costs[r] for r in removed) + self.pair * adjacent

    def removal_losses(self, sequence, candidates, desc=None) -> dict[int, float]:
        self.calls += 1
        return {c: self.loss([s for s in sequence if s != c]) for c in candidates}

    def block_removal_losses(self, starts, size) -> dict[int, float]:
        self.calls += 1
        return {s: self.loss([layer for layer in range(self.num_layers) if not s <= layer < s + size]) for s in starts}


class HandMadeScores(RemovalScores):
    def __init__(self, stack, influence=None, angular=None):
        super().__init__(stack, {"text": "hand-made"})
        self._influence, self._angular = influence, angular


def plan(strategy: str, k: int, scores=None, adjacent=None, trainable: int = 2) -> LayerPlan:
    model, _ = tiny_model("llama", L)
    return plan_for(model, strategy, k, trainable, adjacent, scores=scores)


# ---------------------------------------------------------------------------------------------
# Rules on hand-made profiles (L = 8, trainable 2: layers 0 and 7 train, 1..6 may go)


def test_greedy_removes_the_cheapest_layer_each_step_seeing_interactions():
    # Alone, 3 and 4 are cheapest; once 3 is gone, removing 4 also pays the adjacency penalty.
    stack = HandMadeStack([9, 0.5, 0.4, 0.1, 0.2, 0.35, 0.3, 9], pair=1.0)
    scores = HandMadeScores(stack)
    greedy = plan("greedy", 5, scores)
    assert greedy.scores["removal_order"] == [3, 6, 1]
    assert greedy.kept == [0, 2, 4, 5, 7] and greedy.trainable == [0, 7]
    calls = stack.calls
    # Fewer layers continue the same search: the first three removals are not searched again.
    assert plan("greedy", 4, scores).scores["removal_order"] == [3, 6, 1, 4]
    assert stack.calls == calls + 1
    assert greedy.scores["loss_after_removal"] == pytest.approx([1.1, 1.4, 1.9])


def test_block_influence_removes_the_lowest_influence_middle_layers():
    influence = [0.0, 0.5, 0.1, 0.3, 0.1, 0.9, 0.2, 0.0]  # 0 and 7 are lowest but train
    scores = HandMadeScores(HandMadeStack([1.0] * L), influence=influence)
    assert plan("block-influence", 5, scores).kept == [0, 1, 3, 5, 7]  # ties 2 = 4: both go


def test_angular_removes_the_closest_contiguous_block():
    distance = [[0.0] * (L + 1 - start) for start in range(L + 1)]
    for start in range(L + 1):
        for n in range(1, L + 1 - start):
            distance[start][n] = 0.5
    distance[3][3] = 0.1  # layers 3, 4, 5: closest block of three
    distance[0][3] = 0.0  # starts at an adapter layer: not a candidate
    scores = HandMadeScores(HandMadeStack([1.0] * L), angular=distance)
    angular = plan("angular", 5, scores)
    assert angular.kept == [0, 1, 2, 6, 7]
    assert angular.scores["angular_distance"]["3"] == 0.1 and "0" not in angular.scores["angular_distance"]


def test_contiguous_removes_the_cheapest_block_where_greedy_scatters():
    stack = HandMadeStack([9, 0.1, 0.5, 0.2, 0.2, 0.3, 0.1, 9])
    scores = HandMadeScores(stack)
    assert plan("greedy", 5, scores).scores["removal_order"] == [1, 6, 3]
    contiguous = plan("contiguous", 5, scores)
    assert contiguous.kept == [0, 1, 2, 3, 7]  # blocks 1-3: 0.8, 2-4: 0.9, 3-5: 0.7, 4-6: 0.6
    assert contiguous.scores["block_removal_loss"] == pytest.approx({"1": 1.8, "2": 1.9, "3": 1.7, "4": 1.6})
    calls = stack.calls
    assert plan("contiguous", 5, scores).kept == contiguous.kept and stack.calls == calls  # measured once per size
    assert plan("contiguous", 4, scores).kept == [0, 1, 2, 7] and stack.calls == calls + 1
    assert plan("contiguous", 6, HandMadeScores(HandMadeStack([1.0] * L))).kept == [0, 3, 4, 5, 6, 7]  # ties: lower


def test_drop_last_removes_the_deepest_middle_layers():
    assert plan("drop-last", 5).kept == [0, 1, 2, 3, 7]
    assert plan("drop-last", 4, trainable=4).kept == [0, 1, 6, 7]


def test_crash_loss_keeps_each_clusters_costliest_member():
    adjacent = [0.9, 0.1, 0.9, 0.9, 0.2, 0.9, 0.9]  # clusters [0 1] [2 3 4] [5 6 7]
    stack = HandMadeStack([0.1, 0.2, 0.3, 0.1, 0.2, 0.1, 0.1, 0.5])
    loss = plan("crash-loss", 3, HandMadeScores(stack), adjacent)
    middle = plan("crash", 3, None, adjacent)
    assert loss.clusters == middle.clusters == [[0, 1], [2, 3, 4], [5, 6, 7]]
    assert middle.kept == [1, 3, 6] and loss.kept == [1, 2, 7]
    assert loss.strategy == "crash-loss" and len(loss.scores["single_removal_loss"]) == L


def test_k_auto_is_the_smallest_k_within_the_loss_budget():
    stack = HandMadeStack([0.0, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.0])  # every removal costs 0.1 nats on 1.0
    auto = plan_for(tiny_model("llama", L)[0], "drop-last", "auto", 2, scores=HandMadeScores(stack),
                    max_loss_increase=0.25)
    assert auto.k == 6 and auto.scores["k"]["full_loss"] == 1.0
    assert auto.scores["k"]["loss_by_k"]["5"] == pytest.approx(1.3)


def test_every_strategy_exists_with_sharing():
    for name, strategy in STRATEGIES.items():
        shared = strategy if strategy.shares else get_strategy(name + "-share")
        assert shared.sharing is Sharing.COPIES and shared.rule == strategy.rule


# ---------------------------------------------------------------------------------------------
# Replay and fidelity on tiny models


@pytest.mark.parametrize("arch", ARCHS)
def test_replay_is_the_models_own_forward(arch):
    model, tokenizer = tiny_model(arch, L)
    stack = LayerStack(model, tokenizer, CORPUS, batch_size=4, bf16=False, progress=False)
    total = count = 0
    with torch.no_grad():
        for batch in stack.batches:
            logits = model(input_ids=batch.input_ids, attention_mask=batch.mask.long(), use_cache=False).logits
            keep = batch.targets != IGNORE_INDEX
            total -= float(torch.log_softmax(logits[keep], -1).gather(-1, batch.targets[keep].unsqueeze(-1)).sum())
            count += int(keep.sum())
    assert stack.loss(range(L)) == pytest.approx(total / count, rel=1e-5)
    removed = stack.removal_losses(range(L), [2, 5])
    assert removed[2] == pytest.approx(stack.loss([0, 1, 3, 4, 5, 6, 7]), rel=1e-5)
    assert removed[5] == pytest.approx(stack.loss([0, 1, 2, 3, 4, 6, 7]), rel=1e-5)
    blocks = stack.block_removal_losses([1, 5], 3)
    assert blocks[1] == pytest.approx(stack.loss([0, 4, 5, 6, 7]), rel=1e-5)
    assert blocks[5] == pytest.approx(stack.loss([0, 1, 2, 3, 4]), rel=1e-5)
    assert stack.block_removal_losses([3], 0)[3] == pytest.approx(stack.loss(range(L)), rel=1e-5)
    with pytest.raises(UsageError, match="does not fit"):
        stack.block_removal_losses([6], 3)
    influence = stack.block_influence()
    assert len(influence) == L and all(-1e-6 <= v <= 2 for v in influence)
    distance = stack.angular_distance()
    assert all(abs(row[0]) < 1e-3 for row in distance) and all(0 <= v <= 1 for row in distance for v in row)


@pytest.mark.parametrize("arch", ARCHS)
def test_fidelity_of_an_untrained_emulator_is_that_of_the_built_one(arch):
    full, tokenizer = tiny_model(arch, L)
    spec = EmulatorSpec(LayerPlan(L, "custom", [0, 2, 3, 6, 7], [0, 7]), Sharing.COPIES)
    untrained = spec_fidelity(full, tokenizer, {"e": spec}, CORPUS, bf16=False, progress=False)["e"]
    emulator = build_emulator(tiny_model(arch, L)[0], tokenizer, spec)
    built = emulator_fidelity(full, emulator, CORPUS, bf16=False)
    for field in ("loss", "full_loss", "kl", "top1"):
        assert getattr(built, field) == pytest.approx(getattr(untrained, field), rel=1e-4, abs=1e-6), field
    assert built.kl > 0 and built.tokens == untrained.tokens > 0


def _layer_gradients(model, layers: dict[int, torch.nn.Module], tokenizer) -> list[dict[int, torch.Tensor]]:
    """Per batch of CORPUS (as LayerStack batches it): each of ``layers``' flattened gradient of the mean next-token loss."""
    out = []
    for batch in text_batches(tokenizer, CORPUS, 8, 128):
        targets = next_token_targets(batch["input_ids"], batch["attention_mask"])
        logits = model(**batch, use_cache=False).logits.float()
        keep = targets != IGNORE_INDEX
        loss = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
        model.zero_grad(set_to_none=True)
        loss.backward()
        out.append({s: torch.cat([p.grad.flatten() for p in layer.parameters()]) for s, layer in layers.items()})
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_gradient_agreement_is_that_of_the_built_emulator_against_the_full_model(arch):
    # COPIES sharing puts frozen copies of adapter layers 0 and 7 at the removed positions 1 and 6:
    # they pass gradients through but must collect none, as in the built emulator.
    full, tokenizer = tiny_model(arch, L)
    flags = [p.requires_grad for p in full.parameters()]
    spec = EmulatorSpec(LayerPlan(L, "custom", [0, 3, 4, 5, 7], [0, 7]), Sharing.COPIES)
    assert [slot.kind for slot in spec.slots].count(SlotKind.COPY) == 2
    measured = gradient_agreement(full, tokenizer, {"e": spec}, CORPUS, bf16=False, progress=False)["e"]
    emulator = build_emulator(tiny_model(arch, L)[0], tokenizer, spec)
    emulator.freeze()
    on_emulator = _layer_gradients(emulator.model, emulator.adapter_layers(), tokenizer)
    reference, _ = tiny_model(arch, L)
    on_full = _layer_gradients(reference, {s: get_layers(reference)[s] for s in (0, 7)}, tokenizer)
    cos = torch.nn.functional.cosine_similarity
    whole = [float(cos(torch.cat([e[0], e[7]]), torch.cat([f[0], f[7]]), dim=0)) for e, f in zip(on_emulator, on_full)]
    assert measured.batches == len(on_full)
    assert measured.cosine == pytest.approx(sum(whole) / len(whole), abs=1e-4)
    for layer in (0, 7):
        expected = sum(float(cos(e[layer], f[layer], dim=0)) for e, f in zip(on_emulator, on_full)) / len(on_full)
        assert measured.per_layer[layer] == pytest.approx(expected, abs=1e-4)
    assert measured.cosine < 0.9999
    assert [p.requires_grad for p in full.parameters()] == flags


def test_gradient_agreement_of_a_zero_removal_emulator_is_one_and_leaves_requires_grad_alone():
    full, tokenizer = tiny_model("llama", L)
    flags = [p.requires_grad for p in full.parameters()]
    spec = EmulatorSpec(LayerPlan(L, "custom", list(range(L)), [0, 1, 7]), Sharing.NONE)
    measured = gradient_agreement(full, tokenizer, {"same": spec}, CORPUS, bf16=False, progress=False)["same"]
    assert measured.cosine == pytest.approx(1.0, abs=1e-5)
    assert all(value == pytest.approx(1.0, abs=1e-5) for value in measured.per_layer.values())
    assert set(measured.per_layer) == {0, 1, 7}
    assert [p.requires_grad for p in full.parameters()] == flags


def test_fidelity_of_the_full_model_against_itself_is_perfect():
    logits = torch.randn(2, 5, 11)
    targets = torch.tensor([[1, 2, 3, IGNORE_INDEX, IGNORE_INDEX], [4, 5, 6, 7, IGNORE_INDEX]])
    totals = _Totals()
    totals.add(_Reference.of(logits, targets), logits.clone())
    same = totals.result(texts=2)
    assert same.kl == pytest.approx(0.0, abs=1e-6) and same.top1 == 1.0 and same.loss == same.full_loss
    assert same.tokens == 7
    model, tokenizer = tiny_model("llama", L)
    stack = LayerStack(model, tokenizer, CORPUS, bf16=False, progress=False)
    batch = stack.batches[0]
    totals = _Totals()
    totals.add(_Reference.of(stack.logits(batch, range(L)), batch.targets), stack.logits(batch, range(L)))
    assert totals.result(len(CORPUS)).kl == 0.0 and totals.result(len(CORPUS)).top1 == 1.0


def test_every_strategy_at_k_equal_to_depth_keeps_every_layer_and_the_full_models_fidelity():
    # K = L is the ceiling control: the adapter trains on the full model itself.
    model, tokenizer = tiny_model("llama", L)
    scores = RemovalScores(LayerStack(model, tokenizer, CORPUS, bf16=False, progress=False), {"text": "corpus"})
    adjacent = [0.9, 0.1, 0.8, 0.7, 0.2, 0.6, 0.5]
    specs = {}
    for name, strategy in STRATEGIES.items():
        kept = plan_for(model, name, L, 2, adjacent, scores=scores)
        assert kept.kept == list(range(L)), name
        specs[name] = strategy.spec(kept)
    for name, fidelity in spec_fidelity(model, tokenizer, specs, CORPUS, bf16=False, progress=False).items():
        assert fidelity.kl == pytest.approx(0.0, abs=1e-6) and fidelity.top1 == 1.0, name
        assert fidelity.loss == pytest.approx(fidelity.full_loss), name


@pytest.mark.parametrize("arch", ("llama", "gpt2"))
@pytest.mark.parametrize("strategy", ["greedy", "block-influence", "angular", "contiguous", "drop-last", "crash-loss-share"])
def test_every_new_strategy_plans_builds_trains_a_step_and_plugs_in(arch, strategy, tmp_path):
    model, tokenizer = tiny_model(arch, L)
    scores = RemovalScores(LayerStack(model, tokenizer, CORPUS, bf16=False, progress=False))
    entry = get_strategy(strategy)
    adjacent = [0.9, 0.2, 0.9, 0.95, 0.3, 0.9, 0.8]
    layer_plan = plan_for(model, strategy, 5, 2, adjacent, scores=scores)
    assert layer_plan.k == 5 and layer_plan.strategy == entry.rule
    emulator = build_emulator(model, tokenizer, entry.spec(layer_plan))
    params = emulator.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    ids = tokenizer(CORPUS[0], return_tensors="pt").input_ids
    loss = emulator.model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    assert math.isfinite(loss.item())
    adapter = save_adapter(emulator.adapter_layers(), tmp_path / "adapter", emulator.base_fingerprint, layer_plan,
                           training={"steps": 1}, validation_curve=[])
    full, _ = tiny_model(arch, L)
    apply_adapter(full, load_adapter(adapter))
    for source, layer in emulator.adapter_layers().items():
        trained = dict(layer.named_parameters())
        plugged = dict(get_layers(full)[source].named_parameters())
        assert all(torch.equal(trained[n], plugged[n]) for n in trained)
    assert num_layers(full) == L


def test_a_sharing_emulator_cannot_be_scored_as_a_full_model():
    model, tokenizer = tiny_model("llama", L)
    emulator = build_emulator(model, tokenizer, EmulatorSpec(LayerPlan(L, "custom", [0, 3, 7], [0, 7]), Sharing.TIED))
    with pytest.raises(UsageError, match="reuses layers"):
        LayerStack(emulator.model, tokenizer, CORPUS)
