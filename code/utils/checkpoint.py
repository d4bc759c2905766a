"""Checkpoints: one dict per file.

A training checkpoint (``utils.run.save_run_checkpoint``) holds ``model`` (state dict, parameters and
batch-norm buffers), ``optimizer`` (state dict: moments / momentum buffers, step counts, param groups),
``scaler`` (GradScaler state; empty unless --amp fp16), ``iteration`` (number of completed iterations; the
poly learning rate is a function of it, so there is no scheduler state), ``args`` (every flag of the run),
``task``, ``world_size`` and ``num_threads`` (intra-op CPU threads: float sums are ordered by them). No RNG
state is stored: every random draw of iteration ``it`` is re-seeded from ``(seed, it, rank)`` (DESIGN.md,
docs/RELIABILITY.md).

Writes go to a temporary file in the same folder and are renamed into place (``os.replace`` is atomic on
POSIX), so a kill at any moment leaves either the old file or the new one, never a truncated one; a
temporary file orphaned by SIGKILL is removed by ``remove_stale_temp_files``. Loads use
``weights_only=True``: a checkpoint cannot run code. Every problem with a file raises ``CheckpointError``
with one line naming the file.
"""
import os
import pickle
import re
import tempfile
import warnings
from pathlib import Path

import torch

_ZIP_MAGIC = b"PK\x03\x04"


class CheckpointError(RuntimeError):
    pass


def save_checkpoint(state: dict, path) -> Path:
    """Write ``state`` to ``path`` atomically: temporary file, flush, fsync, rename, fsync of the folder."""
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
    try:  # make the rename itself durable (POSIX); harmless where folders cannot be opened
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


def remove_stale_temp_files(folder) -> list:
    """Delete ``*.pth.<random>.tmp`` files left in ``folder`` by a process killed while writing a checkpoint.
    Call only when no other process writes checkpoints there. Returns the removed paths."""
    folder = Path(folder)
    removed = []
    if folder.is_dir():
        for p in folder.iterdir():
            if p.is_file() and p.name.endswith(".tmp") and ".pth." in p.name:
                p.unlink()
                removed.append(p)
    return removed


def _why_unreadable(path: Path, exc: Exception) -> str:
    """One line saying what is wrong with a file that ``torch.load(weights_only=True)`` refused."""
    size = path.stat().st_size
    if size == 0:
        return "the file is empty (0 bytes)"
    with open(path, "rb") as f:
        head = f.read(4)
    text = str(exc)
    found = re.search(r"Unsupported global: GLOBAL [\w.]+", text)
    if found:
        return f"it holds Python objects that a weights-only load refuses: {found.group(0)}"
    if head == _ZIP_MAGIC:
        if isinstance(exc, pickle.UnpicklingError):
            first = next((line for line in text.splitlines() if line.strip()), "")
            return f"a torch zip archive whose contents a weights-only load refuses: {first.split('. ')[0][:160]}"
        return f"a torch zip archive that is truncated or corrupt ({size} bytes)"
    return f"neither a torch zip archive nor a weights-only pickle ({size} bytes)"


def load_checkpoint(path, map_location="cpu", require=("model",)) -> dict:
    """Load a checkpoint with ``weights_only=True``; it must be a dict holding every key of ``require``.
    Raises ``CheckpointError`` (one line naming the file and what was expected) otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. pickle-protocol warnings of foreign files
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, random bytes, ...
        raise CheckpointError(f"checkpoint {path}: cannot be read ({_why_unreadable(path, e)}); expected a "
                              f"checkpoint written by this repository's training scripts") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path}: holds a {type(state).__name__}, expected a dict with "
                              f"the keys {list(require)}")
    missing = [k for k in require if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path}: no {', '.join(repr(k) for k in missing)} entry (keys: "
                              f"{sorted(map(str, state))[:8]}); expected a checkpoint written by this "
                              f"repository's training scripts")
    if "model" in require and not (isinstance(state["model"], dict)
                                   and all(torch.is_tensor(v) for v in state["model"].values())):
        raise CheckpointError(f"checkpoint {path}: its 'model' entry is not a state dict of tensors")
    return state
