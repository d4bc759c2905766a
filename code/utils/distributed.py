"""torchrun support. Plain `python code/train_*.py` runs as a single process (rank 0 of 1) without any of this."""
import os

import torch
import torch.distributed as dist


def init_distributed(device_flag: str):
    """Returns (rank, world_size, local_rank); starts the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_flag != "cpu"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return dist.get_rank(), world, local_rank


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def broadcast_flag(flag: bool) -> bool:
    """True on every rank when any rank says True (e.g. a non-finite loss)."""
    if not is_distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()
