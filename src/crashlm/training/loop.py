"""Training: adapter layers on an emulator, full fine-tuning, and OFT's emulator distillation.

Adapter training and full fine-tuning share one loop (:class:`_Trainer`) built on
``accelerate.Accelerator``, so ``accelerate launch`` runs it on several processes or GPUs: DDP
(CPU over gloo included), DeepSpeed ZeRO-1/2, and FSDP for full fine-tuning (``configs/``).
The loss is the mean cross-entropy over the answer tokens of the task's single formatting
(:func:`crashlm.core.scoring.encode_example`), so training sees exactly what evaluation scores.
AdamW, cosine or linear schedule with warmup, gradient clipping; bf16 autocast where the device
computes bf16 natively (:func:`use_bf16`), weights and optimizer state in fp32.

Data. The validation examples are held out from the TRAIN split by a fixed permutation that
does not depend on the seed, so every seed and strategy is selected on the same examples and
the evaluation split is never touched. An epoch is a seeded permutation of the training
examples cut into micro-batches; optimizer step ``s`` of an epoch consumes micro-batches
``s*P*G .. (s+1)*P*G - 1`` (P processes, G accumulation steps; the last step wraps around to
the epoch's start), process ``p`` taking every P-th of them. So a 2-process run sees the same
examples per step as a 1-process run with twice the accumulation, and the data position is a
function of the step alone.

Checkpoints. ``<out>.partial/`` holds ``run.json`` (configuration and identity of the run),
``latest.json`` (the newest complete checkpoint) and ``step-NNNNNNNN/``: the trainable weights,
the best weights so far, the optimizer state (tensors flattened into safetensors, the rest in
JSON), the learning-rate schedule, the loss history and every process's RNG state (uint8
tensors): safetensors and JSON only, never pickle. A checkpoint directory is written under a
temporary name, renamed, and only then named in ``latest.json``, so a kill at any moment leaves
the previous checkpoint usable. Resuming restores all of it and continues at the next step: on
CPU the result is bit-identical to an uninterrupted run. A non-finite loss stops the run with
:class:`~crashlm.core.errors.RunFailure`, the last good checkpoint kept.

Selection. The validation loss is computed every ``eval_every`` optimizer steps (by default at
the end of every epoch) and always at the last step; the weights with the lowest validation
loss are what gets written. The curve starts with the untrained weights at step 0 as a
reference point; only trained weights (step >= 1) are candidates.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from crashlm.core.errors import RunFailure, UsageError
from crashlm.core.io import (
    atomic_dir,
    load_tensors,
    read_json,
    save_tensors,
    write_json,
)
from crashlm.core.models import capture_layer_io, default_device, fingerprint
from crashlm.core.scoring import (
    IGNORE_INDEX,
    EncodedPair,
    answer_loss,
    collate,
    encode_example,
    encode_text,
    mean_answer_loss,
    pad_batch,
    pad_token_id,
)
from crashlm.emulators.emulator import Emulator

SCHEDULES = ("cosine", "linear")
# The held-out validation docs are the same for every seed: a fixed permutation of the train split.
VAL_SPLIT_SEED = 0
CHECKPOINT_FORMAT = "crashlm-train-checkpoint"
CHECKPOINT_VERSION = 1
FULL_FORMAT = "crashlm-full-finetune"
TRAINING_META = "training.json"
# Offsite-Tuning's distillation objective (Xiao et al. 2023): 1.0 * LM + 30 * KD.
LM_WEIGHT, KD_WEIGHT = 1.0, 30.0


@dataclass
class TrainConfig:
    """Everything that decides what a training run produces (recorded with its output)."""

    task: str
    train_samples: int | None = None  # at most this many training docs; None: all but the validation docs
    val_samples: int = 200  # held out from the TRAIN split (fixed permutation), never the eval split
    epochs: int = 1
    max_steps: int | None = None  # overrides epochs when given
    lr: float = 1e-4
    batch_size: int = 8  # per process and micro-batch
    grad_accum: int = 1
    seed: int = 1
    max_length: int = 256
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    schedule: str = "cosine"
    grad_clip: float = 1.0  # 0: no clipping
    eval_every: int | None = None  # optimizer steps; None: at the end of each epoch
    lora: int | None = None  # LoRA rank on the adapter layers, merged before saving
    bf16: bool = True  # bf16 autocast where the device has native bf16 (else fp32); weights and AdamW stay fp32
    data_source: str = "offline"
    checkpoint_every: int = 100  # optimizer steps between resumable checkpoints (also at every evaluation)

    def validate(self) -> None:
        from crashlm.core.tasks import SOURCES, get_task

        get_task(self.task)
        if self.data_source not in SOURCES:
            raise UsageError(f"unknown data source {self.data_source!r}; choose one of {', '.join(SOURCES)}")
        for name in ("val_samples", "epochs", "batch_size", "grad_accum", "checkpoint_every"):
            if getattr(self, name) <= 0:
                raise UsageError(f"{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}")
        for name in ("train_samples", "max_steps", "eval_every", "lora"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UsageError(f"{name.replace('_', '-')} must be a positive integer, got {value}")
        if self.max_length < 8:
            raise UsageError(f"max-length must be at least 8 tokens, got {self.max_length}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise UsageError(f"lr must be a positive number, got {self.lr}")
        if not self.weight_decay >= 0 or not self.grad_clip >= 0:
            raise UsageError("weight-decay and grad-clip must be >= 0")
        if not 0 <= self.warmup_ratio < 1:
            raise UsageError(f"warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.schedule not in SCHEDULES:
            raise UsageError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UsageError(f"unknown training settings: {', '.join(unknown)}")
        return cls(**data)


# ---------------------------------------------------------------------------------------------
# Data


def split_examples(config: TrainConfig) -> tuple[list, list]:
    """``(train, validation)`` examples from the task's train split (see the module docstring)."""
    from crashlm.core.tasks import load_examples

    examples = load_examples(config.task, "train", source=config.data_source)
    if len(examples) <= config.val_samples:
        raise UsageError(
            f"{config.task} has {len(examples)} training docs: too few to hold out {config.val_samples} for validation"
        )
    order = list(range(len(examples)))
    random.Random(VAL_SPLIT_SEED).shuffle(order)
    val = [examples[i] for i in order[: config.val_samples]]
    train = [examples[i] for i in order[config.val_samples :]][: config.train_samples]
    return train, val


def batch_answer_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """:func:`~crashlm.core.scoring.answer_loss` of a batch, unembedding only from the first answer position on.

    The unembedding and its softmax are a large share of a small model's compute (SmolLM2:
    49k vocabulary vs 576 hidden), and only answer positions need them.
    """
    targets = batch["targets"]
    answer = (targets != IGNORE_INDEX).any(0).nonzero()
    start = int(answer[0]) if len(answer) else 0
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                   logits_to_keep=targets.shape[1] - start).logits
    return answer_loss(logits, targets[:, start:])


# ---------------------------------------------------------------------------------------------
# Optimizer, schedule and their safetensors + JSON form


def _optimizer(params: Sequence[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def _schedule(optimizer: torch.optim.Optimizer, name: str, warmup_ratio: float, total_steps: int):
    from transformers import (
        get_cosine_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    make = get_cosine_schedule_with_warmup if name == "cosine" else get_linear_schedule_with_warmup
    return make(optimizer, math.ceil(warmup_ratio * total_steps), total_steps)


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer ``state_dict`` as safetensors tensors (``<param index>.<key>``) plus JSON."""
    tensors, scalars = {}, {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            (tensors if torch.is_tensor(value) else scalars)[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    groups = [dict(group, betas=tuple(group["betas"])) if "betas" in group else group for group in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ---------------------------------------------------------------------------------------------
# Output and checkpoint directories


def checkpoint_dir(out_dir: str | Path) -> Path:
    """The resumable working directory of a run writing ``out_dir``: ``<out_dir>.partial``."""
    out_dir = Path(out_dir)
    return out_dir.with_name(out_dir.name + ".partial")


def _check_output(out_dir: Path, work: Path, resume: bool) -> None:
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


def use_bf16(requested: bool, device: torch.device) -> bool:
    """bf16 autocast when asked for AND the device computes bf16 natively.

    CPUs without AVX512-BF16 or AMX (AVX2-only hosts) emulate bf16 matmuls, measured 5-80x
    slower than fp32 on such a host (EPYC, torch 2.13): there training runs in fp32 instead.
    """
    from crashlm.core.models import native_bf16

    return requested and native_bf16(device)


def _accelerator(config: TrainConfig):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    precision = "bf16" if use_bf16(config.bf16, default_device()) else "no"
    # cpu=True without CUDA also makes torchrun-style launches (LOCAL_RANK set, e.g. `accelerate launch
    # --multi_gpu`) use gloo on CPU; accelerate's own MULTI_CPU launcher needs MPI.
    cpu = not torch.cuda.is_available()
    if AcceleratorState._shared_state and PartialState().num_processes == 1:
        # accelerate fixes one precision and device per process, but one process may train several
        # models (the offsite pipeline, tests): a single process can safely start over.
        state = AcceleratorState()
        if state.mixed_precision != precision or (cpu and state.device.type != "cpu"):
            AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(mixed_precision=precision, gradient_accumulation_steps=config.grad_accum, cpu=cpu)


def _sharding(acc, config: TrainConfig, kind: str) -> str | None:
    """"fsdp" or "deepspeed" when the run shards state over processes (None: DDP or one process).

    Both shard the optimizer state, which checkpoints do not hold: such runs cannot resume.
    DeepSpeed ZeRO-1/2 keeps the weights whole on every process. FSDP shards them too, which
    suits full fine-tuning of a large model; adapters train on small emulators with DDP, and a
    sharing emulator (one module at several positions) cannot be wrapped by FSDP.
    """
    mode = acc.distributed_type.value
    if mode == "FSDP":
        if kind != "full":
            raise UsageError("FSDP is for full fine-tuning (--full); train adapters with DDP (configs/accelerate_ddp.yaml)")
        return "fsdp"
    if mode != "DEEPSPEED":
        return None
    plugin = acc.state.deepspeed_plugin
    if plugin.zero_stage > 2:
        raise UsageError(f"DeepSpeed ZeRO stage {plugin.zero_stage} shards the weights; use stage 1 or 2 (or FSDP)")
    # No dataloader goes through accelerate.prepare, so DeepSpeed learns the micro-batch size here.
    plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = config.batch_size
    return "deepspeed"


# ---------------------------------------------------------------------------------------------
# The loop


@dataclass
class TrainResult:
    """What a run reports: recorded in ``adapter.json`` / ``training.json`` as ``training``."""

    record: dict
    curve: list[dict]
    weights: dict[str, torch.Tensor] | None = None  # under FSDP: the gathered best weights, to write


class _Trainer:
    """One training run of ``model``'s parameters that require grad (see the module docstring)."""

    def __init__(self, model: nn.Module, tokenizer, config: TrainConfig, out_dir: Path, kind: str,
                 start_fingerprint: str):
        self.config, self.tokenizer, self.kind = config, tokenizer, kind
        self.out_dir, self.work = out_dir, checkpoint_dir(out_dir)
        self.acc = acc = _accelerator(config)
        self.sharding = _sharding(acc, config, kind)
        self.params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        if not self.params:
            raise UsageError("nothing to train: the model has no trainable parameters")
        self.identity = {"kind": kind, "start_fingerprint": start_fingerprint, "num_processes": acc.num_processes,
                         "trainable": sorted(self.params)}
        train, val = split_examples(config)
        self.pairs = [encode_example(tokenizer, ex, config.max_length) for ex in train]
        self.val = val
        self.pad_id = pad_token_id(tokenizer)
        self.batches_per_epoch = math.ceil(len(self.pairs) / config.batch_size)
        per_step = acc.num_processes * config.grad_accum
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / per_step)
        self.total_steps = config.max_steps or config.epochs * self.steps_per_epoch
        optimizer = _optimizer(list(self.params.values()), config)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        # Not prepared: accelerate would step it once per process; it follows optimizer steps here.
        self.scheduler = _schedule(optimizer, config.schedule, config.warmup_ratio, self.total_steps)
        self.step, self.tokens, self.seconds = 0, 0, 0.0
        self.losses: list[float] = []
        self.curve: list[dict] = []
        self.best: dict[str, torch.Tensor] | None = None
        self.best_step: int | None = None
        self.best_loss = math.inf
        self._orders: dict[int, list[int]] = {}

    # -- data --------------------------------------------------------------------------------

    def _epoch_order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(len(self.pairs)))
            random.Random(self.config.seed * 1_000_003 + epoch).shuffle(order)
            self._orders = {epoch: order}
        return self._orders[epoch]

    def _micro_batches(self, step: int) -> list[list[EncodedPair]]:
        """This process's micro-batches of optimizer step ``step`` (1-based)."""
        epoch, local = divmod(step - 1, self.steps_per_epoch)
        order, size = self._epoch_order(epoch), self.config.batch_size
        per_step, procs = self.acc.num_processes * self.config.grad_accum, self.acc.num_processes
        ids = [(local * per_step + j) % self.batches_per_epoch for j in range(per_step)]
        return [[self.pairs[i] for i in order[b * size : (b + 1) * size]] for b in ids[self.acc.process_index :: procs]]

    # -- weights -----------------------------------------------------------------------------

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        """CPU copies of the trainable weights (under FSDP gathered by every process, held by the main one)."""
        if self.sharding == "fsdp":
            full = self.acc.get_state_dict(self.model)
            return {name: full[name].to("cpu", copy=True) for name in self.params if name in full}
        return {name: p.detach().to("cpu", copy=True) for name, p in self.params.items()}

    @torch.no_grad()
    def _load_trainable(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.params):
            raise UsageError(f"checkpoint weights do not match the trainable parameters ({len(state)} vs {len(self.params)})")
        for name, param in self.params.items():
            param.copy_(state[name].to(param.device, param.dtype))

    # -- validation --------------------------------------------------------------------------

    def _validate(self) -> float:
        """Mean answer-token loss on the held-out docs, each process scoring its share."""
        autocast = torch.bfloat16 if self.acc.mixed_precision == "bf16" else None
        if self.sharding == "fsdp":
            # FSDP's forward is a collective: every process scores every doc through the wrapped model.
            self.model.eval()
            loss = mean_answer_loss(self.model, self.tokenizer, self.val, batch_size=self.config.batch_size,
                                    max_length=self.config.max_length, autocast_dtype=autocast)
            self.model.train()
            return loss
        procs, rank = self.acc.num_processes, self.acc.process_index
        shard = self.val[rank::procs]
        model = self.acc.unwrap_model(self.model)
        model.eval()
        total, count = 0.0, 0
        if shard:
            count = sum(encode_example(self.tokenizer, ex, self.config.max_length).num_answer_tokens for ex in shard)
            mean = mean_answer_loss(model, self.tokenizer, shard, batch_size=self.config.batch_size,
                                    max_length=self.config.max_length, autocast_dtype=autocast)
            total = mean * count
        model.train()
        sums = self.acc.reduce(torch.tensor([total, count], dtype=torch.float64, device=self.acc.device), "sum")
        return float(sums[0] / sums[1])

    def _evaluate(self) -> None:
        loss = self._validate()
        if not math.isfinite(loss):
            self._fail(f"non-finite validation loss at step {self.step}")
        last = self.curve[-1]["step"] if self.curve else 0
        recent = self.losses[last : self.step]
        self.curve.append({"step": self.step, "epoch": round(self.step / self.steps_per_epoch, 4), "val_loss": loss,
                           "train_loss": sum(recent) / len(recent) if recent else None})
        if self.step > 0 and loss < self.best_loss:
            self.best_loss, self.best_step, self.best = loss, self.step, self._trainable_state()

    def _fail(self, what: str) -> None:
        raise RunFailure(f"training stopped: {what}; last good checkpoint kept in {self.work}")

    # -- checkpoints -------------------------------------------------------------------------

    def _run_record(self) -> dict:
        return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "out": str(self.out_dir),
                "config": self.config.to_dict(), "identity": self.identity}

    def _start(self) -> None:
        """Create the working directory, or check and restore it when resuming."""
        acc = self.acc
        if self.work.exists():
            record, mine = read_json(self.work / "run.json", "training run record"), self._run_record()
            # The checkpoint frequency does not change the result: a resumed run may use another.
            record["config"] = {**record.get("config", {}), "checkpoint_every": self.config.checkpoint_every}
            changed = [k for k in ("config", "identity") if record.get(k) != mine[k]]
            if changed:
                raise UsageError(f"{self.work} was started with other settings or another model ({', '.join(changed)} "
                                 f"differ); remove it or use the same settings")
            if (self.work / "latest.json").is_file():
                if self.sharding:
                    raise UsageError(f"{self.sharding} runs cannot resume (their optimizer state is sharded); remove {self.work}")
                self._restore()
                return
        acc.wait_for_everyone()
        if acc.is_main_process:
            self.work.mkdir(parents=True, exist_ok=True)
            write_json(self.work / "run.json", self._run_record())
        self._evaluate()  # the untrained reference point of the curve
        self._checkpoint()

    def _checkpoint(self) -> None:
        acc, name = self.acc, f"step-{self.step:08d}"
        tmp, final = self.work / f".{name}.tmp", self.work / name
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        save_tensors(tmp / f"rng-{acc.process_index}.safetensors", _rng_state(acc.device))
        weights = self._trainable_state()
        if acc.is_main_process:
            save_tensors(tmp / "trainable.safetensors", weights)
            meta = None
            if not self.sharding:
                tensors, meta = _flatten_optimizer(self.optimizer.state_dict())
                save_tensors(tmp / "optimizer.safetensors", tensors)
            best_file = f"best-{self.best_step:08d}.safetensors" if self.best is not None else None
            previous = self._latest()
            if best_file:
                self._write_best(previous / best_file if previous else None, tmp / best_file)
            write_json(tmp / "state.json", {
                "step": self.step, "total_steps": self.total_steps, "steps_per_epoch": self.steps_per_epoch,
                "tokens": self.tokens, "seconds": self.seconds, "losses": self.losses, "curve": self.curve,
                "best": {"step": self.best_step, "val_loss": self.best_loss, "file": best_file} if best_file else None,
                "optimizer": meta, "scheduler": self.scheduler.state_dict(),
            })
        acc.wait_for_everyone()
        if acc.is_main_process:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            write_json(self.work / "latest.json", {"checkpoint": name, "step": self.step})
            for old in self.work.glob("step-*"):
                if old.name != name:
                    shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()

    def _write_best(self, previous: Path | None, path: Path) -> None:
        """The best weights, hard-linked from the previous checkpoint when they have not changed."""
        if previous is not None and previous.is_file():
            try:
                os.link(previous, path)
                return
            except OSError:
                pass  # no hard links on this file system
        save_tensors(path, self.best)

    def _latest(self) -> Path | None:
        pointer = self.work / "latest.json"
        return self.work / read_json(pointer, "checkpoint pointer")["checkpoint"] if pointer.is_file() else None

    def _restore(self) -> None:
        ckpt = self._latest()
        state = read_json(ckpt / "state.json", "checkpoint state")
        if state["steps_per_epoch"] != self.steps_per_epoch or state["total_steps"] != self.total_steps:
            raise UsageError(f"{self.work} was made with other training data (steps per epoch differ); remove it")
        self._load_trainable(load_tensors(ckpt / "trainable.safetensors"))
        self.optimizer.load_state_dict(_unflatten_optimizer(load_tensors(ckpt / "optimizer.safetensors"), state["optimizer"]))
        self.scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(load_tensors(ckpt / f"rng-{self.acc.process_index}.safetensors"), self.acc.device)
        self.step, self.tokens, self.seconds = state["step"], state["tokens"], state["seconds"]
        self.losses, self.curve = state["losses"], state["curve"]
        if state["best"]:
            self.best = load_tensors(ckpt / state["best"]["file"])
            self.best_step, self.best_loss = state["best"]["step"], state["best"]["val_loss"]

    # -- training ----------------------------------------------------------------------------

    def _train_step(self) -> tuple[float, int]:
        """One optimizer step; returns the mean micro-batch loss and the tokens seen, over all processes."""
        acc, loss_sum, tokens = self.acc, torch.zeros((), dtype=torch.float64, device=self.acc.device), 0
        micro = self._micro_batches(self.step + 1)
        for pairs in micro:
            batch = {k: v.to(acc.device) for k, v in collate(pairs, self.pad_id).items()}
            with acc.accumulate(self.model):
                loss = batch_answer_loss(self.model, batch)
                acc.backward(loss)
                if acc.sync_gradients and self.config.grad_clip > 0:
                    acc.clip_grad_norm_(list(self.params.values()), self.config.grad_clip)
                self.optimizer.step()
                self.optimizer.zero_grad()
            loss_sum += loss.detach().double()
            tokens += int(batch["attention_mask"].sum())
        self.scheduler.step()
        stats = acc.reduce(torch.stack([loss_sum, loss_sum.new_tensor(len(micro)), loss_sum.new_tensor(tokens)]), "sum")
        return float(stats[0] / stats[1]), int(stats[2])

    def run(self) -> TrainResult:
        from tqdm.auto import tqdm

        config, acc = self.config, self.acc
        self.model.train()
        self._start()
        bar = tqdm(total=self.total_steps, initial=self.step, desc=f"train {self.kind}", unit="step", file=sys.stderr,
                   dynamic_ncols=True, disable=not acc.is_main_process)
        session_tokens, session_seconds = 0, 0.0
        while self.step < self.total_steps:
            started = time.perf_counter()
            loss, tokens = self._train_step()
            elapsed = time.perf_counter() - started
            self.step += 1
            if not math.isfinite(loss):
                bar.close()
                self._fail(f"non-finite loss at step {self.step}")
            self.losses.append(loss)
            self.tokens += tokens
            self.seconds += elapsed
            session_tokens, session_seconds = session_tokens + tokens, session_seconds + elapsed
            evaluate = (self.step % config.eval_every == 0) if config.eval_every else (self.step % self.steps_per_epoch == 0)
            if evaluate or self.step == self.total_steps:
                self._evaluate()
            if self.step < self.total_steps and (evaluate or self.step % config.checkpoint_every == 0):
                self._checkpoint()
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{session_tokens / max(session_seconds, 1e-9):.0f}",
                            best_val=f"{self.best_loss:.4f}", refresh=False)
        bar.close()
        if self.sharding != "fsdp":
            self._load_trainable(self.best)
        model = self.acc.unwrap_model(self.model, keep_fp32_wrapper=False)
        model.eval()
        record = {
            "kind": self.kind, "config": config.to_dict(), "steps": self.total_steps,
            "steps_per_epoch": self.steps_per_epoch, "train_examples": len(self.pairs), "val_examples": len(self.val),
            # Examples longer than max_length lose the start of their context, as in evaluation.
            "truncated_train_examples": sum(p.truncated for p in self.pairs),
            "num_processes": acc.num_processes, "distributed_type": acc.distributed_type.value,
            "mixed_precision": acc.mixed_precision, "device": str(acc.device),
            "best_step": self.best_step, "best_val_loss": self.best_loss,
            "initial_val_loss": self.curve[0]["val_loss"], "train_losses": self.losses, "tokens": self.tokens,
            "train_seconds": round(self.seconds, 3), "tokens_per_second": round(self.tokens / max(self.seconds, 1e-9), 1),
        }
        return TrainResult(record, self.curve, self.best if self.sharding == "fsdp" else None)

    def finish(self, write: Callable[[], None]) -> None:
        """Write the output on the main process, then drop the working directory."""
        if self.acc.is_main_process:
            write()
            shutil.rmtree(self.work, ignore_errors=True)
        self.acc.wait_for_everyone()
        self.acc.free_memory()


def _train(model, tokenizer, config: TrainConfig, out_dir, resume: bool, kind: str, start_fingerprint: str,
           write: Callable[[TrainResult], None], prepare: Callable[[], None] | None = None) -> Path:
    config.validate()
    out_dir = Path(out_dir)
    work = checkpoint_dir(out_dir)
    _check_output(out_dir, work, resume)
    from accelerate.utils import set_seed

    set_seed(config.seed)
    if prepare is not None:
        prepare()  # after seeding: LoRA initialisation draws random numbers
    trainer = _Trainer(model, tokenizer, config, out_dir, kind, start_fingerprint)
    result = trainer.run()
    trainer.finish(lambda: write(result))
    return out_dir


# ---------------------------------------------------------------------------------------------
# Adapter training and full fine-tuning


def _lora_targets(model: nn.Module, layers: Sequence[nn.Module]) -> list[str]:
    """Full names of the linear modules (nn.Linear, GPT-2's Conv1D) inside ``layers``."""
    from transformers.pytorch_utils import Conv1D

    wanted = {id(layer) for layer in layers}
    targets = []
    for name, module in model.named_modules():  # a shared layer is listed once, under its first position
        if id(module) in wanted:
            targets += [f"{name}.{sub}" for sub, child in module.named_modules() if isinstance(child, (nn.Linear, Conv1D))]
    return targets


def train_adapter(emulator: Emulator, config: TrainConfig, out_dir: str | Path, resume: bool = False) -> Path:
    """Train the emulator's adapter layers on ``config.task``; write the adapter directory.

    Everything but the adapter layers stays frozen (shared positions keep their one module).
    With ``config.lora`` the adapter layers get LoRA weights instead, merged into the layers
    before saving, so the adapter file always holds plain layer weights.
    ``resume=True`` continues ``<out_dir>.partial`` (or starts one when there is none).
    """
    from crashlm.emulators.plugin import save_adapter

    emulator.freeze()
    model = emulator.model
    start = fingerprint(model)
    lora = {}

    def prepare() -> None:
        if config.lora:
            from peft import LoraConfig, LoraModel

            targets = _lora_targets(model, list(emulator.adapter_layers().values()))
            lora_config = LoraConfig(r=config.lora, lora_alpha=2 * config.lora, lora_dropout=0.0, target_modules=targets)
            lora["model"] = LoraModel(model, lora_config, "default")  # injects in place; only LoRA weights train

    def write(result: TrainResult) -> None:
        if "model" in lora:
            lora["model"].merge_and_unload()  # the layers' own modules again, with the LoRA update merged
        save_adapter(emulator.adapter_layers(), out_dir, emulator.base_fingerprint, emulator.plan,
                     training=dict(result.record, lora_alpha=2 * config.lora if config.lora else None),
                     validation_curve=result.curve)

    try:
        return _train(model, emulator.tokenizer, config, out_dir, resume, "adapter", start, write, prepare)
    finally:
        if "model" in lora and any("lora_" in name for name, _ in model.named_parameters()):
            lora["model"].unload()  # a failed run leaves the emulator without LoRA modules
        emulator.freeze()


def train_full(model: nn.Module, tokenizer, config: TrainConfig, out_dir: str | Path, resume: bool = False) -> Path:
    """Fine-tune every parameter of ``model`` (the Full FT baseline); write a HF model directory.

    The directory holds the best weights by validation loss (``save_pretrained``), the tokenizer
    and ``training.json`` (configuration, validation curve, summary). ``model`` ends with the
    best weights too, except under FSDP, where only the directory has them.
    """
    if config.lora:
        raise UsageError("LoRA applies to adapter training; full fine-tuning trains every weight")
    start = fingerprint(model)
    model.requires_grad_(True)

    def write(result: TrainResult) -> None:
        with atomic_dir(Path(out_dir)) as tmp:
            model.save_pretrained(tmp, state_dict=result.weights)
            tokenizer.save_pretrained(tmp)
            write_json(tmp / TRAINING_META, {"format": FULL_FORMAT, "base_fingerprint": start,
                                             "training": result.record, "validation_curve": result.curve})

    return _train(model, tokenizer, config, out_dir, resume, "full", start, write)


# ---------------------------------------------------------------------------------------------
# Distillation (OFT's knowledge distillation of the emulator)


def kd_loss(teacher_state: torch.Tensor, student_state: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """OFT's ``mean(((T - S) / rms(T))^2)`` over the non-pad tokens, rms over all of T's values."""
    keep = mask.bool()
    teacher, student = teacher_state[keep].float(), student_state[keep].float()
    return ((teacher - student) ** 2).mean() / teacher.pow(2).mean()


def _middle_positions(emulator: Emulator) -> tuple[int, int]:
    """(teacher layer index, emulator position) whose INPUT is the middle block's output: the first top adapter layer."""
    trainable = emulator.plan.trainable
    top = trainable[len(trainable) // 2]
    position = next(s.position for s in emulator.slots if s.module == f"adapter.{top}")
    return top, position


def _text_batches(tokenizer, texts: Sequence[str], batch_size: int, max_length: int, steps: int, seed: int):
    """``steps`` padded batches, cycling through ``texts`` in a new seeded order each pass."""
    pad_id = pad_token_id(tokenizer)
    order: list[int] = []
    rng = random.Random(seed)
    for _ in range(steps):
        chunk = []
        while len(chunk) < batch_size:
            if not order:
                order = list(range(len(texts)))
                rng.shuffle(order)
            chunk.append(texts[order.pop()])
        batch = pad_batch([encode_text(tokenizer, t, max_length) or [pad_id] for t in chunk], pad_id)
        yield batch["input_ids"], batch["attention_mask"]


def _distill_losses(teacher, emulator: Emulator, input_ids, mask, bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(LM loss of the emulator on the text, KD loss of its middle block against the teacher's)."""
    layer, position = _middle_positions(emulator)
    device = input_ids.device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        with torch.no_grad(), capture_layer_io(teacher) as states:
            teacher(input_ids=input_ids, attention_mask=mask, use_cache=False, logits_to_keep=1)
        target = states[layer]
        with capture_layer_io(emulator.model) as states:
            logits = emulator.model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
    targets = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE_INDEX)
    return answer_loss(logits[:, :-1], targets), kd_loss(target, states[position], mask)


@torch.no_grad()
def distillation_loss(teacher, emulator: Emulator, texts: Sequence[str], batch_size: int = 8, max_length: int = 256,
                      bf16: bool = True) -> dict[str, float]:
    """Mean LM and KD losses of ``emulator`` on ``texts`` (one pass, in order), e.g. before and after distilling."""
    device = next(emulator.model.parameters()).device
    bf16 = use_bf16(bf16, device)
    steps = math.ceil(len(texts) / batch_size)
    lm = kd = 0.0
    for i in range(steps):
        chunk = texts[i * batch_size : (i + 1) * batch_size]
        input_ids, mask = next(_text_batches(emulator.tokenizer, chunk, len(chunk), max_length, 1, 0))
        a, b = _distill_losses(teacher, emulator, input_ids.to(device), mask.to(device), bf16)
        lm, kd = lm + float(a), kd + float(b)
    return {"lm": lm / steps, "kd": kd / steps}


def distill_emulator(teacher: nn.Module, emulator: Emulator, texts: list[str], steps: int, batch_size: int,
                     lr: float = 1e-4, seed: int = 1, max_length: int = 256, bf16: bool = True) -> Emulator:
    """Distil the full model into the emulator's middle (OFT + KD), in place; returns the emulator.

    Loss = 1.0 * LM + 30 * KD, KD between the full model's and the emulator's hidden state
    entering the first top adapter layer. Only the emulator's non-adapter layers (frozen during
    fine-tuning) train; the adapter layers, embeddings and head do not. AdamW, cosine schedule
    with 6 % warmup, gradient clipping at 1.0; bf16 autocast as in :func:`use_bf16`.
    """
    if not texts:
        raise UsageError("distillation needs at least one text")
    if steps <= 0 or batch_size <= 0 or not lr > 0:
        raise UsageError("distillation steps, batch size and lr must be positive")
    base = fingerprint(teacher)
    if emulator.base_fingerprint and emulator.base_fingerprint != base:
        raise UsageError(f"the teacher is not this emulator's base model (fingerprint {base}, "
                         f"emulator made from {emulator.base_fingerprint})")
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    device = default_device()
    bf16 = use_bf16(bf16, device)
    teacher.to(device).eval()
    student = emulator.model.to(device)
    student.requires_grad_(False)
    middle = [m for key, m in emulator.modules_by_key().items() if not key.startswith("adapter.")]
    for module in middle:
        module.requires_grad_(True)
    params = [p for m in middle for p in m.parameters()]
    if not params:
        raise UsageError("this emulator has no layers outside its adapter: nothing to distil")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scheduler = _schedule(optimizer, "cosine", 0.06, steps)
    student.train()
    bar = tqdm(total=steps, desc="distill", unit="step", file=sys.stderr, dynamic_ncols=True)
    try:
        for step, (input_ids, mask) in enumerate(_text_batches(emulator.tokenizer, texts, batch_size, max_length,
                                                               steps, seed), start=1):
            lm, kd = _distill_losses(teacher, emulator, input_ids.to(device), mask.to(device), bf16)
            loss = LM_WEIGHT * lm + KD_WEIGHT * kd
            if not math.isfinite(loss.item()):
                raise RunFailure(f"distillation stopped: non-finite loss at step {step}")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            bar.update(1)
            bar.set_postfix(lm=f"{lm.item():.4f}", kd=f"{kd.item():.4f}", refresh=False)
    finally:
        bar.close()
        student.eval()
        emulator.freeze()
    return emulator
