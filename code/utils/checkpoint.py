"""Checkpoints: one dict per file, written atomically, loaded weights-only.

A training checkpoint holds ``model`` (state dict), ``optimizer`` (state dict), ``iteration`` (completed
iterations; the learning rate is a function of it), ``args`` (every flag), ``world_size`` and ``num_threads``.
No RNG state is stored: every random draw of iteration ``it`` is seeded from ``(seed, it, rank)``.
A write goes to a temporary file in the same folder, then ``os.replace`` (atomic on POSIX): a kill leaves the
old file or the new one, never a truncated one. Every problem raises ``CheckpointError`` naming the file.
"""
import os
import re
import tempfile
import warnings
from pathlib import Path

import torch

from utils.flags import RESUME_MAY_DIFFER


class CheckpointError(RuntimeError):
    pass


def save_checkpoint(state: dict, path) -> Path:
    """Write ``state`` to ``path`` atomically (temporary file, fsync, rename)."""
    path = Path(path)
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


def remove_temp_files(folder) -> list:
    """Delete ``*.pth.<random>.tmp`` files a killed process left in ``folder``; returns their names."""
    stale = [p for p in Path(folder).glob("*.pth.*.tmp") if p.is_file()]
    for p in stale:
        p.unlink()
    return [p.name for p in stale]


def load_checkpoint(path, map_location="cpu", require=("model",)) -> dict:
    """A checkpoint dict holding every key of ``require``, loaded with ``weights_only=True`` (it cannot run code)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path}: cannot be read ({_why_unreadable(path, e)}); expected a "
                              f"checkpoint written by this repository's training scripts") from None
    if not isinstance(state, dict) or any(k not in state for k in require):
        keys = sorted(map(str, state))[:8] if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"checkpoint {path}: holds {keys}, expected a dict with the keys {list(require)}")
    if "model" in require and not (isinstance(state["model"], dict) and all(map(torch.is_tensor, state["model"].values()))):
        raise CheckpointError(f"checkpoint {path}: its 'model' entry is not a state dict of tensors")
    return state


def _why_unreadable(path: Path, error: Exception) -> str:
    """What is wrong with a file torch.load refused, in a few words."""
    if path.stat().st_size == 0:
        return "empty file"
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    found = re.search(r"Unsupported global: GLOBAL [\w.]+", text)
    if found:
        return f"it holds Python objects a weights-only load refuses: {found.group(0)}"
    with open(path, "rb") as f:
        zip_archive = f.read(4) == b"PK\x03\x04"
    return (f"a torch zip archive that is truncated or corrupt, {path.stat().st_size} bytes" if zip_archive else
            f"neither a torch zip archive nor a weights-only pickle, {path.stat().st_size} bytes")


def load_weights(model: torch.nn.Module, state_dict: dict, path) -> None:
    """``model.load_state_dict`` whose error names a few of the missing and unexpected keys."""
    own, given = set(model.state_dict()), set(state_dict)
    missing, unexpected = sorted(own - given), sorted(given - own)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path}: its weights do not fit the {type(model).__name__}: "
                              f"{len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected keys "
                              f"{unexpected[:3]}")
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path}: its weights do not fit the {type(model).__name__}: "
                              f"{str(e).strip().splitlines()[-1].strip()}") from None


def save_training_state(path, model, optimizer, iteration: int, args, world_size: int = 1) -> None:
    """Write a training checkpoint. Weights that are no longer finite are never written: training stops and
    the last checkpoint stays as it was."""
    state = model.state_dict()
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise SystemExit(f"error: non-finite weights after iteration {iteration} ({len(bad)} tensors, e.g. {bad[0]}); "
                         f"not writing {path}, the last checkpoint is kept. Lower --base_lr?")
    save_checkpoint({"model": state, "optimizer": optimizer.state_dict(), "iteration": iteration, "args": vars(args),
                     "world_size": world_size, "num_threads": torch.get_num_threads()}, path)


def load_resume(path, args, world_size: int) -> tuple:
    """``(checkpoint, warnings)`` of --resume. Refuses (SystemExit) a checkpoint that cannot be read, another
    number of processes, and flags that differ from the saved run unless they are in ``RESUME_MAY_DIFFER``."""
    try:
        ckpt = load_checkpoint(path, require=("model", "optimizer", "iteration", "args"))
    except CheckpointError as e:
        raise SystemExit(f"error: --resume: {e}") from None
    if ckpt.get("world_size", 1) != world_size:
        raise SystemExit(f"error: --resume: {path} was trained by {ckpt['world_size']} process(es), this command "
                         f"runs {world_size}; the batches would change. Resume with {ckpt['world_size']}")
    saved, now = ckpt["args"], vars(args)
    changed = [k for k in sorted(now) if saved.get(k, "absent") != now[k] and not k.startswith("print_")]
    differ = [f"--{k} {now[k]} (saved {saved.get(k, 'absent')})" for k in changed if k not in RESUME_MAY_DIFFER]
    if differ:
        raise SystemExit(f"error: --resume: flags that change the method differ from the run in {path}: "
                         f"{', '.join(differ)}; repeat the original flags, or start a new run (another --exp)")
    warnings = [f"--resume: --{k} {now[k]} (saved {saved.get(k, 'absent')})" for k in changed
                if k not in ("resume", "overwrite")]
    if ckpt.get("num_threads") not in (None, torch.get_num_threads()):
        warnings.append(f"--resume: {torch.get_num_threads()} CPU threads, the saved run used {ckpt['num_threads']}: "
                        f"on a CPU the continuation is not bit-identical (OMP_NUM_THREADS={ckpt['num_threads']} is)")
    return ckpt, warnings


def finish_done_run(ckpt, args, run_dir, rank: int, log) -> bool:
    """True when the resumed run already did all its iterations (say so; write the final checkpoint from
    latest.pth if a kill came between the two writes): nothing is left to train."""
    if ckpt is None or ckpt["iteration"] < args.max_iterations:
        return False
    final = run_dir / f"iter_{args.max_iterations}.pth"
    if rank == 0:
        remove_temp_files(run_dir)
        if not final.is_file():
            save_checkpoint(ckpt, final)
    log.info(f"run folder {run_dir} already finished ({ckpt['iteration']} of {args.max_iterations} iterations); "
             f"final checkpoint {final}")
    return True
