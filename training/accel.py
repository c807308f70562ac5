"""The accelerate set-up of a run: processes, precision, gradient accumulation, determinism.

    state = distributed_state()            # refuses a GPU launch on a machine without GPUs
    accelerator = make_accelerator(train_cfg)
    with deterministic_kernels(accelerator.device):
        ...                                # CPU training is bit-reproducible inside

Determinism. On CPU, a run is bit-reproducible: the same config and seed give the same weights, and
an interrupted and resumed run ends equal to an uninterrupted one. The one CPU kernel that was not
(the backward of indexing an embedding table, ``W_E[tokens]``, accumulates rows in parallel in
whatever order the threads finish: two 2-thread runs of the demo differed from step 10 on) has a
deterministic variant that ``torch.use_deterministic_algorithms`` selects; on CPU it is also faster.
On GPUs the same switch would need ``CUBLAS_WORKSPACE_CONFIG`` and makes some kernels raise, so it
is left off there: GPU runs are not guaranteed bit-reproducible (atomic adds in embedding backward,
cuBLAS and attention kernel choices, bf16 reductions; not measured here) - see the README's "Training".
"""

from __future__ import annotations

import datetime
import os
import warnings
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import GradientAccumulationPlugin

from training.interrupt import TrainingInterrupted
from training.run_config import RunConfigError, TrainConfig


class LaunchError(RunConfigError):
    """The launch cannot work on this machine (e.g. a GPU accelerate config without GPUs)."""


def resolve_mixed_precision(setting: str) -> str:
    """"auto" -> "bf16" on a GPU that supports it, else "no" (CPU autocast buys nothing here)."""
    if setting != "auto":
        return setting
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def grad_accum_steps(cfg: TrainConfig, num_processes: int) -> int:
    return cfg.batch_size // (cfg.micro_batch_size * num_processes)


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def check_launch(command: str = "train") -> None:
    """Refuse a multi-process (or FSDP) GPU launch on a machine without a usable GPU.

    ``accelerate launch --config_file configs/accelerate/multi_gpu_ddp.yaml`` on a CPU machine would
    start 8 processes that each die in NCCL set-up. ``ACCELERATE_USE_CPU=1`` (accelerate's own
    switch) asks for CPU processes with the gloo backend on purpose (the tests do this).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    fsdp = _truthy("ACCELERATE_USE_FSDP")
    if (world <= 1 and not fsdp) or torch.cuda.is_available() or _truthy("ACCELERATE_USE_CPU"):
        return
    what = "an FSDP" if fsdp else f"a {world}-process data-parallel"
    raise LaunchError(
        f"this is {what} accelerate launch for GPUs, but this machine has no GPU (torch.cuda.is_available() "
        f"is False). On a CPU, run one process: `hooked-bilinear {command} <the same arguments>`; to try "
        f"data parallelism on CPU anyway: `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 "
        f"-m hooked_bilinear.cli {command} <the same arguments>`"
    )


def distributed_state() -> Any:
    """accelerate's ``PartialState`` for this launch (raises ``LaunchError`` as ``check_launch``)."""
    from accelerate import PartialState

    check_launch()
    return PartialState(cpu=_truthy("ACCELERATE_USE_CPU"))


def make_accelerator(cfg: TrainConfig, **kwargs: Any) -> Accelerator:
    """An Accelerator with this config's precision and gradient accumulation.

    ``sync_with_dataloader=False``: a step always spans exactly the accumulation count, even across
    an epoch boundary, so step boundaries do not depend on where epochs end.
    """
    plugin = GradientAccumulationPlugin(
        num_steps=grad_accum_steps(cfg, distributed_state().num_processes), sync_with_dataloader=False
    )
    return Accelerator(
        mixed_precision=resolve_mixed_precision(cfg.mixed_precision),
        gradient_accumulation_plugin=plugin,
        step_scheduler_with_optimizer=False,
        **kwargs,
    )


# How long the main process waits for the others to end their process group before ending its own.
END_TIMEOUT = datetime.timedelta(minutes=5)


def end_process_group(accelerator: Accelerator, timeout: datetime.timedelta = END_TIMEOUT) -> None:
    """Destroy the process group on every process, the main process last; call it on all of them.

    The main process hosts the launch's key-value store (the TCPStore of the env:// rendezvous). If
    it ends first, another process still ending its group can wait on it forever: CI saw a 2-process
    run hang there after its work was done. So the others end their group and say so in the store,
    and the main process waits for all of them (at most ``timeout``, then ends anyway, with a warning)
    before ending its own.
    """
    if accelerator.num_processes == 1 or not torch.distributed.is_initialized():
        accelerator.end_training()
        return
    # The store is not reachable through a public API; this accessor has been stable since torch 1.x.
    from torch.distributed.distributed_c10d import _get_default_store

    store = _get_default_store()
    accelerator.wait_for_everyone()
    rank, world = accelerator.process_index, accelerator.num_processes
    if rank != 0:
        accelerator.end_training()
        store.set(f"hooked_bilinear/group_ended/{rank}", "1")
        return
    try:
        store.wait([f"hooked_bilinear/group_ended/{r}" for r in range(1, world)], timeout)
    except RuntimeError as err:  # DistStoreError on timeout
        warnings.warn(f"not every process ended its process group within {timeout}: {err}", stacklevel=2)
    accelerator.end_training()


@contextmanager
def process_group_ended(accelerator: Accelerator) -> Iterator[None]:
    """Destroy the process group (``end_process_group``) when a run ends in step on every process
    (finished, or stopped by an agreed signal); a no-op in a one-process run.

    A gloo process group left for the interpreter's shutdown can abort the process (SIGABRT,
    "terminate called without an active exception") after the run's work is done: CI saw it once on a
    2-process finetune. After any other error the group is left alone, because a process still waiting
    in a collective would make destroying it hang.
    """
    try:
        yield
    except TrainingInterrupted:
        end_process_group(accelerator)
        raise
    end_process_group(accelerator)


@contextmanager
def deterministic_kernels(device: torch.device) -> Iterator[None]:
    """Deterministic torch kernels while training on CPU; the previous setting is restored after."""
    if device.type != "cpu":
        yield
        return
    before, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)
