"""Atomic artifact writing and integrity hashes.

Every artifact is written under a temporary name in the same directory and renamed into
place, so an interrupted run never leaves a half-written file that a later run would trust.
Only JSON and safetensors are ever read back from users' files (never pickles).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from crashlm.core.errors import RunFailure, UsageError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only on success."""
    path = Path(path)
    check_output_file(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise RunFailure(f"cannot write {path}: {exc.strerror or exc}") from exc
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; artifacts are ordinary files
        os.replace(tmp_path, path)
    except OSError as exc:
        tmp_path.unlink(missing_ok=True)
        raise RunFailure(f"cannot write {path}: {exc.strerror or exc}") from exc
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


# Manifests of crashlm's directory artifacts (bundle, adapter, plugged-in or fully fine-tuned
# model, tuned lens): atomic_dir replaces an existing directory only when it holds one of them.
ARTIFACT_MARKERS = ("crashlm.json", "adapter.json", "crashlm_plugin.json", "training.json", "lens.json")


def check_output_file(path: str | os.PathLike) -> None:
    """Refuse a file output that names an existing directory (before any work is done)."""
    if Path(path).is_dir():
        raise UsageError(f"output {path} is a directory; give a file path")


def check_output_dir(path: str | os.PathLike, markers: tuple[str, ...] = ARTIFACT_MARKERS) -> None:
    """Refuse an output path that is a file, or a non-empty directory without any of ``markers``.

    Writing into, or replacing, a directory crashlm did not make (``--out ~``, a model directory)
    would litter or destroy the user's files. ``markers`` are glob patterns relative to ``path``.
    """
    path = Path(path)
    if not path.exists():
        return
    if not path.is_dir():
        raise UsageError(f"output {path} exists and is not a directory; choose another --out")
    if any(path.iterdir()) and not any(next(path.glob(marker), None) for marker in markers):
        raise UsageError(
            f"output directory {path} exists and is not crashlm output (no {' / '.join(markers)}); "
            "choose another --out or remove it"
        )


def _staging_dir(path: Path) -> Path:
    """A private temporary directory next to ``path`` (same filesystem, so renames are atomic)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as exc:
        raise RunFailure(f"cannot write {path}: {exc.strerror or exc}") from exc


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory; it replaces ``path`` (a directory) only on success.

    An existing ``path`` is replaced only when it is empty or one of crashlm's directory
    artifacts (:data:`ARTIFACT_MARKERS`): never a directory of the user's.
    """
    path = Path(path)
    check_output_dir(path)
    tmp = _staging_dir(path)
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if path.exists():
            # Move the old version aside first: the target is never missing nor half-deleted.
            old = _staging_dir(path)
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RunFailure(f"cannot write {path}: {exc.strerror or exc}") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_files(out_dir: str | os.PathLike, markers: tuple[str, ...]) -> Iterator[Path]:
    """Yield a staging directory whose files move into ``out_dir`` only once all are written.

    For commands that write several files into a directory that may hold other results (a
    similarity and a plan side by side): a failure halfway leaves ``out_dir`` as it was, and
    files of the same name are replaced one rename each. ``out_dir`` must be new, empty or
    crashlm output (``markers``).
    """
    out_dir = Path(out_dir)
    check_output_dir(out_dir, markers)
    tmp = _staging_dir(out_dir)
    try:
        yield tmp
        if not out_dir.exists():
            os.chmod(tmp, 0o777 & ~_umask())
            os.replace(tmp, out_dir)
            return
        for file in sorted(p for p in tmp.rglob("*") if not p.is_dir()):
            target = out_dir / file.relative_to(tmp)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(file, target)
        shutil.rmtree(tmp)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RunFailure(f"cannot write {out_dir}: {exc.strerror or exc}") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: str | os.PathLike, data: Any) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return Path(path)


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{what} {path} is not valid JSON: {exc}") from exc


def read_artifact_meta(directory: str | os.PathLike, filename: str, kind: str, fmt: str, version: int) -> dict:
    """The metadata JSON of a crashlm artifact directory, checked for its format tag and version.

    Bundles, adapters and lenses all carry one; the tag tells a foreign directory apart from ours
    before any tensor is read, and the version refuses files from a newer crashlm.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise UsageError(f"{kind} not found: {directory}")
    meta = read_json(directory / filename, f"{kind} metadata")
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise UsageError(f"{directory} is not a crashlm {kind} (no {filename} with format {fmt!r})")
    if meta.get("version", 0) > version:
        raise UsageError(f"{directory}: {kind} version {meta['version']} is newer than this crashlm understands")
    return meta


def read_text_lines(path: str | os.PathLike, what: str = "text file") -> list[str]:
    """The non-empty lines of a UTF-8 text file, stripped: one sample per line."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{what} not found: {path}")
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as exc:
        raise UsageError(f"{what} {path} is not UTF-8 text: {exc.reason} at byte {exc.start}") from exc
    samples = [line for line in lines if line]
    if not samples:
        raise UsageError(f"{what} {path} has no non-empty line")
    return samples


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """Save contiguous CPU copies of ``tensors`` atomically; return the file's sha256."""
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(cpu, str(tmp), metadata=metadata)
    return sha256_file(path)


def load_tensors(path: str | os.PathLike, expected_sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Load a safetensors file, refusing it when its sha256 differs from the recorded one."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"tensor file not found: {path}")
    if expected_sha256 is not None and sha256_file(path) != expected_sha256:
        raise UsageError(f"{path} does not match its recorded sha256 (corrupted or modified)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UsageError(f"{path} is not a readable safetensors file: {exc}") from exc


def dataclass_fields(cls, data: Any, what: str) -> dict[str, Any]:
    """The keyword arguments of dataclass ``cls`` found in JSON ``data``; every field without a
    default must be there (one-line UsageError naming ``what`` otherwise). Unknown keys are
    ignored, so files written by newer versions still load."""
    if not isinstance(data, dict):
        raise UsageError(f"{what} must be a JSON object")
    names = [f.name for f in dataclasses.fields(cls)]
    required = [
        f.name for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [name for name in required if name not in data]
    if missing:
        raise UsageError(f"{what} lacks {', '.join(missing)}")
    return {name: data[name] for name in names if name in data}

