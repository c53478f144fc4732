"""The package's structure as docs/architecture.md states it: layers, their import rule, module size."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "crashlm"
# A layer may import itself and the layers before it, never one after it (docs/architecture.md).
LAYERS = ["core", "training", "evaluation", "analysis", "emulators", "outputs", "experiments", "cli"]
MAX_LINES = 500


def _modules() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def _layer(path: Path) -> str | None:
    parts = path.relative_to(SRC).parts
    return parts[0] if len(parts) > 1 else None


def _imported_layers(path: Path) -> set[tuple[int, str]]:
    """(line, layer) of every crashlm import in the module, wherever it sits."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "crashlm" and len(parts) > 1 and parts[1] in LAYERS:
                found.add((node.lineno, parts[1]))
    return found


def test_every_module_belongs_to_a_layer():
    loose = [p.name for p in _modules() if _layer(p) is None and p.name not in ("__init__.py", "__main__.py")]
    assert loose == [], "put modules in a layer package (docs/architecture.md)"
    assert {p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").exists()} == set(LAYERS)


def test_no_relative_imports():
    relative = [f"{p.relative_to(SRC)}:{node.lineno}" for p in _modules()
                for node in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
                if isinstance(node, ast.ImportFrom) and node.level > 0]
    assert relative == []


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_imports_follow_the_layers(path):
    layer = _layer(path)
    if layer is None:
        return  # crashlm/__init__.py and __main__.py sit above every layer
    rank = LAYERS.index(layer)
    upward = sorted(f"line {line}: imports crashlm.{other}" for line, other in _imported_layers(path)
                    if LAYERS.index(other) > rank)
    assert upward == [], f"{layer} may only import {', '.join(LAYERS[: rank + 1])}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_no_module_over_the_size_limit(path):
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{lines} lines: split the module by concept"


def test_the_rule_catches_an_upward_import(tmp_path):
    module = tmp_path / "bad.py"
    module.write_text("def f():\n    from crashlm.cli import app\n    return app\n", encoding="utf-8")
    assert _imported_layers(module) == {(2, "cli")}


def test_the_python_api_resolves_and_import_crashlm_stays_light():
    import crashlm

    assert all(getattr(crashlm, name) is not None for name in crashlm.__all__)
    with pytest.raises(AttributeError):
        crashlm.no_such_name  # noqa: B018
    code = "import sys, crashlm; assert 'torch' not in sys.modules, 'import crashlm loaded torch'"
    subprocess.run([sys.executable, "-c", code], check=True)
