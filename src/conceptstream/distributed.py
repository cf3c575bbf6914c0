"""Training through `accelerate`: mixed precision, gradient scaling and data parallelism.

One process is the common case (CPU or one GPU). Under ``accelerate launch`` (or ``torchrun``) every
process trains on its own random batches, gradients are averaged across processes after each
backward pass, and only the main process touches the saved state (lock, checkpoints, commit).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch

from conceptstream.errors import UserInputError
from conceptstream.precision import PRECISIONS

RANK_SEED_STRIDE = 1_000_003  # process r of a launch seeds its batches with seed + r * stride; r = 0 is the 1-process run


def launched() -> bool:
    """True inside a multi-process launch (``accelerate launch``/``torchrun`` with more than one process)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def process_state():
    """accelerate's ``PartialState`` (initialises the process group on first use)."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def process_index() -> int:
    return process_state().process_index if launched() else 0


def is_main_process() -> bool:
    return process_index() == 0


def default_device() -> str:
    """This process's device: its own GPU under a launch, else the GPU if there is one, else the CPU."""
    if launched():
        return str(process_state().device)
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str) -> str:
    """``device`` unchanged when torch can use it; else a one-line error naming the fix."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise UserInputError(f"--device {device!r} is not a torch device ({e}); use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserInputError(f"--device {device}: torch {torch.__version__} here has no usable CUDA GPU (no GPU, "
                                 "no driver, or a CPU-only build); leave --device out or use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserInputError(f"--device {device}: there are only {torch.cuda.device_count()} CUDA devices "
                                 f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserInputError(f"--device {device}: the MPS backend is not available here; use --device cpu")
    return device


def make_accelerator(mixed_precision: str, device: torch.device):
    """An ``Accelerator`` for one task; the engine keeps placing tensors itself (``device_placement=False``)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if mixed_precision not in PRECISIONS:
        raise UserInputError(f"--mixed-precision must be no, bf16 or fp16, got {mixed_precision!r}")
    if mixed_precision == "fp16" and device.type == "cpu":
        raise UserInputError("--mixed-precision fp16 needs a GPU (there is no fp16 autocast on the CPU); "
                             "use bf16 or no")
    kwargs = {"mixed_precision": mixed_precision, "cpu": device.type == "cpu", "device_placement": False}
    try:
        return Accelerator(**kwargs)
    except ValueError:
        if launched():
            raise
        # accelerate keeps one precision per process; a single-process caller may change it between tasks.
        AcceleratorState._reset_state()
        return Accelerator(**kwargs)


def average_gradients(accelerator, params: Iterable[torch.nn.Parameter]) -> None:
    """Mean of every gradient across processes, in one collective call (a no-op in one process)."""
    if accelerator.num_processes == 1:
        return
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in with_grad])
    flat = accelerator.reduce(flat, reduction="mean")
    offset = 0
    for p in with_grad:
        n = p.grad.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n
