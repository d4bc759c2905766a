"""torchrun support. Plain `python code/train_*.py` runs as a single process (rank 0 of 1) without any of this.

    torchrun --nproc_per_node=N code/train_la.py ...      # N processes, DistributedDataParallel

NCCL when the processes use CUDA, Gloo otherwise (``--device cpu``). Every flag is per process: each rank
draws its own ``--batch_size`` samples (the sampler's rank/world_size), so the effective batch is
N x --batch_size. Rank 0 alone writes the run folder (log, tensorboard, checkpoints).
"""
import os
from pathlib import Path

import torch
import torch.distributed as dist

# Debug/test hook: when set to a folder, every rank writes its final model and optimizer state there as
# rank<r>.pth at the end of training (tests/test_ddp.py compares them). Unset in normal use.
DUMP_ENV = "CROSSMATCH_DUMP_RANK_STATE"


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


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def _flag_device():
    return "cuda" if dist.get_backend() == "nccl" else "cpu"


def broadcast_flag(flag: bool) -> bool:
    """True on every rank when any rank says True (e.g. a non-finite loss)."""
    if not is_distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=_flag_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _state_tensors(model, optimizer):
    """Parameters and floating optimizer-state tensors, in a fixed order (identical on every rank)."""
    out = [p.detach() for p in model.parameters()]
    for group in optimizer.state_dict()["state"].values():
        for key in sorted(group):
            v = group[key]
            if torch.is_tensor(v):
                out.append(v.detach())
    return out


def ranks_in_sync(model, optimizer) -> bool:
    """Collective: True on every rank when all ranks hold bit-identical parameters and optimizer state
    (compared against rank 0's copy, exactly). Batch-norm running statistics are not compared: without
    --sync_bn each rank updates them from its own batch (rank 0's are the ones saved)."""
    if not is_distributed():
        return True
    same = True
    device = _flag_device()
    for t in _state_tensors(model, optimizer):
        ref = t.to(device, copy=True).contiguous()
        dist.broadcast(ref, src=0)
        same &= bool(torch.equal(ref, t.to(device)))
    return not broadcast_flag(not same)


def dump_rank_state(model, optimizer, rank: int) -> None:
    """Test hook (``CROSSMATCH_DUMP_RANK_STATE``): write this rank's model and optimizer state."""
    folder = os.environ.get(DUMP_ENV)
    if not folder:
        return
    from .checkpoint import save_checkpoint
    save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rank": rank},
                    Path(folder) / f"rank{rank}.pth")


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()
