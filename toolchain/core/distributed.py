"""Several training processes (torchrun, the elastic launcher, accelerate launch): joining the group, the rank,
the barrier. torch is imported only when asked."""

from __future__ import annotations

import logging
import os

log = logging.getLogger("toolchain")


def init_distributed() -> bool:
    """Join the process group when started by torchrun / accelerate launch (WORLD_SIZE > 1): gloo on the CPU,
    NCCL on GPUs. Returns whether this is a distributed run."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    if dist.get_rank() != 0:
        log.setLevel(logging.WARNING)
    return True


def is_distributed() -> bool:
    """Is this process one of several joined in a process group?"""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    if not is_distributed():
        return 0
    import torch.distributed as dist

    return dist.get_rank()


def barrier() -> None:
    if is_distributed():
        import torch.distributed as dist

        dist.barrier()
