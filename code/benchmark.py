"""Training-iteration and evaluation speed of CrossMatch (the paper's Table III, SPEC.md 5).

    python code/benchmark.py --task la   --warmup 2 --iters 3 --json la_cpu.json
    python code/benchmark.py --task acdc --warmup 2 --iters 5 --json acdc_cpu.json
    python code/benchmark.py --task la --eval --json la_eval_cpu.json     # sliding-window seconds per volume

One training iteration is timed as Table III defines it: from the host batch (data migration to the device
included) to the end of the backward pass and the optimizer step, averaged over --iters iterations after
--warmup iterations. Methods:

  supervised        the training script's own ``train_iteration`` with method 'supervised' on a batch of
                    --batch_size labeled samples (the plain network, Table III's "V-Net")
  crossmatch        the training script's own ``train_iteration`` (two passes, Section III-F)
  crossmatch_naive  Algorithm 1 as printed: encoder on cat(x_l, x_w), encoder on x_s2, one decoder call on
                    [l, w, P_w w, P_s w, P_w s2, P_s s2], and a second encode + decode of cat(x_s1, x_s2);
                    the same losses (written here, from the model's encode / decode / perturb)

Batches are synthetic (random, the right shapes and label ranges), built once and kept on the host. By
default all methods live in one process and the timed iterations are interleaved round-robin (the first
method of each round rotates), so that background load shifts every method alike; the ratios are the
quotients of the per-method figures. --isolate runs each method in a fresh subprocess instead.

FLOPs: torch.utils.flop_counter.FlopCounterMode over the first warm-up iteration (forward + backward; an
eager iteration, also with --compile). It counts 2 FLOPs per multiply-add of convolutions and matrix
products (and their backward), nothing for element-wise ops or the optimizer.

Tensor memory, on any device: "saved for backward" adds up the distinct storages autograd keeps for the
backward pass of the first warm-up iteration (saved_tensors_hooks; all alive when the single backward
starts); "peak of live tensors" follows every storage an operator returns until it is freed during the
second warm-up iteration (TorchDispatchMode; weights, gradients, optimizer state and batch included): on a
CPU the figure CUDA's max_memory_allocated would show, less allocator rounding and library workspaces.

Peak memory: on CUDA torch.cuda.max_memory_allocated, reset before every iteration, max over the method's
iterations. On CPU the process's peak resident set (VmHWM) during the method's warm-up iterations: before each
of them freed heap memory is handed back to the system (glibc malloc_trim, or the purge of every arena when
jemalloc is preloaded) and the high-water mark is reset (/proc/self/clear_refs), so the figure is the peak RSS
of the whole process (interpreter, libraries, every method's model and host batch) while that method
iterates, not an earlier method's. The timed iterations are left alone (a trim would make them fault their
memory in again). With --isolate, or where the reset is not possible, it is the max RSS of a fresh process
that ran only that method.

CPU memory allocator (--malloc, as in the training scripts; code/utils/allocator.py): by default the benchmark
re-executes itself with jemalloc preloaded when the library is found, as the training scripts do; glibc
would map every large block afresh each iteration (--malloc system measures that). The JSON and the report
name the allocator the figures were measured on.
"""
import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import weakref
from itertools import product
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from networks import build_model
from utils.allocator import add_malloc_arg, release_free_memory_fn, use_allocator
from utils.cutmix import partner_index, sample_boxes
from utils.losses import UNSUP_CRITERIA, supervised_loss
from utils.run import ArgumentParser, AMP_DTYPES, autocast, memory_format, pick_device, poly_lr, prepare_model, set_lr
from utils.seeding import iteration_seed

METHODS = ("supervised", "crossmatch", "crossmatch_naive")
TASK_DEFAULTS = {"la": dict(batch_size=4, labeled_bs=2, patch_size=(112, 112, 80), n_classes=2),
                 "acdc": dict(batch_size=24, labeled_bs=12, patch_size=(256, 256), n_classes=4)}
PAPER_TABLE_III_MS = {"V-Net (supervised)": 22, "UA-MT": 273, "BCP": 379, "CrossMatch": 210}


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--task", choices=["la", "acdc"], default="la")
    a("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    a("--iters", type=int, default=5, help="timed iterations per method")
    a("--warmup", type=int, default=2, help="untimed iterations per method first (the first counts FLOPs and saved "
                                                    "bytes, the second the peak of live tensors)")
    a("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    a("--patch_size", type=int, nargs="+", default=None, help="default: LA 112 112 80, ACDC 256 256")
    a("--batch_size", type=int, default=None, help="labeled + unlabeled per iteration (default: LA 4, ACDC 24); "
                                                   "supervised uses this many labeled samples")
    a("--labeled_bs", type=int, default=None, help="labeled samples of a CrossMatch batch (default: LA 2, ACDC 12)")
    a("--amp", choices=list(AMP_DTYPES), default="none", help="autocast precision")
    a("--compile", action="store_true", help="torch.compile the network (naive: encode and decode)")
    a("--threads", type=int, default=None, help="torch.set_num_threads (default: leave as is)")
    a("--seed", type=int, default=1337)
    add_malloc_arg(p)
    a("--isolate", action="store_true",
      help="each method in a fresh subprocess (peak memory = that process's max RSS) instead of one process "
           "with interleaved iterations")
    a("--eval", action="store_true", help="time LA sliding-window evaluation of one volume instead of training")
    a("--eval_shape", type=int, nargs=3, default=[199, 143, 88], help="volume size for --eval (X Y Z)")
    a("--sw_batches", type=int, nargs="+", default=[1, 4, 8], help="windows per forward call for --eval")
    a("--stride_xy", type=int, default=18)
    a("--stride_z", type=int, default=4)
    a("--eval_repeats", type=int, default=1, help="volumes per sw_batch setting for --eval (interleaved)")
    a("--json", default=None, help="write the results here")
    a("--_one", default=None, help=argparse.SUPPRESS)   # internal: run one method in this (sub)process
    args = p.parse_args(argv)

    d = TASK_DEFAULTS[args.task]
    args.patch_size = list(d["patch_size"] if args.patch_size is None else args.patch_size)
    args.batch_size = d["batch_size"] if args.batch_size is None else args.batch_size
    args.labeled_bs = d["labeled_bs"] if args.labeled_bs is None else args.labeled_bs
    n_dims = len(d["patch_size"])
    if len(args.patch_size) != n_dims or min(args.patch_size) < 1:
        p.error(f"--patch_size: expected {n_dims} positive integers for --task {args.task}")
    if not 1 <= args.labeled_bs < args.batch_size:
        p.error(f"--labeled_bs {args.labeled_bs}: expected between 1 and --batch_size - 1 = {args.batch_size - 1}")
    if "crossmatch_naive" in args.methods and args.batch_size - args.labeled_bs < 1:
        p.error("crossmatch_naive needs unlabeled samples")
    if args.iters < 1:
        p.error("--iters: at least 1")
    if args.warmup < (2 if args.compile else 1):
        p.error("--warmup: at least 1 (the first warm-up iteration counts FLOPs), at least 2 with --compile")
    if args.threads is not None and args.threads < 1:
        p.error("--threads: at least 1")
    if args.eval and args.task != "la":
        p.error("--eval times the LA sliding-window evaluation: use --task la")
    if args.eval and (min(args.sw_batches) < 1 or args.eval_repeats < 1):
        p.error("--sw_batches and --eval_repeats: at least 1")
    if len(set(args.methods)) != len(args.methods):
        p.error("--methods: each method once")
    return args


# ----------------------------------------------------------------------------- environment
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} logical CPUs)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status_mb(key: str):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _max_rss_mb() -> float:
    import resource
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024.0 if sys.platform != "darwin" else kb / 2 ** 20


def _can_reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _proc_status_mb("VmHWM") is not None
    except OSError:
        return False


class TensorPeak(TorchDispatchMode):
    """Peak bytes of live tensor storages while active: the storages of ``existing`` plus every storage an
    operator returns, each counted until it is freed (a weak reference's callback). What
    torch.cuda.max_memory_allocated would count, measured on any device (without allocator rounding and
    library workspaces)."""

    def __init__(self, existing=()):
        super().__init__()
        self.live, self.current, self.peak = {}, 0, 0
        for t in existing:
            self._add(t)

    def _add(self, t):
        st = t.untyped_storage()
        key, n = id(st), st.nbytes()
        if key in self.live or n == 0:
            return

        def freed(_ref, key=key, n=n):
            self.current -= n
            self.live.pop(key, None)

        self.live[key] = weakref.ref(st, freed)
        self.current += n
        self.peak = max(self.peak, self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._add(t)
        return out


class MemoryMeter:
    """Peak memory of the iterations between start() and stop(), per method (see the module docstring)."""

    def __init__(self, device: torch.device, fresh_process: bool):
        self.device = device
        if device.type == "cuda":
            self.kind = "cuda"
            self.how = "torch.cuda.max_memory_allocated, reset before every iteration; max over the method's iterations"
        elif not fresh_process and _can_reset_hwm():
            self.kind = "hwm"
            self.how = ("CPU: peak resident set (VmHWM) of the whole process during the method's warm-up "
                        "iterations; freed memory handed back (malloc_trim, or jemalloc's purge) and the high-water mark "
                        "reset (/proc/self/clear_refs) before each of them")
        else:
            self.kind = "maxrss"
            self.how = "CPU: max resident set (ru_maxrss) of a fresh process that ran only this method"
        self._trim = None
        if self.kind == "hwm":
            self._trim = release_free_memory_fn()
        self.peak = {}
        self.before = {}

    def start(self, method):
        if self.kind == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before.setdefault(method, torch.cuda.memory_allocated(self.device) / 2 ** 20)
        elif self.kind == "hwm":
            if self._trim is not None:
                self._trim()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.before.setdefault(method, _proc_status_mb("VmRSS"))
        else:
            self.before.setdefault(method, _proc_status_mb("VmRSS"))

    def stop(self, method):
        if self.kind == "cuda":
            mb = torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        elif self.kind == "hwm":
            mb = _proc_status_mb("VmHWM")
        else:
            mb = _max_rss_mb()
        self.peak[method] = max(self.peak.get(method, 0.0), mb)


# ----------------------------------------------------------------------------- batches and models
def training_module(task: str):
    if task == "la":
        import train_la as mod
    else:
        import train_acdc as mod
    return mod


def training_args(args, method: str):
    """The training script's own flags (its defaults: tau, eta, dropout rates, CutMix, optimizer, ...)."""
    mod = training_module(args.task)
    n_iter = args.warmup + args.iters + 10   # the poly schedule never reaches zero inside the benchmark
    argv = ["--method", "supervised" if method == "supervised" else "crossmatch",
            "--batch_size", str(args.batch_size), "--labeled_bs", str(args.labeled_bs),
            "--patch_size", *map(str, args.patch_size), "--amp", args.amp, "--device", args.device,
            "--max_iterations", str(n_iter), "--seed", str(args.seed)]
    if args.compile:
        argv.append("--compile")
    return mod.parse_args(argv)


def make_batch(args, method: str) -> dict:
    """A synthetic host batch in the collate format of utils/sampler.py (seeded: the same for every run)."""
    g = torch.Generator().manual_seed(args.seed)
    n_classes = TASK_DEFAULTS[args.task]["n_classes"]
    shape = tuple(args.patch_size)
    n_l = args.batch_size if method == "supervised" else args.labeled_bs
    n_u = 0 if method == "supervised" else args.batch_size - args.labeled_bs
    batch = {"x_l": torch.randn((n_l, 1) + shape, generator=g),
             "y_l": torch.randint(0, n_classes, (n_l,) + shape, generator=g, dtype=torch.int64),
             "idx_l": torch.arange(n_l)}
    if n_u:
        x_w = torch.randn((n_u, 1) + shape, generator=g)
        batch.update(x_w=x_w, x_s1=x_w + 0.3 * torch.randn(x_w.shape, generator=g),
                     x_s2=x_w + 0.3 * torch.randn(x_w.shape, generator=g), idx_u=torch.arange(n_l, n_l + n_u))
    return batch


def naive_iteration(model, optimizer, scaler, batch, it, args, device, rank=0, want_pred=False, parts=None):
    """Algorithm 1 as printed in the paper (five-stream decode plus a separate encode + decode of the strong
    views), otherwise exactly train_iteration: same seeding, CutMix, losses, backward and step.

    ``parts``: (encode, decode, perturb) to use instead of the model's own (compiled versions)."""
    encode, decode, perturb = parts if parts is not None else (model.encode, model.decode, model.perturb)
    torch.manual_seed(iteration_seed(args.seed, it, rank))
    set_lr(optimizer, poly_lr(args.base_lr, it, args.max_iterations, args.poly_power))
    fmt = memory_format(device, batch["x_l"].dim() - 2)
    x_l = batch["x_l"].to(device, non_blocking=True, memory_format=fmt)
    y_l = batch["y_l"].to(device, non_blocking=True)
    x_w = batch["x_w"].to(device, non_blocking=True, memory_format=fmt)
    x_s1 = batch["x_s1"].to(device, non_blocking=True, memory_format=fmt)
    x_s2 = batch["x_s2"].to(device, non_blocking=True, memory_format=fmt)
    crit = UNSUP_CRITERIA[args.unsup_loss]
    zero = torch.zeros((), device=device)
    L, U = x_l.shape[0], x_w.shape[0]

    with autocast(device, args.amp):
        partner = partner_index(U, device) if args.cutmix_p > 0 else None
        box1 = box2 = None
        if partner is not None:
            box1 = sample_boxes(U, x_w.shape[2:], args.cutmix_p, device=device)
            box2 = sample_boxes(U, x_w.shape[2:], args.cutmix_p, device=device)
            x_s1 = torch.where(box1[:, None], x_s1[partner], x_s1)
            x_s2 = torch.where(box2[:, None], x_s2[partner], x_s2)

        def mix(t, box):
            return t if box is None else torch.where(box, t[partner], t)

        # h_w, h_s = e(x_w), e(x_s2)   (the labeled samples ride along with x_w, as in the two-pass version)
        h_lw = encode(torch.cat([x_l, x_w]))
        h_s = encode(x_s2)
        # d(cat(h_w, P_w h_w, P_s h_w, P_w h_s, P_s h_s)), plus the labeled features, in one decoder call
        feats = [torch.cat([f, perturb.weak(s), perturb.strong(s)]) for f, s in zip(perturb.expand(h_lw, U), h_s)]
        p_l, p_wn, p_ww, p_ws, p_sw, p_ss = decode(feats).split([L, U, U, U, U, U])
        # p_s = d(e(cat(x_s1, x_s2)))
        p_s1, p_s2 = decode(encode(torch.cat([x_s1, x_s2]))).split([U, U])

        with torch.no_grad():
            conf_wn, y_wn = p_wn.detach().float().softmax(1).max(1)
            conf_ww, y_ww = p_ww.detach().float().softmax(1).max(1)
            conf_ws, y_ws = p_ws.detach().float().softmax(1).max(1)
            keep_wn = (conf_wn >= args.conf_thresh).float()
            keep_ww = (conf_ww >= args.conf_thresh).float()
            keep_ws = (conf_ws >= args.conf_thresh).float()

        loss_ip = zero if args.no_ip else 0.5 * (crit(p_s1, mix(y_wn, box1), mix(keep_wn, box1)) +
                                                 crit(p_s2, mix(y_wn, box2), mix(keep_wn, box2)))
        loss_tkd = zero if args.no_tkd else crit(
            torch.cat([p_ww, p_ws, p_sw, p_ss]),
            torch.cat([y_wn, y_wn, mix(y_wn, box2), mix(y_wn, box2)]),
            torch.cat([keep_wn, keep_wn, mix(keep_wn, box2), mix(keep_wn, box2)]))
        loss_dkd = zero if args.no_dkd else 0.5 * (crit(p_sw, mix(y_ww, box2), mix(keep_ww, box2)) +
                                                   crit(p_ss, mix(y_ws, box2), mix(keep_ws, box2)))
        loss_u = 0.5 * (loss_ip + (1 - args.eta) * loss_tkd + args.eta * loss_dkd)
        loss_sup = supervised_loss(p_l, y_l)
        loss = 0.5 * (loss_sup + loss_u)
        logs = {"loss_sup": loss_sup, "loss_u": loss_u, "loss_ip": loss_ip, "loss_tkd": loss_tkd,
                "loss_dkd": loss_dkd, "conf_frac": keep_wn.mean()}

    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return {"loss": loss.detach(), **{k: v.detach() for k, v in logs.items()}}


class Runner:
    """One method: its model, optimizer, host batch and iteration function."""

    def __init__(self, args, method: str, device: torch.device):
        self.method, self.device = method, device
        self.targs = training_args(args, method)
        torch.manual_seed(args.seed)   # the same initial weights for every method
        model = build_model(args.task, self.targs.drop_weak, self.targs.drop_strong, self.targs.dropout_type)
        n_spatial = len(args.patch_size)
        self.model, self.raw, self.optimizer, self.scaler, _ = prepare_model(model, self.targs, device, 1, 0, n_spatial)
        self.model.train()
        self.params = sum(p.numel() for p in self.raw.parameters())
        self.batch = make_batch(args, method)
        if device.type == "cuda":   # as the training DataLoader does (pin_memory=True on CUDA)
            self.batch = {k: v.pin_memory() for k, v in self.batch.items()}
        if method == "crossmatch_naive":
            parts = (self.raw.encode, self.raw.decode, self.raw.perturb)
            if args.compile:
                parts = (torch.compile(self.raw.encode), torch.compile(self.raw.decode), self.raw.perturb)
            self.step_fn = lambda m, *a: naive_iteration(m, *a, parts=parts)
            self.eager_fn = naive_iteration
        else:
            self.step_fn = self.eager_fn = training_module(args.task).train_iteration
        self.it = 0
        self.times_ms = []
        self.gflops = self.saved_mb = self.tensor_peak_mb = None
        self.last_logs = {}

    def _run(self, fn, model):
        logs = fn(model, self.optimizer, self.scaler, self.batch, self.it, self.targs, self.device)
        self.it += 1
        return logs

    def flop_iteration(self):
        """One eager iteration under FlopCounterMode (forward + backward + step); a warm-up iteration. Also adds
        up what autograd keeps for the backward pass (distinct storages, weights included): the activation
        memory of the iteration whatever the device, all of it alive when the single backward starts."""
        storages = {}

        def pack(t):
            st = t.untyped_storage()
            storages[(str(st.device), st.data_ptr())] = st.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                FlopCounterMode(display=False) as counter:
            self._run(self.eager_fn, self.raw)
        sync(self.device)
        self.gflops = counter.get_total_flops() / 1e9
        self.saved_mb = sum(storages.values()) / 2 ** 20

    def warm_iteration(self):
        self._run(self.step_fn, self.model)
        sync(self.device)

    def tensor_peak_iteration(self):
        """An eager warm-up iteration under TensorPeak, once the optimizer has its state: the peak of live
        tensors, weights, gradients, optimizer state and host batch included."""
        existing = [*self.raw.parameters(), *self.batch.values(),
                    *(v for st in self.optimizer.state.values() for v in st.values() if torch.is_tensor(v))]
        with TensorPeak(existing) as tracker:
            self._run(self.eager_fn, self.raw)
        sync(self.device)
        self.tensor_peak_mb = tracker.peak / 2 ** 20

    def timed_iteration(self):
        sync(self.device)
        t0 = time.perf_counter()
        logs = self._run(self.step_fn, self.model)
        sync(self.device)
        self.times_ms.append(1000.0 * (time.perf_counter() - t0))
        self.last_logs = logs

    def result(self, meter: MemoryMeter) -> dict:
        t = self.times_ms
        return {"ms_per_iter": statistics.fmean(t), "ms_std": statistics.stdev(t) if len(t) > 1 else 0.0,
                "ms_median": statistics.median(t), "ms_min": min(t), "ms_all": t,
                "params": self.params, "gflops_per_iter": self.gflops,
                "peak_mem_mb": meter.peak.get(self.method), "saved_for_backward_mb": self.saved_mb,
                "peak_tensor_mb": self.tensor_peak_mb,
                "mem_at_start_mb": meter.before.get(self.method),
                "last_losses": {k: float(v) for k, v in self.last_logs.items()}}


def measure_in_process(args, methods, device, fresh_process=False) -> tuple:
    """Warm up each method, then time the iterations round-robin. Returns ({method: result}, meter.how)."""
    meter = MemoryMeter(device, fresh_process)
    runners = {m: Runner(args, m, device) for m in methods}
    every_iteration = meter.kind != "hwm"   # CPU + reset: the warm-up iterations only (module docstring)
    for m, r in runners.items():
        print(f"[benchmark] {args.task} {m}: warm-up ({args.warmup} iterations, the first counting FLOPs)",
              file=sys.stderr, flush=True)
        for i in range(args.warmup):
            meter.start(m)
            if i == 0:
                r.flop_iteration()
            elif i == 1:
                r.tensor_peak_iteration()
            else:
                r.warm_iteration()
            meter.stop(m)
    for i in range(args.iters):
        order = methods[i % len(methods):] + methods[:i % len(methods)]
        for m in order:
            if every_iteration:
                meter.start(m)
            runners[m].timed_iteration()
            if every_iteration:
                meter.stop(m)
            print(f"[benchmark] {args.task} {m}: timed iteration {i + 1}/{args.iters}: "
                  f"{runners[m].times_ms[-1]:.1f} ms", file=sys.stderr, flush=True)
    return {m: r.result(meter) for m, r in runners.items()}, meter.how


def measure_isolated(args, argv) -> tuple:
    """Each method in a fresh subprocess of this script (--_one METHOD); returns ({method: result}, how)."""
    results, how = {}, None
    keep = _strip_flags(argv, {"--json": 1, "--isolate": 0, "--methods": None})
    for m in args.methods:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "one.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), *keep, "--methods", m, "--_one", m,
                   "--json", str(out)]
            proc = subprocess.run(cmd)
            if proc.returncode != 0:
                raise SystemExit(f"error: the subprocess for {m} failed (exit {proc.returncode}): {' '.join(cmd)}")
            one = json.loads(out.read_text())
        results[m] = one["results"][m]
        how = one["peak_mem_method"]
    return results, how


def _strip_flags(argv, flags: dict) -> list:
    """argv without the given flags; value: number of values the flag takes (None: all up to the next flag)."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        name = a.split("=", 1)[0]
        if name in flags:
            n = flags[name]
            i += 1
            if "=" in a:
                continue
            if n is None:
                while i < len(argv) and not argv[i].startswith("--"):
                    i += 1
            else:
                i += n
            continue
        out.append(a)
        i += 1
    return out


# ----------------------------------------------------------------------------- evaluation
def measure_eval(args, device) -> dict:
    from utils.sliding_window import sliding_window_inference, window_starts
    torch.manual_seed(args.seed)
    model = build_model("la").to(device).eval()
    image = torch.randn(tuple(args.eval_shape), generator=torch.Generator().manual_seed(args.seed)).numpy()
    padded = [max(s, p) for s, p in zip(args.eval_shape, args.patch_size)]
    strides = (args.stride_xy, args.stride_xy, args.stride_z)
    windows = len(list(product(*(window_starts(s, p, t) for s, p, t in zip(padded, args.patch_size, strides)))))
    meter = MemoryMeter(device, fresh_process=False)
    amp_dtype = AMP_DTYPES[args.amp]
    with torch.inference_mode():   # warm-up: the convolution primitives of every window batch size
        for b in args.sw_batches:
            model(torch.zeros((b, 1) + tuple(args.patch_size), device=device))
    times = {b: [] for b in args.sw_batches}
    ref, max_diff = None, 0.0
    for r in range(args.eval_repeats):
        order = args.sw_batches[r % len(args.sw_batches):] + args.sw_batches[:r % len(args.sw_batches)]
        for b in order:
            meter.start(b)
            sync(device)
            t0 = time.perf_counter()
            probs, _ = sliding_window_inference(model, image, args.patch_size, args.stride_xy, args.stride_z,
                                                device=device, sw_batch=b, amp_dtype=amp_dtype)
            sync(device)
            times[b].append(time.perf_counter() - t0)
            meter.stop(b)
            if ref is None:
                ref = probs
            else:
                max_diff = max(max_diff, float(abs(probs - ref).max()))
            print(f"[benchmark] eval sw_batch {b}: {times[b][-1]:.2f} s / volume", file=sys.stderr, flush=True)
    per = {str(b): {"s_per_volume": statistics.fmean(t), "s_median": statistics.median(t), "s_all": t,
                    "forward_calls": math.ceil(windows / b), "peak_mem_mb": meter.peak.get(b)}
           for b, t in times.items()}
    base = per[str(args.sw_batches[0])]["s_per_volume"]
    return {"volume_shape": list(args.eval_shape), "patch_size": list(args.patch_size),
            "stride_xy": args.stride_xy, "stride_z": args.stride_z, "windows": windows,
            "sw_batch": per, "baseline_sw_batch": args.sw_batches[0],
            "speedup_vs_baseline": {str(b): base / per[str(b)]["s_per_volume"] for b in args.sw_batches},
            "max_abs_prob_diff_between_sw_batches": max_diff, "peak_mem_method": meter.how}


# ----------------------------------------------------------------------------- main
def _ratio(num, den):
    return num / den if num is not None and den else None


def _paired_median(results, num, den):
    """Median over rounds of the per-round quotient (round i: the i-th timed iteration of each method, run
    back to back when interleaved), the figure least moved by slow changes of background load."""
    if num not in results or den not in results:
        return None
    return statistics.median(a / b for a, b in zip(results[num]["ms_all"], results[den]["ms_all"]))


def summarise(results: dict) -> dict:
    r = lambda m, k: results.get(m, {}).get(k)   # noqa: E731
    return {"ratio": _ratio(r("crossmatch", "ms_per_iter"), r("supervised", "ms_per_iter")),
            "ratio_median": _ratio(r("crossmatch", "ms_median"), r("supervised", "ms_median")),
            "ratio_paired_median": _paired_median(results, "crossmatch", "supervised"),
            "naive_vs_crossmatch_paired_median": _paired_median(results, "crossmatch_naive", "crossmatch"),
            "naive_vs_crossmatch": _ratio(r("crossmatch_naive", "ms_per_iter"), r("crossmatch", "ms_per_iter")),
            "naive_vs_crossmatch_median": _ratio(r("crossmatch_naive", "ms_median"), r("crossmatch", "ms_median")),
            "flop_ratio": _ratio(r("crossmatch", "gflops_per_iter"), r("supervised", "gflops_per_iter")),
            "flop_ratio_naive_vs_crossmatch": _ratio(r("crossmatch_naive", "gflops_per_iter"),
                                                     r("crossmatch", "gflops_per_iter"))}


def print_report(out: dict) -> None:
    print(f"device: {out['device']} ({out['device_name']}), torch {out['torch']}, threads {out['threads']}, "
          f"amp {out['flags']['amp']}, compile {out['flags']['compile']}")
    if out["cpu_allocator"]:
        print(f"CPU allocator: {out['cpu_allocator']}; load average at start {out['load_average']}")
    if "eval" in out:
        e = out["eval"]
        print(f"LA sliding-window evaluation, volume {'x'.join(map(str, e['volume_shape']))}, patch "
              f"{'x'.join(map(str, e['patch_size']))}, stride {e['stride_xy']}/{e['stride_z']}: {e['windows']} windows")
        for b, v in e["sw_batch"].items():
            print(f"  sw_batch {b:>3}: {v['s_per_volume']:8.2f} s / volume ({v['forward_calls']} forward calls, "
                  f"peak {v['peak_mem_mb']:.0f} MB)  speedup x{e['speedup_vs_baseline'][b]:.2f}")
        print(f"  max |prob difference| between sw_batch settings: {e['max_abs_prob_diff_between_sw_batches']:.2e}")
        return
    f = out["flags"]
    print(f"task {out['task']}: patch {'x'.join(map(str, f['patch_size']))}, batch {f['batch_size']} "
          f"(crossmatch {f['labeled_bs']} labeled + {f['batch_size'] - f['labeled_bs']} unlabeled; supervised "
          f"{f['batch_size']} labeled), warm-up {f['warmup']}, timed {f['iters']}, "
          f"{'isolated processes' if f['isolate'] else 'one process, interleaved'}")
    print(f"{'method':<18}{'ms/iter':>12}{'std':>10}{'median':>12}{'GFLOPs':>11}{'params':>12}{'peak MB':>10}"
          f"{'saved MB':>10}{'tensors MB':>12}")
    for m, v in out["results"].items():
        print(f"{m:<18}{v['ms_per_iter']:12.1f}{v['ms_std']:10.1f}{v['ms_median']:12.1f}"
              f"{v['gflops_per_iter']:11.1f}{v['params']:12,d}{v['peak_mem_mb']:10.0f}{v['saved_for_backward_mb']:10.0f}"
              f"{v['peak_tensor_mb'] if v['peak_tensor_mb'] is not None else float('nan'):12.0f}")
    for k in ("ratio", "ratio_median", "ratio_paired_median", "naive_vs_crossmatch", "naive_vs_crossmatch_median",
              "naive_vs_crossmatch_paired_median", "flop_ratio", "flop_ratio_naive_vs_crossmatch"):
        if out[k] is not None:
            print(f"{k}: {out[k]:.3f}")
    print(f"peak memory: {out['peak_mem_method']}")
    print("saved MB: what autograd keeps for the backward pass (distinct storages, weights included), counted "
          "in the first warm-up iteration; tensors MB: peak of live tensors in the second (any device; what CUDA's "
          "max_memory_allocated counts, less allocator rounding and library workspaces; needs --warmup 2)")


def main(argv=None):
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    threads_before = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return _main(args, argv, from_command_line)
    finally:   # main() may be called from another program (the tests): leave its thread count as it was
        torch.set_num_threads(threads_before)


def _main(args, argv, from_command_line=False):
    device = pick_device(args.device)
    allocator = use_allocator(args.malloc, device.type, may_reexec=from_command_line) if device.type == "cpu" else None
    flags = {k: v for k, v in vars(args).items() if k != "_one"}
    out = {"device": str(device), "device_name": device_name(device), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "flags": flags, "cpu_allocator": allocator,
           "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
           "command": "python code/benchmark.py " + " ".join(argv)}

    if args.eval:
        out.update(task="la", mode="eval", eval=measure_eval(args, device))
    else:
        out.update(task=args.task, mode="train",
                   time_method=("wall clock per iteration (time.perf_counter" +
                                (", torch.cuda.synchronize before each reading" if device.type == "cuda" else "") +
                                ") from the host batch to the end of the optimizer step; ms_per_iter = mean over "
                                "the timed iterations after the warm-up"))
        if args._one is not None:
            results, how = measure_in_process(args, [args._one], device, fresh_process=True)
        elif args.isolate:
            results, how = measure_isolated(args, argv)
        else:
            results, how = measure_in_process(args, list(args.methods), device)
        out.update(results=results, peak_mem_method=how, **summarise(results))
        out["paper_table_iii_ms"] = PAPER_TABLE_III_MS
        out["paper_ratio"] = PAPER_TABLE_III_MS["CrossMatch"] / PAPER_TABLE_III_MS["V-Net (supervised)"]

    if args._one is None:
        print_report(out)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2) + "\n")
        if args._one is None:
            print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
