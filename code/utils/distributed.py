"""torchrun support. A plain ``python code/train_*.py`` is rank 0 of 1 and none of this starts.

    torchrun --nproc_per_node=N code/train_la.py ...      # N processes, DistributedDataParallel

NCCL when the processes use CUDA, Gloo otherwise. Every flag is per process: each rank draws its own
``--batch_size`` samples, so the effective batch is N x --batch_size. Rank 0 alone writes the run folder.
A collective that waits longer than --ddp_timeout for another process fails (utils.run_folder.stop_training says
so in one line); a rank whose launcher is gone is killed by the kernel (Linux).
"""
import ctypes
import os
import signal
import sys
from datetime import timedelta

import torch
import torch.distributed as dist


def init_distributed(use_cuda: bool, timeout_s: int) -> tuple:
    """``(rank, world_size, local_rank)``; starts the process group when launched by torchrun, with collectives
    that fail after ``timeout_s`` seconds of waiting, and ends this process with its launcher."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    exit_with_launcher()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), world, local_rank


def exit_with_launcher() -> None:
    """Linux: ask the kernel to SIGKILL this process when its parent (torchrun) is gone, so that a killed launcher
    leaves no rank training and writing on (prctl PR_SET_PDEATHSIG). Elsewhere nothing is done."""
    if not sys.platform.startswith("linux"):
        return
    launcher = os.getppid()
    ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != launcher:  # the launcher was gone before the prctl took effect
        os._exit(1)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def max_over_ranks(value: int) -> int:
    """Collective under torchrun: the largest ``value`` of all ranks, on every rank (e.g. a stop signal's number)."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.int64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def any_rank(flag: bool) -> bool:
    """Collective under torchrun: True on every rank when any rank says True (e.g. a non-finite loss)."""
    return max_over_ranks(int(flag)) > 0


def barrier() -> None:
    """Under torchrun: wait until every rank is here."""
    if dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
