"""Checkpoints: one dict per file, written atomically, loaded weights-only.

A training checkpoint holds ``model`` (state dict), ``optimizer`` (state dict), ``iteration`` (completed
iterations; the learning rate is a function of it), ``args`` (every flag), ``world_size`` and ``num_threads``.
No RNG state is stored: every random draw of iteration ``it`` is seeded from ``(seed, it, rank)``.
A write goes to a temporary file in the same folder, then ``os.replace`` (atomic on POSIX): a kill leaves the
old file or the new one, never a truncated one. Its mode is what the umask leaves of 0666, as for any file the run
writes (with umask 027 the group can read the run folders on a shared file system). A load checks the CRC-32 the
zip archive stores for each of its entries, so a file damaged on disk (one flipped bit) is refused. Every problem
raises ``CheckpointError`` naming the file.
"""
import errno
import io
import os
import re
import secrets
import warnings
import zipfile
from itertools import zip_longest
from pathlib import Path

import torch

from utils.datasets import saved_args
from utils.flags import RESUME_MAY_DIFFER


class CheckpointError(RuntimeError):
    pass


def save_checkpoint(state: dict, path) -> Path:
    """Write ``state`` to ``path`` atomically (serialised in memory, then a temporary file, fsync, rename). A write
    that fails (disk full, read-only) stops the script (SystemExit) with one line; ``path`` stays as it was."""
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(state, buffer)  # in memory first: a full disk then raises OSError(ENOSPC), not a torch zip error
    tmp = None
    try:
        tmp = path.with_name(f"{path.name}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the mode the umask leaves, as open() gives
        with os.fdopen(fd, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)
        if not isinstance(e, OSError):
            raise
        why = f"no space left on {mount_point(path.parent)}" if e.errno in (errno.ENOSPC, errno.EDQUOT) else e.strerror
        kept = "the previous checkpoint is intact" if path.exists() else "no checkpoint was written"
        raise SystemExit(f"error: {why} while writing {path}; {kept}") from None
    return path


def mount_point(folder: Path) -> Path:
    """The mount point of the file system holding ``folder``."""
    folder = Path(os.path.realpath(folder))
    while not os.path.ismount(folder):
        folder = folder.parent
    return folder


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
    damaged = _damaged_entry(path)
    if damaged:
        raise CheckpointError(f"checkpoint {path}: damaged since it was written (the CRC-32 of its entry {damaged} "
                              f"does not match: a changed bit on disk or in transfer); restore a copy of the file")
    if not isinstance(state, dict) or any(k not in state for k in require):
        keys = sorted(map(str, state))[:8] if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"checkpoint {path}: holds {keys}, expected a dict with the keys {list(require)}")
    if "model" in require and not (isinstance(state["model"], dict) and all(map(torch.is_tensor, state["model"].values()))):
        raise CheckpointError(f"checkpoint {path}: its 'model' entry is not a state dict of tensors")
    return state


def _damaged_entry(path: Path):
    """The first entry of a torch zip archive whose bytes do not match their stored CRC-32 (torch.load does not
    check them), or None. A legacy (non-zip) checkpoint has no checksum: None."""
    if not zipfile.is_zipfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip()
    except zipfile.BadZipFile:
        return "(its table of contents)"


def _why_unreadable(path: Path, error: Exception) -> str:
    """What is wrong with a file torch.load refused, in a few words."""
    if path.stat().st_size == 0:
        return "empty file"
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    found = re.search(r"unsupported (?:global: )?GLOBAL ([\w.]+)", text, re.IGNORECASE)  # torch's two wordings
    if found:
        return f"it holds Python objects a weights-only load refuses, such as {found.group(1)}"
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


def save_training_state(path, model, optimizer, iteration: int, args, world_size: int, data: dict) -> None:
    """Write a training checkpoint (``data``: the fingerprint of the training lists, utils.data.data_fingerprint).
    Weights that are no longer finite are never written: training stops and the last checkpoint stays as it was."""
    state = model.state_dict()
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise SystemExit(f"error: non-finite weights after iteration {iteration} ({len(bad)} tensors, e.g. {bad[0]}); "
                         f"not writing {path}, the last checkpoint is kept. Lower --base_lr?")
    save_checkpoint({"model": state, "optimizer": optimizer.state_dict(), "iteration": iteration, "args": vars(args),
                     "world_size": world_size, "num_threads": torch.get_num_threads(), "data": data}, path)


def load_resume(path, args, world_size: int, data: dict) -> tuple:
    """``(checkpoint, warnings)`` of --resume. Refuses (SystemExit) a checkpoint that cannot be read, another
    number of processes, flags that differ from the saved run unless they are in ``RESUME_MAY_DIFFER``, and other
    labeled or unlabeled cases than the saved run's (``data``: utils.data.data_fingerprint of this command)."""
    try:
        ckpt = load_checkpoint(path, require=("model", "optimizer", "iteration", "args"))
    except CheckpointError as e:
        raise SystemExit(f"error: --resume: {e}") from None
    if ckpt.get("world_size", 1) != world_size:
        raise SystemExit(f"error: --resume: {path} was trained by {ckpt['world_size']} process(es), this command "
                         f"runs {world_size}; the batches would change. Resume with {ckpt['world_size']}")
    saved, now = saved_args(ckpt["args"]), vars(args)
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
    return ckpt, warnings + compare_data(ckpt.get("data"), data, path)


def compare_data(saved, now: dict, path) -> list:
    """--resume: refuse (SystemExit) labeled or unlabeled cases that differ from the saved run's, in name or order
    (the batches depend on both); warnings for case files whose size changed."""
    if saved is None:
        return [f"--resume: {path} records no list of its training cases; the cases are not compared"]
    for part in ("labeled", "unlabeled"):
        if saved[part] != now[part]:
            i, (is_now, was) = next((i, p) for i, p in enumerate(zip_longest(now[part], saved[part])) if p[0] != p[1])
            how = ("the same cases in another order" if sorted(saved[part]) == sorted(now[part]) else
                   f"{len(now[part])} cases, the run started with {len(saved[part])}")
            raise SystemExit(f"error: --resume: the {part} cases differ from the run in {path} ({how}; entry {i + 1} "
                             f"is {is_now}, was {was}); train on the list the run started with, or start a new run")
    names = now["labeled"] + now["unlabeled"]
    changed = [(n, a, b) for n, a, b in zip(names, saved["bytes"], now["bytes"]) if a != b]
    if changed:
        name, before, after = changed[0]
        return [f"--resume: {len(changed)} case files changed size since the run started, e.g. {name}: "
                f"{before} -> {after} bytes"]
    return []


def finish_done_run(ckpt, args, run_dir, rank: int, log) -> bool:
    """True when the resumed run already did all its iterations (say so; write the final checkpoint from
    latest.pth if a kill came between the two writes): nothing is left to train."""
    if ckpt is None or ckpt["iteration"] < args.max_iterations:
        return False
    final = run_dir / f"iter_{args.max_iterations}.pth"
    if rank == 0:
        for name in remove_temp_files(run_dir):
            log.info(f"removed {name}, a checkpoint write interrupted by a kill")
        if not final.is_file():
            save_checkpoint(ckpt, final)
    log.info(f"run folder {run_dir} already finished ({ckpt['iteration']} of {args.max_iterations} iterations); "
             f"final checkpoint {final}")
    return True
