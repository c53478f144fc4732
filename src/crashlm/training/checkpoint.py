"""Resumable checkpoints of a training run, in safetensors and JSON only (never pickle).

``<out>.partial/`` holds ``run.json`` (configuration and identity of the run), ``latest.json``
(the newest complete checkpoint) and ``step-NNNNNNNN/``: the trainable weights, the best weights
so far, the optimizer state (tensors flattened into safetensors, the rest in JSON), the
learning-rate schedule, the loss history and every process's RNG state (uint8 tensors). A
checkpoint directory is written under a temporary name, renamed, and only then named in
``latest.json``, so a kill at any moment leaves the previous checkpoint usable. Resuming restores
all of it and continues at the next step: on CPU the result is bit-identical to an uninterrupted
run. The working directory is removed once the run's output is written.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from accelerate import Accelerator

from crashlm.core.errors import UsageError
from crashlm.core.io import load_tensors, read_json, save_tensors, write_json

CHECKPOINT_FORMAT = "crashlm-train-checkpoint"
CHECKPOINT_VERSION = 1


def checkpoint_dir(out_dir: str | Path) -> Path:
    """The resumable working directory of a run writing ``out_dir``: ``<out_dir>.partial``."""
    out_dir = Path(out_dir)
    return out_dir.with_name(out_dir.name + ".partial")


def check_output(out_dir: str | Path, resume: bool) -> None:
    """Refuse an existing output, a foreign working directory, or an interrupted run without ``resume``."""
    out_dir = Path(out_dir)
    work = checkpoint_dir(out_dir)
    if out_dir.exists():
        raise UsageError(f"{out_dir} already exists; choose another --out or remove it")
    if work.exists():
        if not _is_run_dir(work):
            raise UsageError(f"{work} exists and is not a crashlm training checkpoint; move it away")
        if not resume:
            raise UsageError(f"{work} holds an interrupted run for {out_dir}; pass --resume to continue it, or remove it")


def _is_run_dir(work: Path) -> bool:
    try:
        return read_json(work / "run.json", "training run record").get("format") == CHECKPOINT_FORMAT
    except (UsageError, AttributeError):
        return False


# ---------------------------------------------------------------------------------------------
# Optimizer and RNG state as safetensors + JSON


def flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer ``state_dict`` as safetensors tensors (``<param index>.<key>``) plus JSON."""
    tensors, scalars = {}, {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            (tensors if torch.is_tensor(value) else scalars)[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """The ``state_dict`` that :func:`flatten_optimizer` flattened (JSON lists back to tuples for betas)."""
    state: dict[int, dict] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    groups = [dict(group, betas=tuple(group["betas"])) if "betas" in group else group for group in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ---------------------------------------------------------------------------------------------
# The store


@dataclass
class Checkpoint:
    """One checkpoint as read back: ``state`` is the loop's ``state.json``, ``rng`` this process's."""

    state: dict
    weights: dict[str, torch.Tensor]
    optimizer: dict
    rng: dict[str, torch.Tensor]
    best: dict[str, torch.Tensor] | None


class CheckpointStore:
    """The working directory of one run writing ``out_dir`` (see the module docstring).

    ``config`` and ``identity`` are recorded in ``run.json``; a run may only resume with equal
    ones, except for the ``volatile`` config keys (settings that do not change the result).
    """

    def __init__(self, out_dir: str | Path, acc: Accelerator, config: dict, identity: dict,
                 volatile: Sequence[str] = ()):
        self.acc, self.work = acc, checkpoint_dir(out_dir)
        self.record = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "out": str(out_dir),
                       "config": config, "identity": identity}
        self.volatile = tuple(volatile)

    def resumable(self) -> bool:
        """Whether a checkpoint of this run exists; refuses one of a run with other settings or another model."""
        if not self.work.exists():
            return False
        record, mine = read_json(self.work / "run.json", "training run record"), self.record
        record["config"] = {**record.get("config", {}), **{key: mine["config"][key] for key in self.volatile}}
        changed = [key for key in ("config", "identity") if record.get(key) != mine[key]]
        if changed:
            raise UsageError(f"{self.work} was started with other settings or another model ({', '.join(changed)} "
                             f"differ); remove it or use the same settings")
        return (self.work / "latest.json").is_file()

    def create(self) -> None:
        """Start the working directory afresh (its run record, no checkpoint yet)."""
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            self.work.mkdir(parents=True, exist_ok=True)
            write_json(self.work / "run.json", self.record)

    def save(self, state: dict, weights: dict[str, torch.Tensor], optimizer: dict | None,
             best: tuple[int, float, dict[str, torch.Tensor]] | None) -> None:
        """Write checkpoint ``state["step"]`` and point ``latest.json`` at it; called by every process.

        ``weights``, ``optimizer`` (a ``state_dict``; None where it is sharded) and ``best`` (step,
        validation loss, weights) are only needed on the main process; every process saves its RNG.
        """
        acc, name = self.acc, f"step-{state['step']:08d}"
        tmp, final = self.work / f".{name}.tmp", self.work / name
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        save_tensors(tmp / f"rng-{acc.process_index}.safetensors", rng_state(acc.device))
        if acc.is_main_process:
            save_tensors(tmp / "trainable.safetensors", weights)
            meta = None
            if optimizer is not None:
                tensors, meta = flatten_optimizer(optimizer)
                save_tensors(tmp / "optimizer.safetensors", tensors)
            best_record = None
            if best is not None:
                best_record = {"step": best[0], "val_loss": best[1], "file": f"best-{best[0]:08d}.safetensors"}
                previous = self.latest()
                self._write_best(previous / best_record["file"] if previous else None, tmp / best_record["file"], best[2])
            write_json(tmp / "state.json", {**state, "best": best_record, "optimizer": meta})
        acc.wait_for_everyone()
        if acc.is_main_process:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            write_json(self.work / "latest.json", {"checkpoint": name, "step": state["step"]})
            for old in self.work.glob("step-*"):
                if old.name != name:
                    shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()

    @staticmethod
    def _write_best(previous: Path | None, path: Path, weights: dict[str, torch.Tensor]) -> None:
        """The best weights, hard-linked from the previous checkpoint when they have not changed."""
        if previous is not None and previous.is_file():
            try:
                os.link(previous, path)
                return
            except OSError:
                pass  # no hard links on this file system
        save_tensors(path, weights)

    def latest(self) -> Path | None:
        pointer = self.work / "latest.json"
        return self.work / read_json(pointer, "checkpoint pointer")["checkpoint"] if pointer.is_file() else None

    def load(self) -> Checkpoint:
        """The newest checkpoint, with this process's RNG state."""
        ckpt = self.latest()
        state = read_json(ckpt / "state.json", "checkpoint state")
        best = state["best"]
        return Checkpoint(
            state=state,
            weights=load_tensors(ckpt / "trainable.safetensors"),
            optimizer=unflatten_optimizer(load_tensors(ckpt / "optimizer.safetensors"), state["optimizer"]),
            rng=load_tensors(ckpt / f"rng-{self.acc.process_index}.safetensors"),
            best=load_tensors(ckpt / best["file"]) if best else None,
        )

    def remove(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)
