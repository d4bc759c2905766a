"""Small pieces both training scripts use around the loop: device and seeds, precision, optimizer, schedule.

Seeding: every random draw of a run is a function of (seed, iteration, rank), never of process history, so a
run resumed at any iteration continues exactly as an uninterrupted one would.
"""
import contextlib
import math
import os
import random

import numpy as np
import torch

from networks import build_model
from utils.checkpoint import CheckpointError, load_weights
from utils.distributed import init_distributed, rank


def pick_device(name: str) -> torch.device:
    """``auto`` (CUDA when there is one), ``cpu``, ``cuda`` or ``cuda:N``; anything else is a one-line error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise SystemExit(f"error: --device {name}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {name}: CUDA is not available on this machine (use --device cpu or auto)")
    return device


def setup(args) -> tuple:
    """Device, process group (torchrun) and seeds. Returns ``(device, rank, world_size, local_rank)``."""
    device = pick_device(args.device)
    rank_, world, local_rank = init_distributed(device.type == "cuda", args.ddp_timeout)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank)
    if args.sync_bn and world > 1 and device.type != "cuda":
        raise SystemExit("error: --sync_bn: SyncBatchNorm needs CUDA devices, these processes run on the CPU")
    seed = args.seed + rank_
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = args.deterministic
    torch.backends.cudnn.benchmark = not args.deterministic
    return device, rank_, world, local_rank


def iteration_seed(seed: int, it: int) -> int:
    """The torch seed of iteration ``it`` on this process (dropout masks, CutMix boxes)."""
    state = np.random.SeedSequence([seed, it, rank(), 0x5EED]).generate_state(1, dtype=np.uint64)
    return int(state[0]) & (2**63 - 1)


def autocast(device: torch.device, amp: str):
    """bf16 autocast for ``--amp bf16``, else nothing."""
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def memory_format(device: torch.device, n_spatial: int, layout: str = "auto"):
    """The layout of the network's weights and inputs (``--memory_format``): ``auto`` is channels-last on a GPU
    (faster convolutions) and the default layout elsewhere; ``channels_last`` forces it (the CPU tests of the GPU
    path), ``contiguous`` never uses it."""
    if layout == "contiguous" or (layout == "auto" and device.type != "cuda"):
        return torch.contiguous_format
    return torch.channels_last_3d if n_spatial == 3 else torch.channels_last


def make_optimizer(model, args):
    if args.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=args.base_lr, weight_decay=args.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=args.base_lr, momentum=args.momentum,
                           weight_decay=args.weight_decay, nesterov=args.nesterov)


def poly_lr(args, it: int) -> float:
    """The learning rate of iteration ``it``: ``base_lr * (1 - it / horizon) ** poly_power``, the horizon
    ``--poly_horizon`` (the release's LA: 17000) or ``--max_iterations``."""
    return args.base_lr * (1.0 - it / (args.poly_horizon or args.max_iterations)) ** args.poly_power


def sigmoid_rampup(it: float, length: int) -> float:
    """``exp(-5 (1 - it / length)^2)`` with ``it`` clipped to [0, length]; 1 when ``length`` is 0."""
    if length == 0:
        return 1.0
    phase = 1.0 - min(max(it, 0), length) / length
    return math.exp(-5.0 * phase * phase)


def conf_threshold(args, it: int) -> float:
    """tau at iteration ``it``: ``--conf_thresh``, or with ``--conf_ramp N`` the release's LA schedule
    ``(T + (1 - T) sigmoid_rampup(it, N)) ln 2`` (T = 0.75: 0.521 at the start, 0.668 at 14000 of 17000)."""
    if not args.conf_ramp:
        return args.conf_thresh
    return (args.conf_thresh + (1 - args.conf_thresh) * sigmoid_rampup(it, args.conf_ramp)) * math.log(2)


def build_for_training(task: str, args, device, world: int, ckpt=None, path=None, model=None) -> tuple:
    """``(model, optimizer)`` on the device, restored from a --resume checkpoint (one-line error if it does not fit).
    ``model``: a network built by the caller (CML's two subnets) instead of the task's ``build_model``."""
    if model is None:
        model = build_model(task, args.drop_weak, args.drop_strong, args.dropout_type, args.pert_out_dropout,
                            n_classes=getattr(args, "n_classes", None))
    if world > 1 and args.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device, memory_format=memory_format(device, 3 if task == "la" else 2, args.memory_format))
    optimizer = make_optimizer(model, args)
    if ckpt is not None:
        try:
            load_weights(model, ckpt["model"], path)
            optimizer.load_state_dict(ckpt["optimizer"])
        except CheckpointError as e:
            raise SystemExit(f"error: --resume: {e}") from None
        except (ValueError, KeyError) as e:
            raise SystemExit(f"error: --resume: {path}: {e}") from None
    return model, optimizer


def wrap_model(model, args, device, world: int, local_rank: int):
    """The model to call in training: DistributedDataParallel under torchrun, then torch.compile if asked."""
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None)
    return torch.compile(model) if args.compile else model
