"""Seeding. Every random draw of a run is a function of (seed, iteration, rank), never of process history,
so that a run resumed at any iteration continues exactly as an uninterrupted one would."""
import os
import random

import numpy as np
import torch


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs this for deterministic matmuls; harmless on CPU.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def iteration_seed(seed: int, iteration: int, rank: int = 0) -> int:
    """A 63-bit seed for the torch RNG at one iteration of one process (dropout masks, CutMix boxes)."""
    state = np.random.SeedSequence([seed, iteration, rank, 0x5EED]).generate_state(1, dtype=np.uint64)
    return int(state[0]) & (2**63 - 1)
