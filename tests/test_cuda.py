"""The first tests on a GPU machine (skipped without CUDA; docs/PERFORMANCE.md, the GPU plan): the two-pass
iteration on the GPU in fp32, bf16, compiled and channels-last against the CPU's, no host synchronisation
inside an iteration, a short train_la.py run to a checkpoint and its evaluation on the GPU, and the peak memory
of a paper-size LA CrossMatch iteration (printed). Runs with torch 2.11 and later."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import benchmark
from networks.feature_perturbation import FeaturePerturbation
from iterations import SHAPES, largest_difference, make_batch, make_net, parse, script_of, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
REPO = Path(__file__).resolve().parents[1]
CPU, GPU = torch.device("cpu"), torch.device("cuda")
ITERATIONS = 3


@pytest.fixture
def exact_fp32():
    """fp32 convolutions and matrix products without TF32, whose 10-bit mantissa would hide a real difference."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def without_dropout(net):
    """The CPU and the GPU draw other dropout masks from the same seed: every rate 0, the feature perturbations'
    too (P_w and P_s then leave the features as they are), so that both compute the same function."""
    for m in net.modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd):
            m.p = 0.0
        if isinstance(m, FeaturePerturbation):
            m.p_weak = m.p_strong = 0.0
    return net


# setting -> (extra flags, wrap, tolerance of the logged terms over three iterations against the CPU in fp32);
# bf16 and compiled in the GPU's default layout (--memory_format auto: channels-last), as the runs use them
SETTINGS = {
    "fp32": (["--memory_format", "contiguous"], None, 5e-3),
    "channels_last": (["--memory_format", "channels_last"], None, 5e-3),
    "bf16": (["--amp", "bf16"], None, 0.02),
    "compiled": ([], torch.compile, 5e-3),
}


@pytest.mark.parametrize("task", ["la", "acdc"])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_two_pass_iteration_on_the_gpu_equals_the_cpu(task, setting, exact_fp32):
    """CrossMatch (paper preset), three iterations at the tiny size: the GPU's logged terms against the CPU's in
    fp32 (the first iteration's within 1e-4 except bf16), the GPU's own layout and dtypes as asked."""
    extra, wrap, tolerance = SETTINGS[setting]
    net = without_dropout(make_net(task, "paper"))
    cpu, _ = train(task, "paper", parse(task, "paper"), net, CPU, ITERATIONS)
    args = parse(task, "paper", "--device", "cuda", *extra)
    gpu, trained = train(task, "paper", args, net, GPU, ITERATIONS, wrap=wrap)
    assert next(trained.parameters()).is_cuda
    first, every = largest_difference(cpu[:1], gpu[:1]), largest_difference(cpu, gpu)
    print(f"\n{task} {setting}: GPU against CPU, largest difference iteration 1 {first:.1e}, all {every:.1e}")
    assert every <= tolerance and (setting == "bf16" or first <= 1e-4)


@pytest.mark.parametrize("task,method", [("la", "paper"), ("la", "supervised"), ("acdc", "release"),
                                         ("acdc", "supervised")])
def test_no_host_synchronisation_inside_an_iteration(task, method):
    """torch.cuda.set_sync_debug_mode('error') around iterations 2 and 3 (the first one sets up cuDNN and the
    optimizer state): any .item(), .cpu(), a pageable copy or a tensor in an ``if`` raises. The batch is pinned,
    as the loader pins it on a GPU. (CML's pseudo-labels go to the host by design: docs/PERFORMANCE.md.)"""
    args = parse(task, method, "--device", "cuda")
    net = make_net(task, method).to(GPU, memory_format=torch.channels_last_3d if task == "la" else torch.channels_last)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3) if args.optimizer == "adamw" else torch.optim.SGD(
        net.parameters(), lr=0.01, momentum=0.9)
    batch = {k: v.pin_memory() for k, v in make_batch(task, args).items()}
    script = script_of(task, method)
    script.train_iteration(net, optimizer, batch, 0, args, GPU)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for it in (1, 2):
            logs, _ = script.train_iteration(net, optimizer, batch, it, args, GPU)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(v) for v in logs.values())


def test_train_la_on_the_gpu_to_a_checkpoint_and_its_evaluation(syn_la, tmp_path):
    """train_la.py --device cuda --amp bf16 --compile, 20 iterations on tiny synthetic cases, then test_la.py on
    the GPU with batched bf16 windows: a final checkpoint and a summary.json with a Dice."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    code = REPO / "code"
    r = subprocess.run([sys.executable, str(code / "train_la.py"), "--root_path", str(syn_la), "--out_dir",
                        str(tmp_path), "--exp", "gpu", "--device", "cuda", "--amp", "bf16", "--compile", "--labelnum",
                        "2", "--patch_size", *map(str, SHAPES["la"]), "--max_iterations", "20", "--num_workers", "2",
                        "--log_every", "5"], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = tmp_path / "LA_gpu_2_labeled"
    assert (run_dir / "iter_20.pth").is_file()
    r = subprocess.run([sys.executable, str(code / "test_la.py"), "--run", str(run_dir), "--device", "cuda", "--amp",
                        "bf16", "--sw_batch", "4", "--stride_xy", "8", "--stride_z", "8"], capture_output=True,
                       text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((run_dir / "eval_test" / "summary.json").read_text())
    assert summary["device"].startswith("cuda") and 0.0 <= summary["dice"] <= 1.0 and summary["n_cases"] == 2


@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_paper_size_la_crossmatch_iteration_memory(amp):
    """One paper-size LA CrossMatch iteration (2 + 2 at 112 x 112 x 80, 2 CutMix partners), through
    code/benchmark.py: its time and torch.cuda.max_memory_allocated printed, and it fits the GPU."""
    torch.cuda.reset_peak_memory_stats()
    out = benchmark.main(["--task", "la", "--device", "cuda", "--methods", "crossmatch", "--amp", amp, "--warmup", "2",
                          "--iters", "5"])
    figures = out["methods"]["crossmatch"]
    print(f"\nLA CrossMatch paper size, amp {amp}: {figures['ms_per_iter']:.1f} ms per iteration, "
          f"max_memory_allocated {figures['peak_mb']:,.0f} MB")
    assert 0 < figures["peak_mb"] < torch.cuda.get_device_properties(0).total_memory / 2**20
