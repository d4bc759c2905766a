"""What both training scripts share around the loop: flags, device and precision, the run folder
(config.json, log.txt, tensorboard events), the learning-rate schedule."""
import argparse
import contextlib
import json
import logging
import math
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from .allocator import add_malloc_arg
from .paths import REPO_ROOT, resolve

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# Flags that change what is trained: a --resume whose flags differ in any of these from the saved run is
# refused (docs/RELIABILITY.md). The others (data location, device, workers, logging) may differ: warned.
METHOD_FLAGS = ("labelnum", "max_iterations", "epochs", "batch_size", "labeled_bs", "base_lr", "optimizer",
                "momentum", "nesterov", "weight_decay", "poly_power", "patch_size", "conf_thresh", "eta",
                "drop_weak", "drop_strong", "dropout_type", "cutmix_p", "unsup_loss", "method", "no_ip", "no_tkd",
                "no_dkd", "seed", "amp", "sync_bn")
IGNORED_ON_RESUME = ("resume", "overwrite", "exp", "out_dir", "task", "malloc")
NETWORK_STRIDE = 16  # V-Net and U-Net halve the resolution 4 times: every patch axis must be a multiple of 16


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (the flag and what was expected) instead of the full usage text."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def add_common_args(p: argparse.ArgumentParser, *, labelnum, max_iterations, batch_size, labeled_bs, base_lr,
                    optimizer, weight_decay, patch_size, conf_thresh, save_every):
    """The flags both tasks share, with the task's defaults (SPEC.md 2)."""
    a = p.add_argument
    a("--exp", default="CrossMatch", help="experiment name; the run folder is <task>_<exp>_<labelnum>_labeled")
    a("--labelnum", type=int, default=labelnum, help="number of labeled cases (first N of the training list)")
    a("--max_iterations", type=int, default=max_iterations,
      help="training iterations" + ("" if max_iterations else " (default: from --epochs)"))
    a("--batch_size", type=int, default=batch_size, help="samples per iteration and process, labeled + unlabeled")
    a("--labeled_bs", type=int, default=labeled_bs, help="labeled samples per iteration and process")
    a("--base_lr", type=float, default=base_lr)
    a("--optimizer", choices=["adamw", "sgd"], default=optimizer)
    a("--momentum", type=float, default=0.9, help="SGD momentum")
    a("--nesterov", action="store_true", help="SGD with Nesterov momentum (the released ACDC code)")
    a("--weight_decay", type=float, default=weight_decay)
    a("--poly_power", type=float, default=0.9, help="lr = base_lr * (1 - it / max_iterations) ** power")
    a("--patch_size", type=int, nargs="+", default=list(patch_size))
    a("--conf_thresh", type=float, default=conf_thresh, help="tau: pseudo-label confidence threshold")
    a("--eta", type=float, default=0.3, help="weight of L_dkd against L_tkd")
    a("--drop_weak", type=float, default=0.25, help="P_w channel dropout rate")
    a("--drop_strong", type=float, default=0.75, help="P_s channel dropout rate")
    a("--dropout_type", choices=["dropout", "alpha", "feature_alpha"], default="dropout")
    a("--cutmix_p", type=float, default=0.5, help="probability of a CutMix box in each strong view (0: off)")
    a("--unsup_loss", choices=["dice", "ce"], default="dice", help="unlabeled criterion (paper: dice)")
    a("--method", choices=["crossmatch", "supervised"], default="crossmatch",
      help="supervised: every batch is --batch_size labeled samples, no unlabeled data")
    a("--no_ip", action="store_true", help="switch off L_ip")
    a("--no_tkd", action="store_true", help="switch off L_tkd")
    a("--no_dkd", action="store_true", help="switch off L_dkd")
    a("--seed", type=int, default=1337)
    a("--deterministic", action="store_true", help="deterministic algorithms, no cudnn autotuning")
    a("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    a("--amp", choices=list(AMP_DTYPES), default="none", help="autocast precision")
    a("--compile", action="store_true", help="torch.compile the network")
    add_malloc_arg(p)
    a("--num_workers", type=int, default=2, help="data loader worker processes")
    a("--no_cache", action="store_true", help="read volumes from disk at every access instead of keeping them in memory")
    a("--save_every", type=int, default=save_every, help="write latest.pth every N iterations")
    a("--log_every", type=int, default=10, help="scalars to tensorboard and the log every N iterations")
    a("--image_every", type=int, default=500, help="image, label, prediction slices to tensorboard every N iterations")
    a("--out_dir", default="model", help="where run folders go (relative paths: against the repository root)")
    a("--sync_bn", action="store_true", help="with torchrun: synchronise batch-norm statistics across processes")
    a("--resume", action="store_true", help="continue the run folder from its latest.pth")
    a("--overwrite", action="store_true", help="delete an existing run folder of the same name first")


def validate_common_args(args, n_dims: int, need_iterations: bool = True):
    """Flag values that parse but make no sense: one message naming the flag."""
    def bad(flag, want):
        value = getattr(args, flag.lstrip("-"))
        value = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else value
        raise SystemExit(f"error: {flag} {value}: expected {want}")
    if len(args.patch_size) != n_dims or min(args.patch_size) < 1:
        bad("--patch_size", f"{n_dims} positive integers")
    if any(p % NETWORK_STRIDE for p in args.patch_size):
        bad("--patch_size", f"multiples of {NETWORK_STRIDE} (the network halves the resolution 4 times)")
    if args.batch_size < 1:
        bad("--batch_size", "at least 1")
    if args.method == "crossmatch" and not 1 <= args.labeled_bs < args.batch_size:
        bad("--labeled_bs", f"between 1 and --batch_size - 1 = {args.batch_size - 1}")
    if args.labelnum < 1:
        bad("--labelnum", "at least 1")
    if (need_iterations or args.max_iterations is not None) and args.max_iterations < 1:
        bad("--max_iterations", "at least 1")
    if not 0.0 <= args.conf_thresh <= 1.0:
        bad("--conf_thresh", "a probability in [0, 1]")
    if not 0.0 <= args.eta <= 1.0:
        bad("--eta", "a weight in [0, 1]")
    if not 0.0 <= args.cutmix_p <= 1.0:
        bad("--cutmix_p", "a probability in [0, 1]")
    for flag in ("--drop_weak", "--drop_strong"):
        if not 0.0 <= getattr(args, flag[2:]) < 1.0:
            bad(flag, "a dropout rate in [0, 1)")
    if args.base_lr <= 0:
        bad("--base_lr", "a positive learning rate")
    if args.weight_decay < 0:
        bad("--weight_decay", "a non-negative number")
    if args.num_workers < 0:
        bad("--num_workers", "0 or more worker processes")
    if args.save_every < 1 or args.log_every < 1 or args.image_every < 1:
        raise SystemExit("error: --save_every, --log_every and --image_every must be at least 1")
    if args.resume and args.overwrite:
        raise SystemExit("error: --resume and --overwrite exclude each other (continue the run, or replace it)")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"error: --device {name}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise SystemExit(f"error: --device {name}: expected auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {name}: CUDA is not available on this machine (use --device cpu or auto)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise SystemExit(f"error: --device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def autocast(device: torch.device, amp: str):
    """Autocast for --amp bf16|fp16, a no-op context for none."""
    dtype = AMP_DTYPES[amp]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def poly_lr(base_lr: float, it: int, max_it: int, power: float = 0.9) -> float:
    return base_lr * (1.0 - it / max_it) ** power


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def make_optimizer(params, args):
    if args.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=args.base_lr, weight_decay=args.weight_decay)
    return torch.optim.SGD(params, lr=args.base_lr, momentum=args.momentum, weight_decay=args.weight_decay,
                           nesterov=args.nesterov)


def check_run_dir(args, is_main: bool = True) -> Path:
    """The run folder model/<TASK>_<exp>_<labelnum>_labeled, checked without touching anything: a folder that
    already holds a run is refused unless --resume or --overwrite; --resume needs its latest.pth.
    Under torchrun only rank 0 decides (the others would race with its writes); its exit stops them all."""
    run_dir = run_dir_of(args)
    if not is_main:
        return run_dir
    has_run = (run_dir / "config.json").exists() or any(run_dir.glob("*.pth"))
    if args.resume:
        if not (run_dir / "latest.pth").is_file():
            raise SystemExit(f"error: --resume: {run_dir / 'latest.pth'} does not exist (nothing to resume; "
                             f"check --exp, --labelnum and --out_dir)")
    elif has_run and not args.overwrite:
        raise SystemExit(f"error: run folder {run_dir} already holds a run; pass --resume to continue it "
                         f"or --overwrite to replace it (or choose another --exp)")
    return run_dir


def prepare_run_dir(args, is_main: bool = True) -> Path:
    """``check_run_dir``, then create the folder (rank 0; --overwrite deletes the old one first). Call it after
    the data checks, so that a run refused for bad data leaves an old run folder untouched."""
    run_dir = check_run_dir(args, is_main)
    if is_main:
        if args.overwrite and not args.resume and run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def library_versions() -> dict:
    import h5py
    import medpy
    import numpy
    import scipy
    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
                "scipy": scipy.__version__, "h5py": h5py.__version__,
                "medpy": getattr(medpy, "__version__", "unknown"), "cuda": torch.version.cuda,
                "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    return versions


def write_config(run_dir: Path, args, extra: dict) -> None:
    cfg = {"args": vars(args), "command": " ".join(sys.argv), "git_commit": git_commit(),
           "versions": library_versions(), **extra}
    name = "config.json" if not (args.resume and (run_dir / "config.json").exists()) else "config_resume.json"
    (run_dir / name).write_text(json.dumps(cfg, indent=2, default=str) + "\n")


class TqdmHandler(logging.Handler):
    """Log lines to stderr through tqdm, so they do not land on the progress bar's line."""

    def emit(self, record):
        from tqdm import tqdm
        tqdm.write(self.format(record), file=sys.stderr)


def get_logger(run_dir: Path, is_main: bool = True) -> logging.Logger:
    log = logging.getLogger("crossmatch")
    log.handlers.clear()
    log.setLevel(logging.INFO if is_main else logging.WARNING)
    log.propagate = False
    fmt = logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S")
    stream = TqdmHandler()
    stream.setFormatter(fmt)
    log.addHandler(stream)
    if is_main:
        fh = logging.FileHandler(run_dir / "log.txt")
        fh.setFormatter(fmt)
        log.addHandler(fh)
    return log


# ----------------------------------------------------------------------------- around the loop
def setup_process(args, from_command_line: bool = False):
    """CPU allocator (may re-execute the script once, see utils/allocator.py), process group (torchrun), device,
    seeds. Returns (rank, world, local_rank, device)."""
    from .allocator import use_allocator
    from .distributed import init_distributed
    from .seeding import seed_everything
    device = pick_device(args.device)
    use_allocator(args.malloc, device.type, may_reexec=from_command_line)
    rank, world, local_rank = init_distributed(args.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank)
    if args.sync_bn and world > 1 and device.type != "cuda":
        raise SystemExit(f"error: --sync_bn: SyncBatchNorm needs CUDA devices, these processes run on {device.type} "
                         f"(drop --sync_bn)")
    seed_everything(args.seed + rank, args.deterministic)
    return rank, world, local_rank, device


def memory_format(device: torch.device, n_spatial: int):
    """Channels-last on GPU (faster convolutions), the default layout elsewhere."""
    if device.type != "cuda":
        return torch.contiguous_format
    return torch.channels_last_3d if n_spatial == 3 else torch.channels_last


def load_resume(args, device, world: int) -> dict:
    """--resume: read the run's latest.pth (weights-only) and compare the saved flags with this command's.

    Differences in ``METHOD_FLAGS`` or in the number of processes are refused (one line listing them); other
    differences are returned as warnings in ``ckpt['resume_warnings']``. ``max_iterations`` is compared only when
    known (ACDC derives it from --epochs later: call ``compare_resume_args`` again then)."""
    from .checkpoint import CheckpointError, load_checkpoint
    path = run_dir_of(args) / "latest.pth"
    try:
        ckpt = load_checkpoint(path, map_location=device, require=("model", "optimizer", "scaler", "iteration", "args"))
    except CheckpointError as e:
        raise SystemExit(f"error: --resume: {e}") from None
    saved_world = ckpt.get("world_size")
    if saved_world is not None and int(saved_world) != world:
        raise SystemExit(f"error: --resume: {path} was trained by {saved_world} process(es), this command runs "
                         f"{world}; the effective batch (processes x --batch_size) and the data order would change. "
                         f"Resume with {saved_world} process(es)")
    ckpt["resume_warnings"] = compare_resume_args(args, ckpt, path)
    threads = ckpt.get("num_threads")
    if device.type == "cpu" and threads is not None and int(threads) != torch.get_num_threads():
        ckpt["resume_warnings"].append(
            f"--resume: {torch.get_num_threads()} intra-op CPU threads, the saved run used {threads}: float sums are "
            f"ordered differently, so the continuation is not bit-identical to an uninterrupted run "
            f"(set OMP_NUM_THREADS={threads} for that)")
    return ckpt


def compare_resume_args(args, ckpt, path=None) -> list:
    """Refuse differing ``METHOD_FLAGS`` (SystemExit), return warnings for other differing flags."""
    saved, now = ckpt.get("args") or {}, vars(args)
    path = path or run_dir_of(args) / "latest.pth"

    def norm(v):
        return list(v) if isinstance(v, tuple) else v
    differ, warn = [], []
    for key in sorted(set(saved) & set(now)):
        if key in IGNORED_ON_RESUME or norm(saved[key]) == norm(now[key]):
            continue
        if key == "max_iterations" and now[key] is None:
            continue
        fmt = lambda v: " ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)  # noqa: E731
        text = f"--{key} {fmt(now[key])} (saved {fmt(saved[key])})"
        (differ if key in METHOD_FLAGS else warn).append(text)
    if differ:
        raise SystemExit(f"error: --resume: flags that change the method differ from the run in {path}: "
                         f"{', '.join(differ)}; repeat the original flags, or start a new run (another --exp)")
    return [f"--resume: flag differs from the saved run, continuing: {w}" for w in warn]


def resume_finished(ckpt, args, run_dir, log, is_main: bool = True) -> bool:
    """True (after saying so) when the resumed run already completed all its iterations; writes the final
    iter_<N>.pth from latest.pth if a kill came between the two writes."""
    target = args.max_iterations if args.max_iterations is not None else (ckpt.get("args") or {}).get("max_iterations")
    done = int(ckpt["iteration"])
    if target is None or done < int(target):
        return False
    final = run_dir / f"iter_{int(target)}.pth"
    if is_main and not final.is_file():
        from .checkpoint import save_checkpoint
        save_checkpoint({k: v for k, v in ckpt.items() if k != "resume_warnings"}, final)
        log.info(f"wrote the missing final checkpoint {final} from latest.pth")
    log.info(f"run folder {run_dir} already finished: latest.pth is at iteration {done} of {target}; "
             f"nothing to train (final checkpoint {final})")
    return True


def prepare_model(model, args, device, world, local_rank, n_spatial, ckpt=None):
    """Move to the device, restore --resume state (``ckpt`` from ``load_resume``), wrap for DDP / torch.compile.

    Returns (model to call, raw model for state dicts, optimizer, scaler, start iteration)."""
    from torch.nn.parallel import DistributedDataParallel
    if world > 1 and args.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device, memory_format=memory_format(device, n_spatial))
    optimizer = make_optimizer(model.parameters(), args)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    start = 0
    if args.resume:
        if ckpt is None:
            ckpt = load_resume(args, device, world)
        path = run_dir_of(args) / "latest.pth"
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            if ckpt["scaler"]:
                scaler.load_state_dict(ckpt["scaler"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise SystemExit(f"error: --resume: {path} does not fit this network/optimizer: "
                             f"{str(e).strip().splitlines()[0]}") from None
        start = int(ckpt["iteration"])
    raw = model
    if world > 1:
        model = DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None)
    if args.compile:
        model = torch.compile(model)
    return model, raw, optimizer, scaler, start


def run_dir_of(args) -> Path:
    return resolve(args.out_dir) / f"{args.task.upper()}_{args.exp}_{args.labelnum}_labeled"


def save_run_checkpoint(path, raw_model, optimizer, scaler, iteration, args):
    """Write a training checkpoint atomically (utils/checkpoint.py). Weights that are no longer finite are
    never written: training stops and the last good checkpoint stays as it was."""
    from .checkpoint import save_checkpoint
    from .distributed import world_size
    state = raw_model.state_dict()
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise SystemExit(f"error: non-finite weights after iteration {iteration} ({len(bad)} tensors, e.g. "
                         f"{bad[0]}); not writing {path}, the last good checkpoint is kept. Lower --base_lr?")
    save_checkpoint({"model": state, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                     "iteration": iteration, "args": vars(args), "task": args.task, "world_size": world_size(),
                     "num_threads": torch.get_num_threads()}, path)


def checkpoint_step(done, args, raw_model, optimizer, scaler, run_dir, is_main, log) -> None:
    """At every --save_every iteration and the last one: under torchrun check that the ranks hold identical
    weights (collective), then rank 0 writes latest.pth."""
    from .distributed import cleanup, is_distributed, ranks_in_sync
    if not (done % args.save_every == 0 or done == args.max_iterations):
        return
    if is_distributed():
        if not ranks_in_sync(raw_model, optimizer):
            log.error(f"iteration {done}: the processes hold different weights; stopping without writing a "
                      f"checkpoint (the last good one, {run_dir / 'latest.pth'}, is kept)")
            cleanup()
            raise SystemExit(1)
        if is_main and done == args.max_iterations:
            log.info(f"iteration {done}: parameters and optimizer state identical on all processes")
    if is_main:
        save_run_checkpoint(run_dir / "latest.pth", raw_model, optimizer, scaler, done, args)


def log_iteration(logs, done, args, optimizer, writer, bar, log, run_dir) -> None:
    """Every --log_every iterations (and at checkpoints): check the losses are finite, write scalars.

    A non-finite loss stops training on every process; the last checkpoint on disk is left as it was."""
    from .distributed import broadcast_flag, cleanup
    if not (done % args.log_every == 0 or done % args.save_every == 0 or done == args.max_iterations):
        return
    values = {k: v.item() for k, v in logs.items() if k != "pred_l"}
    if broadcast_flag(not all(map(math.isfinite, values.values()))):
        log.error(f"non-finite loss at iteration {done}: {values}; stopping. The last good checkpoint "
                  f"({run_dir / 'latest.pth'}) is kept unchanged.")
        cleanup()
        raise SystemExit(1)
    if writer is None:
        return
    lr = optimizer.param_groups[0]["lr"]
    for k, v in values.items():
        writer.add_scalar(f"train/{k}", v, done)
    writer.add_scalar("train/lr", lr, done)
    bar.set_postfix(loss=f"{values['loss']:.4f}")
    if done <= 3 * args.log_every or done % (args.log_every * 10) == 0 or done == args.max_iterations:
        log.info(f"it {done}/{args.max_iterations} lr {lr:.2e} " + " ".join(f"{k} {v:.4f}" for k, v in values.items()))


def log_images(writer, batch, pred, it) -> None:
    """The first labeled sample's image, label and prediction (middle slice for 3D) to tensorboard."""
    def cut(t):
        t = t.float().cpu()
        return t[..., t.shape[-1] // 2] if t.dim() == 3 else t
    img = cut(batch["x_l"][0, 0])
    writer.add_image("train/image", ((img - img.min()) / (img.max() - img.min() + 1e-8))[None].numpy(), it)
    writer.add_image("train/label", cut(batch["y_l"][0])[None].numpy() / max(1, int(batch["y_l"].max())), it)
    writer.add_image("train/prediction", cut(pred[0])[None].numpy() / max(1, int(pred.max())), it)
