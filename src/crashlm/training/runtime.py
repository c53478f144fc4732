"""Where and in which precision training computes: the accelerate runtime of every training run.

All training runs on ``accelerate.Accelerator``, so ``accelerate launch`` runs task training on
several processes or GPUs: DDP (CPU over gloo included), DeepSpeed ZeRO-1/2, and FSDP for full
fine-tuning (``configs/``). bf16 autocast is used where the device computes bf16 natively
(:func:`use_bf16`); the trainable weights and the optimizer state stay fp32, and the frozen
weights are held in bf16 for the run (:func:`crashlm.core.models.held_in_bf16`), and on a CPU short
sequences' attention runs as explicit products (:func:`crashlm.core.attention.training_attention`).
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState

from crashlm.core.errors import UsageError
from crashlm.core.models import default_device, native_bf16


def use_bf16(requested: bool, device: torch.device) -> bool:
    """bf16 autocast when asked for AND the device computes bf16 natively.

    CPUs without AVX512-BF16 or AMX (AVX2-only hosts) emulate bf16 matmuls, measured 5-80x
    slower than fp32 on such a host (EPYC, torch 2.13): there training runs in fp32 instead.
    """
    return requested and native_bf16(device)


def accelerator(bf16: bool, grad_accum: int = 1, device_placement: bool = True) -> Accelerator:
    """This process's Accelerator: bf16 autocast per :func:`use_bf16`, ``grad_accum`` micro-batches per step.

    ``device_placement=False`` leaves the model where it is (a tuned lens trains beside its model).
    """
    precision = "bf16" if use_bf16(bf16, default_device()) else "no"
    # cpu=True without CUDA also makes torchrun-style launches (LOCAL_RANK set, e.g. `accelerate launch
    # --multi_gpu`) use gloo on CPU; accelerate's own MULTI_CPU launcher needs MPI.
    cpu = not torch.cuda.is_available()
    if AcceleratorState._shared_state and PartialState().num_processes == 1:
        # accelerate fixes one precision and device per process, but one process may train several
        # models (the offsite pipeline, tests): a single process can safely start over.
        state = AcceleratorState()
        if state.mixed_precision != precision or (cpu and state.device.type != "cpu"):
            AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(mixed_precision=precision, gradient_accumulation_steps=grad_accum, cpu=cpu,
                       device_placement=device_placement)


def sharding(acc: Accelerator, batch_size: int, kind: str) -> str | None:
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
    plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = batch_size
    return "deepspeed"
