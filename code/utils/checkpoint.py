"""Checkpoints: one dict (model, optimizer, scheduler-free poly state is the iteration, scaler, args).

Writes go to a temporary file in the same folder and are renamed into place, so a kill at any moment leaves
either the old file or the new one, never a truncated one. Loads use ``weights_only=True``: a checkpoint
cannot run code."""
import os
import tempfile
from pathlib import Path

import torch


class CheckpointError(RuntimeError):
    pass


def save_checkpoint(state: dict, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_checkpoint(path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, anything that is not our checkpoint
        raise CheckpointError(f"checkpoint {path}: cannot be read as a weights-only torch checkpoint "
                              f"(truncated or not a checkpoint of this repository?): {type(e).__name__}: {e}") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"checkpoint {path}: expected a dict with a 'model' entry, got "
                              f"{type(state).__name__} with keys {sorted(state)[:8] if isinstance(state, dict) else '-'}")
    return state
