"""torchrun support. A plain ``python code/train_*.py`` is rank 0 of 1 and none of this starts.

    torchrun --nproc_per_node=N code/train_la.py ...      # N processes, DistributedDataParallel

NCCL when the processes use CUDA, Gloo otherwise. Every flag is per process: each rank draws its own
``--batch_size`` samples, so the effective batch is N x --batch_size. Rank 0 alone writes the run folder.
"""
import os

import torch
import torch.distributed as dist


def init_distributed(use_cuda: bool) -> tuple:
    """``(rank, world_size, local_rank)``; starts the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return dist.get_rank(), world, local_rank


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def any_rank(flag: bool) -> bool:
    """Collective under torchrun: True on every rank when any rank says True (e.g. a non-finite loss)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([float(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
