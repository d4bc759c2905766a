"""The run folder ``<out_dir>/<TASK>_<exp>_<labelnum>_labeled``: what a run writes, and its log.

It holds ``config.json`` (every resolved flag, the command, git commit, library versions, device),
``log.txt``, the tensorboard events (every loss term, lr, confident fraction, now and then an image,
label and prediction slice), ``latest.pth`` and the final ``iter_<max_iterations>.pth``.
Under torchrun only rank 0 writes.
"""
import json
import logging
import math
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy
import scipy
import torch
from torch.utils.tensorboard import SummaryWriter

from utils import REPO_ROOT, resolve
from utils.checkpoint import remove_temp_files
from utils.distributed import any_rank, cleanup


def run_dir_of(args) -> Path:
    return resolve(args.out_dir) / f"{args.task.upper()}_{args.exp}_{args.labelnum}_labeled"


def check_run_dir(args) -> Path:
    """Refuse, before anything is loaded or written, a run folder that already holds a run (unless --resume or
    --overwrite), a --resume without latest.pth, and an --out_dir that cannot hold run folders."""
    run_dir = run_dir_of(args)
    out = resolve(args.out_dir)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"error: --out_dir {out}: a file, expected a folder for run folders")
    if args.resume and not (run_dir / "latest.pth").is_file():
        raise SystemExit(f"error: --resume: {run_dir / 'latest.pth'} does not exist (nothing to resume; check --exp, "
                         f"--labelnum and --out_dir, or start afresh with --overwrite)")
    if not args.resume and not args.overwrite and ((run_dir / "config.json").exists() or any(run_dir.glob("*.pth"))):
        raise SystemExit(f"error: run folder {run_dir} already holds a run; pass --resume to continue it or "
                         f"--overwrite to replace it (or choose another --exp)")
    return run_dir


def make_run_dir(args) -> Path:
    """Create the run folder (--overwrite deletes the old one first). Call it after the data is loaded, so that
    a run refused for bad data leaves an old run folder as it was."""
    run_dir = check_run_dir(args)
    if args.overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


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


def log_images(writer, batch, pred, it) -> None:
    """The first labeled sample's image, label and prediction (the middle slice of a volume) to tensorboard."""
    def cut(t):
        t = t.float().cpu()
        return t[..., t.shape[-1] // 2] if t.dim() == 3 else t
    img = cut(batch["x_l"][0, 0])
    writer.add_image("train/image", ((img - img.min()) / (img.max() - img.min() + 1e-8))[None].numpy(), it)
    writer.add_image("train/label", cut(batch["y_l"][0])[None].numpy() / max(1, int(batch["y_l"].max())), it)
    writer.add_image("train/prediction", cut(pred[0].argmax(0))[None].numpy() / max(1, pred.shape[1] - 1), it)
