"""Speed and memory of one training iteration, as the paper's Table III times it (docs/PERFORMANCE.md).

    python code/benchmark.py --task la                                  # paper batch 2 + 2 at 112 x 112 x 80
    python code/benchmark.py --task acdc --device cuda --amp bf16 --compile --json acdc.json
    python code/benchmark.py --task la --eval --sw_batch 1 4 8          # sliding-window seconds per LA volume
    python code/benchmark.py --task la --loader --root_path $LA_ROOT    # loader ms per batch, 1 2 4 8 workers

An iteration is timed from the host batch (its copy to the device included) to the end of the optimizer step,
the device synchronised, over --iters iterations after --warmup. Methods, in this order:
  supervised        train_iteration with --method supervised: --batch_size labeled samples (Table III's V-Net)
  crossmatch        the training script's own train_iteration (two passes, Section III-F), with its default
                    --cutmix_partner second_batch: U more unlabeled samples as CutMix partners, their teachers
                    from one more no-grad forward (eval mode, with P_w and P_s) of their weak views
  crossmatch_naive  the same iteration with Algorithm 1's forward as printed: d(e(x_l)); e(x_w) and e(x_s2)
                    decoded as [w, P_w w, P_s w, P_w s2, P_s s2]; d(e(cat(x_s1, x_s2))): x_s2 encoded twice
                    (the partners' teacher forward unchanged)
  cml               the CML script's own train_iteration (train_<task>_cml.py), a self-training iteration at
                    CML's batch (LA 4 + 4, ACDC 12 + 12; --batch_size / --labeled_bs change it too)
The batch column counts L+U; the crossmatch methods also get U partner samples.
FLOPs: torch.utils.flop_counter over one iteration (forward and backward). Peak memory: on a GPU
torch.cuda.max_memory_allocated during the method's iterations; on a CPU the peak resident memory of the
process so far (methods run from the smallest, so each figure is the peak while that method ran).
"""
import json
import resource
import statistics
import sys
import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import train_acdc
import train_acdc_cml
import train_la
import train_la_cml
from networks import build_cml, build_model
from utils import resolve
from utils.data import DataError, TrainSet, acdc_labeled_slices, find_list, read_list
from utils.evaluation import sliding_window
from utils.flags import ArgumentParser
from utils.loop import make_loader
from utils.sampler import TwoStreamBatchSampler
from utils.training import make_optimizer, memory_format, pick_device

METHODS = ("supervised", "crossmatch", "crossmatch_naive", "cml")


class Algorithm1AsPrinted(nn.Module):
    """Wraps the network so that train_iteration's two training-mode calls compute Algorithm 1's forward as
    printed.

    Call 1, ``cat(x_l, x_w)``: d(e(x_l)), then e(x_w) decoded with its two perturbations. Call 2,
    ``cat(x_s1, x_s2)``: d(e(cat(x_s1, x_s2))) unperturbed, then x_s2 encoded again and its two perturbations
    decoded. The outputs have the shapes and order train_iteration expects, every decoder call decoding as the
    network's own perturbed forward does (V-Net: without its output dropout unless ``pert_out_dropout``). The
    training-mode calls are counted (``calls``) to alternate between the two. A call in eval mode (the no-grad
    teacher forward of the CutMix partners, ``--cutmix_partner second_batch``) is the network's own forward,
    not counted."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, 0

    def decode(self, feats):
        net = self.net
        return net.decode(feats, net.pert_out_dropout) if hasattr(net, "pert_out_dropout") else net.decode(feats)

    def forward(self, x, n_pert=0):
        net, n = self.net, n_pert
        if not self.training:
            return net(x, n_pert=n)
        self.calls += 1
        if self.calls % 2:
            return torch.cat([self.decode(net.encode(x[:-n])), self.decode(net.perturb.expand(net.encode(x[-n:]), n))])
        feats = net.encode(x[-n:])
        perturbed = self.decode([torch.cat([net.perturb.weak(f), net.perturb.strong(f)]) for f in feats])
        return torch.cat([self.decode(net.encode(x)), perturbed])


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=["la", "acdc"], default="la")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", choices=["none", "bf16"], default="none")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--memory_format", choices=["auto", "channels_last", "contiguous"], default="auto",
                   help="as the training scripts' flag: auto = channels-last on a GPU")
    p.add_argument("--batch_size", type=int, help="default: the paper's (LA 4, ACDC 24; CML LA 8)")
    p.add_argument("--labeled_bs", type=int, help="default: half the batch")
    p.add_argument("--patch_size", type=int, nargs="+", help="default: the paper's (LA 112 112 80, ACDC 256 256)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--eval", action="store_true", help="LA sliding-window evaluation of one volume instead")
    p.add_argument("--sw_batch", type=int, nargs="+", default=[1, 4], help="--eval: windows per forward call")
    p.add_argument("--eval_shape", type=int, nargs=3, default=[199, 143, 88], help="--eval: volume size")
    p.add_argument("--loader", action="store_true",
                   help="instead: ms per CrossMatch training batch of the data loader on --root_path's training list")
    p.add_argument("--root_path", help="--loader: data root (default: the training script's)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8], help="--loader: worker counts")
    p.add_argument("--batches", type=int, default=40, help="--loader: batches timed per worker count")
    p.add_argument("--json", help="write the figures to this file too")
    args = p.parse_args(argv)
    if args.warmup < 1 or args.iters < 1:
        p.error("--warmup and --iters must be at least 1")
    if args.eval and (args.task != "la" or (args.patch_size and len(args.patch_size) != 3)):
        p.error("--eval: the sliding-window evaluation is LA's: --task la and a 3D --patch_size")
    return args


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def bench_method(args, method: str, device) -> dict:
    if method == "cml":  # --pre_iterations 0: every iteration a self-training one
        script, flags = (train_la_cml if args.task == "la" else train_acdc_cml), ["--pre_iterations", "0"]
    else:
        script = train_la if args.task == "la" else train_acdc
        flags = ["--method", "supervised" if method == "supervised" else "crossmatch"]
    flags += ["--device", str(device), "--amp", args.amp, "--memory_format", args.memory_format,
              "--max_iterations", str(args.warmup + args.iters + 1)]
    for flag in ("batch_size", "labeled_bs", "patch_size"):
        if getattr(args, flag) is not None:
            flags += [f"--{flag}", *map(str, getattr(args, flag) if flag == "patch_size" else [getattr(args, flag)])]
    targs = script.parse_args(flags)
    g = torch.Generator().manual_seed(0)
    L = targs.batch_size if method == "supervised" else targs.labeled_bs
    U = 0 if method == "supervised" else targs.batch_size - targs.labeled_bs
    shape = tuple(targs.patch_size)
    n_classes = 2 if args.task == "la" else 4
    batch = {"x_l": torch.randn((L, 1) + shape, generator=g), "y_l": torch.randint(0, n_classes, (L,) + shape, generator=g)}
    for key in ("x_w", "x_s1", "x_s2", "x_w_p", "x_s1_p", "x_s2_p"):   # the unlabeled and CutMix-partner samples
        batch[key] = torch.randn((U, 1) + shape, generator=g)
    if device.type == "cuda":
        batch = {k: v.pin_memory() for k, v in batch.items()}
    torch.manual_seed(0)
    net = (build_cml(args.task) if method == "cml" else build_model(args.task))
    net = net.to(device, memory_format=memory_format(device, len(shape), targs.memory_format))
    optimizer = make_optimizer(net, targs)
    model = Algorithm1AsPrinted(net) if method == "crossmatch_naive" else net
    model = torch.compile(model) if args.compile else model
    net.train()
    with FlopCounterMode(display=False) as counter:
        script.train_iteration(model, optimizer, batch, 0, targs, device)
    for it in range(1, args.warmup):
        script.train_iteration(model, optimizer, batch, it, targs, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for it in range(args.warmup, args.warmup + args.iters):
        sync(device)
        t0 = time.perf_counter()
        script.train_iteration(model, optimizer, batch, it, targs, device)
        sync(device)
        times.append(1000 * (time.perf_counter() - t0))
    print(f"[benchmark] {method}: " + " ".join(f"{t:.1f}" for t in times) + " ms", file=sys.stderr)
    return {"ms_per_iter": statistics.fmean(times), "ms_std": statistics.pstdev(times),
            "ms_median": statistics.median(times), "ms_all": times, "gflops_per_iter": counter.get_total_flops() / 1e9,
            "peak_mb": peak_mb(device), "batch": f"{L}+{U}", "patch_size": list(shape)}


def bench_eval(args, device) -> dict:
    net = build_model("la").to(device).eval()
    image = torch.randn(args.eval_shape, generator=torch.Generator().manual_seed(0)).numpy()
    patch, amp = tuple(args.patch_size or (112, 112, 80)), torch.bfloat16 if args.amp == "bf16" else None
    out = {}
    for b in args.sw_batch:
        sliding_window(net, image, patch, device=device, sw_batch=b, amp_dtype=amp)
        sync(device)  # the first call above was the warm-up
        t0 = time.perf_counter()
        sliding_window(net, image, patch, device=device, sw_batch=b, amp_dtype=amp)
        sync(device)
        out[str(b)] = {"s_per_volume": time.perf_counter() - t0, "peak_mb": peak_mb(device)}
        print(f"sw_batch {b:>3}: {out[str(b)]['s_per_volume']:.2f} s per {'x'.join(map(str, args.eval_shape))} volume, "
              f"peak {out[str(b)]['peak_mb']:,.0f} MB")
    return out


def bench_loader(args, device) -> dict:
    """ms per batch of the training loader (the paper's batch, its CutMix partners and patch unless given), for
    each --workers count, the network not run: the time of --batches batches after the first round (the workers
    start together, so their first batches arrive at once)."""
    script = train_la if args.task == "la" else train_acdc
    flags = [f for flag in ("batch_size", "labeled_bs", "patch_size") if getattr(args, flag) is not None
             for f in [f"--{flag}", *map(str, getattr(args, flag) if flag == "patch_size" else [getattr(args, flag)])]]
    targs = script.parse_args(flags + (["--root_path", args.root_path] if args.root_path else []))
    root = resolve(targs.root_path)
    try:
        names = read_list(find_list(root, targs.train_list))
        n_labeled = (targs.labelnum if args.task == "la" else
                     acdc_labeled_slices(names, targs.labelnum, targs.train_list)[0])
        kw = {"uint8_unlabeled": targs.uint8_unlabeled} if args.task == "acdc" else {}
        dataset = TrainSet(args.task, root, names, n_labeled, targs.patch_size, **kw)
    except DataError as e:
        raise SystemExit(f"error: {e}") from None
    U = targs.batch_size - targs.labeled_bs
    out = {}
    for workers in args.workers:
        sampler = TwoStreamBatchSampler(range(n_labeled), range(n_labeled, len(names)), targs.labeled_bs, U,
                                        targs.seed, max(workers, 1) + args.batches, partner_bs=U)
        batches = iter(make_loader(dataset, sampler, workers, device))
        for _ in range(max(workers, 1)):
            next(batches)
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(args.batches):
            next(batches)
        ms = 1000 * (time.perf_counter() - t0) / args.batches
        out[str(workers)] = ms
        cpu = f", {1000 * (time.process_time() - c0) / args.batches:.1f} ms of CPU time" if workers == 0 else ""
        print(f"{args.task} loader, {workers} workers: {ms:.1f} ms per batch{cpu} ({targs.labeled_bs} + {U} + {U} "
              f"partners, patch {'x'.join(map(str, targs.patch_size))})")
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = pick_device(args.device)
    torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    out = {"task": args.task, "device": name, "torch": torch.__version__, "amp": args.amp, "compile": args.compile,
           "memory_format": args.memory_format}
    print(f"{name}, torch {torch.__version__}, amp {args.amp}, compile {args.compile}, memory_format "
          f"{args.memory_format}")
    if args.loader:
        out["loader_ms_per_batch"] = bench_loader(args, device)
    elif args.eval:
        out["eval"] = bench_eval(args, device)
    else:
        out["methods"] = {m: bench_method(args, m, device) for m in METHODS if m in args.methods}
        print(f"{'method':<18}{'batch':>7}{'ms/iter':>11}{'std':>9}{'median':>10}{'GFLOPs':>9}{'peak MB':>10}")
        for m, r in out["methods"].items():
            print(f"{m:<18}{r['batch']:>7}{r['ms_per_iter']:>11.1f}{r['ms_std']:>9.1f}{r['ms_median']:>10.1f}"
                  f"{r['gflops_per_iter']:>9.1f}{r['peak_mb']:>10,.0f}")
        res = out["methods"]
        for a, b in (("crossmatch", "supervised"), ("crossmatch_naive", "crossmatch"), ("cml", "crossmatch")):
            if a in res and b in res:
                out[f"{a}_vs_{b}"] = {"time": res[a]["ms_per_iter"] / res[b]["ms_per_iter"],
                                      "flops": res[a]["gflops_per_iter"] / res[b]["gflops_per_iter"]}
                print(f"{a} / {b}: time {out[f'{a}_vs_{b}']['time']:.2f}, FLOPs {out[f'{a}_vs_{b}']['flops']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
