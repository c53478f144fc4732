"""Loss landscapes on tiny random Llamas and four PIQA validation items.

Three models of one architecture: ``a`` (the seeded tiny model), ``b`` (every weight perturbed,
like full fine-tuning) and ``c`` (one layer perturbed, like a plug-in), plus an adapter of
perturbed layers for the ``SPEC+ADAPTER`` syntax.
"""

from __future__ import annotations

import json

import pytest
import torch

from crashlm.analysis.landscape import (
    CONFIG_FILE,
    POINTS_FILE,
    RESULT_FILE,
    Landscape1DConfig,
    Landscape2DConfig,
    landscape_1d,
    landscape_2d,
)
from crashlm.analysis.subspace import PointLog, Subspace, grid_axis, sweep
from crashlm.cli import main
from crashlm.core.errors import UsageError
from crashlm.core.models import fingerprint, get_layers, load_model
from crashlm.core.scoring import mean_answer_loss
from crashlm.core.tasks import load_examples
from crashlm.emulators.plugin import save_adapter
from crashlm.emulators.targets import resolve_target
from tests.tiny import save_tiny, tiny_model

TASK, LIMIT = "piqa", 4
ADAPTER_LAYERS = (1, 4)


def _perturbed(layers: tuple[int, ...] | None, seed: int, scale: float = 0.2):
    """The tiny Llama with the weights of ``layers`` (all weights if None) moved by seeded noise."""
    model, tok = tiny_model("llama")
    generator = torch.Generator().manual_seed(seed)
    modules = [model] if layers is None else [get_layers(model)[i] for i in layers]
    with torch.no_grad():
        for module in modules:
            for param in module.parameters():
                param.add_(scale * torch.randn(param.shape, generator=generator))
    return model, tok


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, str]:
    """HF directories a, b, c, d (= a with the adapter plugged in), the adapter directory, and
    two models ``a`` cannot be compared with (fewer layers, wider MLPs)."""
    root = tmp_path_factory.mktemp("landscape-models")
    paths = {"a": save_tiny("llama", root / "a"), "shallow": save_tiny("llama", root / "shallow", num_layers=4),
             "wide": save_tiny("llama", root / "wide", intermediate_size=48)}
    for name, layers, seed in (("b", None, 1), ("c", (2,), 2), ("d", ADAPTER_LAYERS, 3)):
        model, tok = _perturbed(layers, seed)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        paths[name] = root / name
        if name == "d":
            base, _ = tiny_model("llama")
            save_adapter({i: get_layers(model)[i] for i in ADAPTER_LAYERS}, root / "adapter", fingerprint(base), None)
            paths["adapter"] = root / "adapter"
    return {k: str(v) for k, v in paths.items()}


@pytest.fixture(scope="module")
def examples():
    return load_examples(TASK, "validation", LIMIT)


@pytest.fixture(scope="module")
def direct(dirs, examples) -> dict[str, float]:
    """Each model's loss evaluated directly, without any landscape machinery."""
    losses = {}
    for name in ("a", "b", "c", "d"):
        model, tok = load_model(dirs[name])
        losses[name] = mean_answer_loss(model, tok, examples)
    return losses


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same_state(model, state) -> None:
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], state[k]) for k in state)


# --- Subspace, grid, point log ----------------------------------------------------------------


def test_subspace_hits_anchors_exactly_moves_only_differing_and_restores():
    a, _ = tiny_model("llama")
    b, _ = _perturbed(None, 1)
    c, _ = _perturbed((2,), 2)
    origin = _state(a)
    subspace = Subspace.between(a, b, c)
    # c differs from a in layer 2 only: only those parameters move along y
    assert set(subspace.vectors[1]) == {n for n, _ in a.named_parameters() if n.startswith("model.layers.2.")}
    for coords, target in (((1.0, 0.0), b), ((0.0, 1.0), c), ((0.0, 0.0), a)):
        subspace.write(a, coords)
        _assert_same_state(a, target.state_dict() if target is not a else origin)
    subspace.write(a, (0.5, -0.25))
    name = "model.layers.2.mlp.up_proj.weight"
    want = origin[name] + 0.5 * (b.state_dict()[name] - origin[name]) - 0.25 * (c.state_dict()[name] - origin[name])
    torch.testing.assert_close(a.state_dict()[name], want, rtol=0, atol=1e-6)
    subspace.restore(a)
    _assert_same_state(a, origin)


def test_incompatible_models_are_refused():
    a, _ = tiny_model("llama")
    shallow, _ = tiny_model("llama", num_layers=4)
    with pytest.raises(UsageError, match="different parameters"):
        Subspace.between(a, shallow)
    wide, _ = tiny_model("llama", intermediate_size=48)
    with pytest.raises(UsageError, match="shape"):
        Subspace.between(a, wide)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_random_directions_are_filter_normalised_and_seeded(arch):
    model, _ = tiny_model(arch)
    origin = _state(model)
    subspace = Subspace.random_filter_norm(model, count=2, seed=7)
    params = dict(model.named_parameters())
    assert set(subspace.origin) == {n for n, p in params.items() if p.dim() > 1}  # biases and norms stay
    for name in subspace.origin:
        axis = 1 if arch == "gpt2" and name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) else 0
        filters = origin[name].movedim(axis, 0).flatten(1).norm(dim=1)
        for vector in subspace.vectors:
            torch.testing.assert_close(vector[name].movedim(axis, 0).flatten(1).norm(dim=1), filters, rtol=1e-4, atol=1e-6)
    assert not torch.equal(subspace.vectors[0][name], subspace.vectors[1][name])
    again = Subspace.random_filter_norm(model, count=2, seed=7)
    assert all(torch.equal(again.vectors[1][n], subspace.vectors[1][n]) for n in subspace.origin)
    subspace.write(model, (0.3, -0.2))
    assert not torch.equal(model.state_dict()[name], origin[name])
    subspace.restore(model)
    _assert_same_state(model, origin)


def test_grid_axis_includes_both_ends_and_snaps_anchors():
    assert grid_axis(0.0, 1.0, 5) == [0.0, 0.25, 0.5, 0.75, 1.0]
    axis = grid_axis(-0.7, 1.0, 18)  # 0 is reached only up to rounding: snapped to exactly 0
    assert axis[0] == -0.7 and axis[-1] == 1.0 and len(axis) == 18 and 0.0 in axis
    with pytest.raises(ValueError):
        grid_axis(0.0, 1.0, 1)


def test_sweep_restores_the_origin_even_when_evaluation_fails():
    a, _ = tiny_model("llama")
    b, _ = _perturbed(None, 1)
    origin = _state(a)
    subspace = Subspace.between(a, b)
    seen = []

    def evaluate(model):
        if len(seen) == 2:
            raise RuntimeError("killed")
        seen.append(model.state_dict()["lm_head.weight"].sum().item())
        return 0.0

    with pytest.raises(RuntimeError, match="killed"):
        sweep(a, subspace, [(0.0,), (0.5,), (1.0,)], evaluate)
    assert seen[0] != seen[1]  # the weights did move between points
    _assert_same_state(a, origin)


def test_point_log_round_trips_and_drops_a_torn_row(tmp_path):
    log = PointLog(tmp_path / "points.csv", ("x", "y"))
    assert log.read() == {}
    points = {(0.1, -1 / 3): 2.718281828459045, (1.0, 0.0): float("inf")}
    for coords, loss in points.items():
        log.append(coords, loss)
    log.close()
    with open(log.path, "a", encoding="utf-8") as fh:
        fh.write("0.5,0.5,1.2")  # a row cut short by a kill: no newline
    assert log.read() == points
    assert log.path.read_text(encoding="utf-8").count("\n") == 3  # rewritten clean
    (tmp_path / "other.csv").write_text("alpha,loss\n0.0,1.0\n", encoding="utf-8")
    with pytest.raises(UsageError, match="columns"):
        PointLog(tmp_path / "other.csv", ("x", "y")).read()


# --- landscapes of saved models ---------------------------------------------------------------


def on_models(landscape, config, out, **kwargs):
    """``landscape`` of the models ``config`` names, loaded as the command line loads them."""
    (_, origin), *others = config.models.items()
    first = resolve_target(model=origin, device="cpu")
    ends = (resolve_target(model=spec, device="cpu").model for _, spec in others)
    return landscape(config, first.model, first.tokenizer, ends, out, **kwargs)



@pytest.mark.integration
def test_1d_end_points_equal_direct_evaluation(dirs, direct, tmp_path):
    config = Landscape1DConfig(a=dirs["a"], b=dirs["b"], task=TASK, points=4, limit=LIMIT)
    result = on_models(landscape_1d, config, tmp_path / "run")
    assert result.alphas == [0.0, 1 / 3, 2 / 3, 1.0]
    assert result.losses[0] == pytest.approx(direct["a"], abs=1e-6)
    assert result.losses[-1] == pytest.approx(direct["b"], abs=1e-6)
    assert [anchor.loss for anchor in result.anchors] == [result.losses[0], result.losses[-1]]
    assert len(set(result.losses)) == 4
    saved = json.loads((tmp_path / "run" / RESULT_FILE).read_text())
    assert saved["losses"] == result.losses and saved["barrier"] == pytest.approx(result.barrier)


@pytest.mark.integration
def test_model_plus_adapter_spec(dirs, direct, tmp_path):
    spec = f"{dirs['a']}+{dirs['adapter']}"
    result = on_models(landscape_1d, Landscape1DConfig(a=dirs["a"], b=spec, task=TASK, points=2, limit=LIMIT), tmp_path)
    assert result.losses == pytest.approx([direct["a"], direct["d"]], abs=1e-6)
    assert result.anchor("b").label == "a+adapter"


@pytest.mark.integration
def test_2d_anchor_points_equal_direct_evaluation(dirs, direct, tmp_path):
    config = Landscape2DConfig(origin=dirs["a"], x=dirs["b"], y=dirs["c"], task=TASK, grid=4, axis_range=(-1, 2), limit=LIMIT)
    result = on_models(landscape_2d, config, tmp_path)
    assert Landscape2DConfig.from_dict(json.loads((tmp_path / CONFIG_FILE).read_text())["config"]) == config
    assert result.xs == result.ys == [-1.0, 0.0, 1.0, 2.0]
    grid = {(x, y): result.losses[j][i] for j, y in enumerate(result.ys) for i, x in enumerate(result.xs)}
    assert grid[(0.0, 0.0)] == pytest.approx(direct["a"], abs=1e-6)
    assert grid[(1.0, 0.0)] == pytest.approx(direct["b"], abs=1e-6)
    assert grid[(0.0, 1.0)] == pytest.approx(direct["c"], abs=1e-6)
    assert all(anchor.on_grid for anchor in result.anchors)
    assert len(PointLog(tmp_path / POINTS_FILE, ("x", "y")).read()) == 16


@pytest.mark.integration
def test_2d_anchors_off_the_grid_are_evaluated_too(dirs, direct, tmp_path):
    config = Landscape2DConfig(origin=dirs["a"], x=dirs["b"], y=dirs["c"], task=TASK, grid=2, axis_range=(-0.5, 0.5), limit=LIMIT)
    result = on_models(landscape_2d, config, tmp_path)
    on_grid = {a.role: a.on_grid for a in result.anchors}
    assert on_grid == {"origin": False, "x": False, "y": False}
    assert [a.loss for a in result.anchors] == pytest.approx([direct["a"], direct["b"], direct["c"]], abs=1e-6)


@pytest.mark.integration
def test_interrupted_2d_run_resumes_without_recomputing(dirs, tmp_path):
    config = Landscape2DConfig(origin=dirs["a"], x=dirs["b"], y=dirs["c"], task=TASK, grid=3, axis_range=(0, 1), limit=LIMIT)
    reference = on_models(landscape_2d, config, tmp_path / "reference")

    done = []

    def killed_after_four(coords, loss):
        done.append(coords)
        if len(done) == 4:
            raise KeyboardInterrupt

    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        on_models(landscape_2d, config, run, on_point=killed_after_four)
    assert not (run / RESULT_FILE).exists() and (run / CONFIG_FILE).exists()
    assert set(PointLog(run / POINTS_FILE, ("x", "y")).read()) == set(done)
    with open(run / POINTS_FILE, "a", encoding="utf-8") as fh:
        fh.write("1.0,1.0,0.")  # and a row torn by the kill

    redone = []
    resumed = on_models(landscape_2d, config, run, on_point=lambda coords, loss: redone.append(coords))
    assert len(redone) == 9 - 4 and not set(redone) & set(done)
    assert resumed.losses == reference.losses
    again = []
    on_models(landscape_2d, config, run, on_point=lambda coords, loss: again.append(coords))
    assert again == []  # a finished run computes nothing


@pytest.mark.integration
def test_out_dir_of_another_landscape_or_not_ours_is_refused(dirs, tmp_path):
    config = Landscape1DConfig(a=dirs["a"], b=dirs["c"], task=TASK, points=2, limit=LIMIT)
    on_models(landscape_1d, config, tmp_path / "run")
    with pytest.raises(UsageError, match="another config"):
        on_models(landscape_1d, Landscape1DConfig(a=dirs["a"], b=dirs["c"], task=TASK, points=3, limit=LIMIT), tmp_path / "run")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(UsageError, match="not a crashlm landscape run"):
        on_models(landscape_1d, config, tmp_path / "mine")
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]


# --- command line -----------------------------------------------------------------------------


@pytest.mark.integration
def test_cli_1d_end_to_end(dirs, tmp_path, capsys):
    out = tmp_path / "one"
    main(["landscape", "1d", "--a", dirs["a"], "--b", f"{dirs['a']}+{dirs['adapter']}", "--task", TASK,
          "--points", "3", "--limit", str(LIMIT), "--device", "cpu", "--out", str(out)])
    assert "a -> a+adapter on piqa (4 examples)" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {CONFIG_FILE, POINTS_FILE, RESULT_FILE, "landscape_1d.png"}
    assert (out / "landscape_1d.png").stat().st_size > 10_000
    assert len(json.loads((out / RESULT_FILE).read_text())["losses"]) == 3


@pytest.mark.integration
@pytest.mark.parametrize("directions", ["models", "random-filter-norm"])
def test_cli_2d_end_to_end(dirs, tmp_path, capsys, directions):
    out = tmp_path / "two"
    models = ["--x", dirs["b"], "--y", dirs["c"]] if directions == "models" else []
    main(["landscape", "2d", "--origin", dirs["a"], *models, "--task", TASK, "--grid", "3", "--range=-1,1",
          "--directions", directions, "--limit", str(LIMIT), "--device", "cpu", "--out", str(out)])
    assert "grid minimum" in capsys.readouterr().out
    files = {p.name for p in out.iterdir()}
    assert files == {CONFIG_FILE, POINTS_FILE, RESULT_FILE, "landscape_2d_contour.png", "landscape_2d_surface.png"}
    saved = json.loads((out / RESULT_FILE).read_text())
    assert saved["xs"] == [-1.0, 0.0, 1.0] and len(saved["losses"]) == 3
    assert [a["role"] for a in saved["anchors"]] == (["origin", "x", "y"] if directions == "models" else ["origin"])


@pytest.mark.integration
@pytest.mark.parametrize(
    "args, message",
    [
        (["1d", "--a", "{a}", "--b", "{b}", "--points", "1"], "--points must be an integer >= 2"),
        (["1d", "--a", "{a}", "--b", "{b}", "--limit", "0"], "--limit must be a positive integer"),
        (["1d", "--a", "{a}", "--b", "{shallow}"], "different parameters"),
        (["1d", "--a", "{a}", "--b", "{a}/missing"], "missing"),
        (["2d", "--origin", "{a}", "--x", "{b}", "--y", "{c}", "--range=2,1"], "LO < HI"),
        (["2d", "--origin", "{a}", "--x", "{b}", "--y", "{c}", "--range=a,b"], "--range must be LO,HI"),
        (["2d", "--origin", "{a}", "--x", "{b}", "--y", "{c}", "--range=1"], "--range must be LO,HI"),
        (["2d", "--origin", "{a}", "--x", "{b}", "--y", "{c}", "--directions", "sideways"], "--directions must be one of"),
        (["2d", "--origin", "{a}", "--x", "{b}"], "needs both --x and --y"),
        (["2d", "--origin", "{a}", "--x", "{b}", "--y", "{wide}"], "cannot compare"),
    ],
)
def test_cli_bad_inputs_exit_2_with_one_line(dirs, tmp_path_factory, capsys, args, message):
    out = tmp_path_factory.mktemp("bad") / "out"
    limit = [] if "--limit" in args else ["--limit", str(LIMIT)]
    argv = ["landscape", *(a.format(**dirs) for a in args), "--task", TASK, *limit, "--out", str(out)]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()  # after any library progress bars: one error line
    assert err.splitlines()[-1].startswith("error: ") and message in err.splitlines()[-1] and "Traceback" not in err
    assert not out.exists()  # refused before writing anything
