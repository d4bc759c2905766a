"""The run folder ``<out_dir>/<TASK>_<exp>_<labelnum>_labeled``: what a run writes, and its log.

It holds ``config.json`` (every resolved flag, the command, git commit, library versions, device),
``log.txt``, the tensorboard events (every loss term, lr, confident fraction, now and then an image,
label and prediction slice), ``latest.pth`` and the final ``iter_<max_iterations>.pth``.
Under torchrun only rank 0 writes. While a run uses its folder, rank 0 holds ``run.lock`` in it (hold_run_dir):
one writer per run folder.
"""
import errno
import json
import logging
import math
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy
import scipy
import torch
import torch.distributed as dist
from torch.utils.tensorboard import SummaryWriter

from utils import REPO_ROOT, resolve
from utils.checkpoint import remove_temp_files
from utils.datasets import run_prefix
from utils.distributed import any_rank, cleanup
from utils.signals import Stopped, as_stopped, stop_signals_handled, stop_signals_held

try:
    import fcntl
except ImportError:  # not POSIX: no lock
    fcntl = None

LOCK_NAME = "run.lock"
_held = {}  # the run folder this process holds: {"fd": open run.lock, "dir": Path, "made": folders made for it}


def run_dir_of(args) -> Path:
    return resolve(args.out_dir) / f"{run_prefix(args)}_{args.exp}_{args.labelnum}_labeled"


def check_run_dir(args, rank: int) -> Path:
    """Before anything is loaded or written: refuse an --out_dir that cannot hold run folders; rank 0 then holds
    the run folder (hold_run_dir: refused while another run uses it); refuse a folder that already holds a run
    (unless --resume or --overwrite) and a --resume without latest.pth."""
    run_dir = run_dir_of(args)
    out = resolve(args.out_dir)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"error: --out_dir {out}: a file, expected a folder for run folders")
    if rank == 0:
        hold_run_dir(run_dir)
    if args.resume and not (run_dir / "latest.pth").is_file():
        raise SystemExit(f"error: --resume: {run_dir / 'latest.pth'} does not exist (nothing to resume; check --exp, "
                         f"--labelnum and --out_dir, or start afresh with --overwrite)")
    if not args.resume and not args.overwrite and (run_dir / "latest.pth").is_file():
        raise SystemExit(f"error: run folder {run_dir} already holds a run; pass --resume to continue it or "
                         f"--overwrite to replace it (or choose another --exp)")
    if not args.resume and not args.overwrite and ((run_dir / "config.json").exists() or any(run_dir.glob("*.pth"))):
        raise SystemExit(f"error: run folder {run_dir} holds a run without latest.pth (stopped before its first "
                         f"checkpoint); pass --overwrite to start it again (or choose another --exp)")
    return run_dir


def hold_run_dir(run_dir: Path) -> None:
    """Hold ``run_dir/run.lock`` (made with the folder if need be) until release_run_dir(), or stop (SystemExit)
    with one line naming the holder: pid, host and since when. The hold is a POSIX lock (fcntl.lockf): the kernel
    drops it when the holder ends, however it ends (SIGKILL too), so the file a killed run leaves is simply taken
    over; forked data-loader workers do not inherit it. Also refuses a folder it cannot write to."""
    if fcntl is None:
        return
    made = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
    path = run_dir / LOCK_NAME
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # the mode the umask leaves, like every file of the run
    except OSError as e:
        raise SystemExit(f"error: --out_dir {run_dir.parent}: cannot write the run folder {run_dir.name} there "
                         f"({e.strerror})") from None
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = path.read_text().strip() or "another process"
        os.close(fd)
        if e.errno in (errno.EACCES, errno.EAGAIN):
            raise SystemExit(f"error: run folder {run_dir} is in use by {holder} ({path}); one run at a time may "
                             f"write it: wait for that run to end, or choose another --exp") from None
        print(f"warning: {path}: cannot lock it ({e.strerror}); make sure no other run writes this folder",
              file=sys.stderr)
        return
    if not path.exists() or not os.path.samestat(os.fstat(fd), os.stat(path)):
        os.close(fd)  # the previous holder removed the file while we opened it: take the new one
        return hold_run_dir(run_dir)
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
    _held.update(fd=fd, dir=run_dir, made=made)


def release_run_dir() -> None:
    """Give up the run folder hold_run_dir took (main() calls it however training ends): run.lock is removed, and
    so are the folders hold_run_dir made when nothing else was written into them."""
    if not _held:
        return
    if (_held["dir"] / LOCK_NAME).exists():
        os.unlink(_held["dir"] / LOCK_NAME)
    os.close(_held["fd"])
    for folder in _held["made"]:
        try:
            folder.rmdir()
        except OSError:
            break
    _held.clear()


def clear_run_dir(run_dir: Path) -> None:
    """--overwrite: delete everything in the run folder but run.lock, which this process holds."""
    for p in run_dir.iterdir():
        if p.name != LOCK_NAME:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def make_run_dir(args) -> Path:
    """Create the run folder (--overwrite empties the old one first). Call it after the data is loaded, so that
    a run refused for bad data leaves an old run folder as it was."""
    run_dir = run_dir_of(args)
    if args.overwrite and run_dir.exists():
        clear_run_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def run_training(train, args):
    """``train(args)`` (a training script's set-up, data and loop) with the stop signals handled (utils/signals.py),
    then the run folder released (run.lock), however it ends; a stop signal, Ctrl-C and a failed collective outside
    the training loop end with one line (stop_training)."""
    try:
        with stop_signals_handled():
            return train(args)
    except (Stopped, KeyboardInterrupt, RuntimeError) as e:
        stop_training(e, run_dir_of(args))
    finally:
        release_run_dir()


def stop_training(error: BaseException, run_dir: Path, done=None, total=None):
    """End training after a stop signal or Ctrl-C (exit status 128 + the signal number: 143 for SIGTERM, 130 for
    Ctrl-C) or a failed collective under torchrun (another process stalled past --ddp_timeout or died; exit status
    1) with one line on stderr: where training was (``done`` of ``total`` iterations finished), what latest.pth
    holds and how to go on. Re-raises any other error."""
    from utils.checkpoint import CheckpointError, load_checkpoint
    me, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    error = as_stopped(error)
    lost = world > 1 and (isinstance(error, dist.DistError) or re.search(
        r"gloo|nccl|timed out|timeout|connection|pair closure", str(error), re.IGNORECASE))
    if not isinstance(error, Stopped) and not lost:
        raise error
    try:
        saved = load_checkpoint(run_dir / "latest.pth")["iteration"]
        then = f"{run_dir / 'latest.pth'} holds iteration {saved}: resume with --resume"
    except CheckpointError:
        then = f"no readable latest.pth in {run_dir}: start again (--overwrite if the run folder exists)"
    if isinstance(error, Stopped):
        where = f"after iteration {done} of {total}" if done is not None else "outside the training loop"
        if me == 0:
            print(f"error: stopped by {error} {where}; {then}", file=sys.stderr)
        raise SystemExit(error.exit_code) from None
    where = f"in iteration {done + 1} of {total}" if done is not None else "outside the training loop"
    what = re.sub(r"^\[[^]]*\]\s*", "", str(error).strip().splitlines()[0])
    raise SystemExit(f"error: rank {me} of {world}: a collective failed {where} ({what}): another process "
                     f"stalled longer than --ddp_timeout or died; {then}") from None


def open_run_folder(args, config: dict, warnings=()) -> tuple:
    """Rank 0, once the data is loaded: create the run folder, remove temporary files a killed run left, write
    config.json, start the log and the tensorboard writer. Returns ``(log, writer)``."""
    run_dir = make_run_dir(args)
    log = get_logger(run_dir)
    for name in remove_temp_files(run_dir):
        log.info(f"removed {name}, a checkpoint write interrupted by a kill")
    for message in warnings:
        log.warning(f"warning: {message}")
    write_config(run_dir, config)
    return log, SummaryWriter(str(run_dir))


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "") if head.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


def config_of(args, **extra) -> dict:
    """The resolved settings of a run: every flag, and ``extra`` (run folder, device, data counts)."""
    return {"args": {k: v for k, v in vars(args).items() if not k.startswith("print_")}, **extra}


@stop_signals_held()  # written whole, then a stop signal stops
def write_config(run_dir: Path, config: dict) -> None:
    config = {**config, "command": " ".join(sys.argv), "git_commit": git_commit(),
              "versions": {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                           "numpy": numpy.__version__, "scipy": scipy.__version__, "h5py": h5py.__version__}}
    name = "config_resume.json" if (run_dir / "config.json").exists() else "config.json"
    (run_dir / name).write_text(json.dumps(config, indent=2, default=str) + "\n")


class _TqdmHandler(logging.Handler):
    def emit(self, record):
        from tqdm import tqdm
        tqdm.write(self.format(record), file=sys.stderr)


def get_logger(run_dir=None, quiet: bool = False) -> logging.Logger:
    """Log lines to stderr (through tqdm, so they do not land on the progress bar) and to ``run_dir/log.txt``;
    ``quiet`` (ranks other than 0) keeps only warnings and errors."""
    log = logging.getLogger("crossmatch")
    log.handlers.clear()
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False
    fmt = logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S")
    for handler in [_TqdmHandler()] + ([logging.FileHandler(run_dir / "log.txt")] if run_dir else []):
        handler.setFormatter(fmt)
        log.addHandler(handler)
    return log


def log_iteration(logs: dict, done: int, args, lr: float, writer, log) -> None:
    """Every --log_every iterations and at checkpoints: stop training on every process (collective) when a loss
    is not finite, the last checkpoint kept as it is; else scalars to tensorboard (rank 0) and now and then a
    log line."""
    if not (done % args.log_every == 0 or done % args.save_every == 0 or done == args.max_iterations):
        return
    values = {k: v.item() for k, v in logs.items()}
    if any_rank(not all(map(math.isfinite, values.values()))):
        log.error(f"non-finite loss at iteration {done}: {values}; stopping. The last checkpoint is kept unchanged.")
        cleanup()
        raise SystemExit(1)
    if writer is None:
        return
    for k, v in values.items():
        writer.add_scalar(f"train/{k}", v, done)
    writer.add_scalar("train/lr", lr, done)
    if done <= 3 * args.log_every or done % (10 * args.log_every) == 0 or done == args.max_iterations:
        log.info(f"it {done}/{args.max_iterations} lr {lr:.2e} " + " ".join(f"{k} {v:.4f}" for k, v in values.items()))


def log_images(writer, shown, it) -> None:
    """The first labeled sample's image, label and prediction (``shown``: ``x_l``, ``y_l``, ``pred``; the middle
    slice of a volume) to tensorboard."""
    def cut(t):
        t = t.float().cpu()
        return t[..., t.shape[-1] // 2] if t.dim() == 3 else t
    img, label, pred = cut(shown["x_l"][0, 0]), shown["y_l"], shown["pred"]
    writer.add_image("train/image", ((img - img.min()) / (img.max() - img.min() + 1e-8))[None].numpy(), it)
    writer.add_image("train/label", cut(label[0])[None].numpy() / max(1, int(label.max())), it)
    writer.add_image("train/prediction", cut(pred[0].argmax(0))[None].numpy() / max(1, pred.shape[1] - 1), it)
