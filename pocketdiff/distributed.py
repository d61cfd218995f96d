"""Several training processes through torch.distributed, launched by 🤗 accelerate or torchrun.

`accelerate launch --num_processes N -m pocketdiff run RECIPE` (or `torchrun --nproc-per-node N`)
sets WORLD_SIZE / RANK / LOCAL_RANK; `setup` joins the process group (NCCL on GPUs, gloo on CPU)
and every other function here is a no-op in a single process, so the same code runs on a CPU, one
GPU or N GPUs. Trainers draw each step's global batch identically on every process and keep
their shard (`shard`), DDP averages the gradients, so N processes train the same weights as one.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .errors import ConfigError


def world_size() -> int:
    """Processes in this run (1 unless launched by accelerate / torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def enabled() -> bool:
    """True when this process is one of several."""
    return world_size() > 1


def rank() -> int:
    """This process's index (0 in a single process)."""
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """True for the process that writes checkpoints, logs and outputs."""
    return rank() == 0


def setup(device: str) -> str:
    """Join the process group when launched as one of several; returns this process's device
    (cuda:LOCAL_RANK on GPUs)."""
    if not enabled():
        return device
    import torch.distributed as dist

    kind = torch.device(device).type
    if kind == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if kind == "cuda" else "gloo")
    return device


def wrap(module: nn.Module) -> nn.Module:
    """`module` in DistributedDataParallel when there are several processes, else itself."""
    if not enabled():
        return module
    from torch.nn.parallel import DistributedDataParallel

    device = next(module.parameters()).device
    return DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)


def shard(batch: torch.Tensor) -> torch.Tensor:
    """This process's equal slice of a global batch; ConfigError if it does not divide."""
    n = world_size()
    if n == 1:
        return batch
    if batch.shape[0] % n:
        raise ConfigError(f"batch of {batch.shape[0]} does not split over {n} processes; use a multiple of {n}")
    return batch.chunk(n)[rank()]


def barrier() -> None:
    """Wait for every process (a no-op in a single process)."""
    if enabled():
        import torch.distributed as dist

        dist.barrier()


def any_true(flag: bool) -> bool:
    """True on every process when `flag` is True on any (a stop decision all processes share)."""
    if not enabled():
        return flag
    import torch.distributed as dist

    backend = dist.get_backend()
    t = torch.tensor([1.0 if flag else 0.0], device="cuda" if backend == "nccl" else "cpu")
    dist.all_reduce(t)
    return bool(t.item() > 0)
