"""Tiny ``train_iteration`` runs shared by test_gpu_settings.py (the GPU settings on the CPU) and test_cuda.py:
the eight configurations (LA and ACDC; CrossMatch with either preset, supervised, CML), their flags at a tiny
size, a synthetic host batch, and a few iterations of a network from one seed."""
import copy

import torch

import train_acdc
import train_acdc_cml
import train_la
import train_la_cml
from networks import build_cml, build_model
from utils.training import make_optimizer, memory_format

# LA: not 16^3, whose V-Net stages 4 and 5 are 2^3 and 1^3 voxels: on the CPU (torch 2.13, oneDNN) a bf16
# Conv3d's weight gradient over an input whose first spatial extent is 2 is garbage, different on every call
# (up to 1e36), and a 1-voxel bottleneck leaves batch norm 2 values per channel; 48 x 16 x 16 gives stages of
# 6 x 2 x 2 and 3 x 1 x 1
SHAPES = {"la": (48, 16, 16), "acdc": (32, 32)}
N_CLASSES = {"la": 2, "acdc": 4}
# tau low enough for a network at initialisation to keep part of its pseudo-labels (2 classes: confidences >= 0.5)
CONF = {"la": "0.6", "acdc": "0.3"}
CONFIGS = [(task, method) for task in ("la", "acdc") for method in ("paper", "release", "supervised", "cml")]


def script_of(task: str, method: str):
    if method == "cml":
        return train_la_cml if task == "la" else train_acdc_cml
    return train_la if task == "la" else train_acdc


def parse(task: str, method: str, *extra):
    """The script's flags for a tiny run: batch 2 + 2 (supervised: 4 labeled; LA CML 4 + 4), tiny patches, CPU;
    CML pre-trains for one iteration, then self-trains."""
    flags = ["--device", "cpu", "--patch_size", *map(str, SHAPES[task]), "--batch_size", "4", "--labeled_bs", "2",
             "--max_iterations", "10"]
    if method == "cml":  # LA: CutMix pairs of 2 (a V-Net's 1^3 bottleneck needs 2 samples for its batch norm)
        flags += ["--pre_iterations", "1"] + (["--batch_size", "8", "--labeled_bs", "4"] if task == "la" else [])
    elif method == "supervised":
        flags += ["--method", "supervised"]
    else:
        flags += ["--preset", method, "--conf_thresh", CONF[task], "--conf_ramp", "0"]
    return script_of(task, method).parse_args(flags + list(extra))


def make_batch(task: str, args, seed: int = 0) -> dict:
    """A host batch of the shapes the loader gives (``collate_two_stream``), with CutMix partners."""
    g = torch.Generator().manual_seed(seed)
    shape = SHAPES[task]
    L = args.batch_size if args.method == "supervised" else args.labeled_bs
    U = args.batch_size - L
    batch = {"x_l": torch.randn((L, 1) + shape, generator=g),
             "y_l": torch.randint(0, N_CLASSES[task], (L,) + shape, generator=g)}
    for key in ("x_w", "x_s1", "x_s2", "x_w_p", "x_s1_p", "x_s2_p"):
        batch[key] = torch.randn((U, 1) + shape, generator=g)
    return batch


def make_net(task: str, method: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_cml(task) if method == "cml" else build_model(task)


def train(task, method, args, net, device, n_iterations, wrap=None, batch=None, after=None):
    """``n_iterations`` of the script's ``train_iteration`` from iteration 0 on a copy of ``net`` (moved to
    ``device`` in the layout ``args.memory_format`` gives there; ``wrap``: e.g. ``torch.compile``; ``after(it)``
    runs after each iteration). Returns the logged terms of each iteration as floats, and the trained copy."""
    net = copy.deepcopy(net).to(device, memory_format=memory_format(device, len(SHAPES[task]), args.memory_format))
    net.train()
    optimizer = make_optimizer(net, args)
    model = wrap(net) if wrap else net
    batch = make_batch(task, args) if batch is None else batch
    script, out = script_of(task, method), []
    for it in range(n_iterations):
        logs, _ = script.train_iteration(model, optimizer, batch, it, args, device)
        out.append({k: float(v) for k, v in logs.items()})
        if after is not None:
            after(it)
    return out, net


def largest_difference(a: list, b: list) -> float:
    """The largest absolute difference of any logged term in any iteration."""
    return max(abs(x[k] - y[k]) for x, y in zip(a, b, strict=True) for k in x)
