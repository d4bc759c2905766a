"""The GPU settings, exercised on the CPU before a GPU is lent (issue 19; docs/PERFORMANCE.md, GPU settings):
the device placement of every tensor an iteration makes, the channels-last layout, bf16 autocast, batched and
bf16 evaluation, and torch.compile, for LA and ACDC, CrossMatch (both presets), supervised and CML, at tiny
sizes (iterations.py). The tolerances are stated beside each test with what was measured."""
import math
from collections import namedtuple

import pytest
import torch
import torch._dynamo
import torch._inductor.config as inductor_config
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode

import iterations
from iterations import CONFIGS, SHAPES, largest_difference, make_batch, make_net, parse, script_of, train
from networks import build_cml
from test_resume import Interrupt, logged_scalars
from utils import losses
from utils.evaluation import predict_slices, sliding_window
from utils.training import make_optimizer

CPU = torch.device("cpu")


Seen = namedtuple("Seen", "dtype device shape")


class Record(TorchDispatchMode):
    """Every aten call's name and its tensor outputs, as the kernels see them (after autocast); ``inside`` names
    the region a call was made in (``marked``)."""

    def __init__(self):
        super().__init__()
        self.calls, self.inside = [], None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else [out]
        self.calls.append((str(func), [Seen(o.dtype, o.device, tuple(o.shape)) for o in outs
                                       if isinstance(o, torch.Tensor)], self.inside))
        return out

    def marked(self, fn, name):
        """``fn`` with its calls recorded as made inside ``name``."""
        def wrapped(*a, **kw):
            self.inside = name
            try:
                return fn(*a, **kw)
            finally:
                self.inside = None
        return wrapped


# ------------------------------------------------------------------------------------- device placement
@pytest.mark.parametrize("task,method", CONFIGS)
def test_every_tensor_an_iteration_makes_is_on_the_input_device(task, method, monkeypatch):
    """Two iterations on the meta device, which holds no data: a host round trip of a device tensor (.item(),
    .cpu(), .numpy(), a tensor in an ``if``) raises there, and a tensor made on the host shows up as a CPU
    output. The only CPU tensors an iteration may make are 0-dim: the random draws of the CutMix boxes and
    cuboids read as Python numbers, the optimizer's step counters, Python scalars. CML's pseudo-labels (the
    largest connected component, scipy on the host) are the one documented round trip: stood in for here by the
    plain argmax and counted."""
    args = parse(task, method)
    script = script_of(task, method)
    host_calls = []
    if method == "cml":
        monkeypatch.setattr(script, "pseudo_labels", lambda logits: host_calls.append(1) or logits.argmax(1))
    meta = torch.device("meta")
    net = make_net(task, method).to(meta).train()
    optimizer = make_optimizer(net, args)
    batch = make_batch(task, args)
    record = Record()
    with record:
        for it in range(2):
            logs, shown = script.train_iteration(net, optimizer, batch, it, args, meta)
    assert all(v.device == meta for v in logs.values()) and all(v.device == meta for v in shown.values())
    on_host = [(name, t.shape) for name, outs, _ in record.calls for t in outs if t.device.type == "cpu"]
    assert all(shape == () for _, shape in on_host), [c for c in on_host if c[1] != ()][:5]
    assert len(host_calls) == (2 if method == "cml" else 0)  # CML self-trains in iteration 1: two subnets


# ----------------------------------------------------------------------------------------- channels-last
@pytest.mark.parametrize("task,method", CONFIGS)
def test_channels_last_forced_on_the_cpu_gives_the_default_layout_losses(task, method, one_thread):
    """--memory_format channels_last (on a GPU the default): weights and every network input in that layout,
    and the losses of two iterations those of the default layout within 1e-4 (measured: at most 2e-6; a pseudo-
    label flipped by a rounding difference after the first step would move a tiny Dice by about 1e-4)."""
    net = make_net(task, method)
    for m in net.modules():  # element-wise dropout draws its mask in memory order: other masks in another layout
        if type(m) is torch.nn.Dropout:
            m.p = 0.0
    fmt = torch.channels_last_3d if task == "la" else torch.channels_last
    seen = []
    default, _ = train(task, method, parse(task, method, "--memory_format", "contiguous"), net, CPU, 2)
    args = parse(task, method, "--memory_format", "channels_last")

    def watch(model):
        model.register_forward_pre_hook(lambda m, inputs: seen.append(inputs[0].is_contiguous(memory_format=fmt)))
        convs = [m.weight for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))]
        assert convs and all(w.is_contiguous(memory_format=fmt) for w in convs)
        return model
    last, _ = train(task, method, args, net, CPU, 2, wrap=watch)
    assert seen and all(seen), seen
    first, both = largest_difference(default[:1], last[:1]), largest_difference(default, last)
    print(f"\nchannels-last {task} {method}: largest difference, iteration 1 {first:.1e}, iteration 2 {both:.1e}")
    assert first <= 5e-5 and both <= 5e-3


# ------------------------------------------------------------------------------------------------- bf16
BF16_ITERATIONS = 3


@pytest.mark.parametrize("task,method", CONFIGS)
def test_bf16_stays_near_fp32_and_its_criteria_compute_in_float32(task, method, monkeypatch, one_thread):
    """--amp bf16 for three iterations: every logged term finite and within 0.02 of fp32 (measured at most
    4.9e-3; bf16 keeps 8 bits of mantissa, about 0.4 % per rounding), CML's within 0.1 (measured 4.6e-2: a
    pseudo-label flipped near a tie can change which connected component is the largest). Every softmax of the
    iteration (the teachers' confidences, the Dice terms) and every operation inside the criteria (Dice, cross-
    entropy, CML's conflict loss) computes in float32, while the convolutions run in bf16."""
    net = make_net(task, method)
    fp32, _ = train(task, method, parse(task, method), net, CPU, BF16_ITERATIONS)
    script = script_of(task, method)
    record = Record()
    for name in ("supervised_loss", "conflict_loss"):
        if hasattr(script, name):
            monkeypatch.setattr(script, name, record.marked(getattr(script, name), "criteria"))
    for key, fn in list(losses.UNSUP_CRITERIA.items()):
        monkeypatch.setitem(losses.UNSUP_CRITERIA, key, record.marked(fn, "criteria"))
    with record:
        bf16, _ = train(task, method, parse(task, method, "--amp", "bf16"), net, CPU, BF16_ITERATIONS)
    assert all(math.isfinite(v) for logs in bf16 for v in logs.values()), bf16
    criteria = {t.dtype for name, outs, inside in record.calls if inside and "detach" not in name for t in outs
                if t.dtype.is_floating_point}
    assert criteria == {torch.float32}, criteria
    softmax = [t.dtype for name, outs, _ in record.calls if "softmax" in name and "backward" not in name for t in outs]
    assert softmax and set(softmax) == {torch.float32}
    conv = {t.dtype for name, outs, _ in record.calls if name.startswith("aten.convolution.") for t in outs}
    assert conv == {torch.bfloat16}
    difference = largest_difference(fp32, bf16)
    print(f"\nbf16 vs fp32 {task} {method}: largest difference of a logged term over {BF16_ITERATIONS} "
          f"iterations {difference:.2e}")
    assert difference <= (0.1 if method == "cml" else 0.02)


# ------------------------------------------------------------------------------------------- evaluation
def sharpened(net):
    """A network at initialisation with its output layer scaled up, so that its labels are not all near ties."""
    for m in net.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)) and m.out_channels in (2, 4):
            m.weight.data *= 20
    return net.eval()


def near_tie_check(label, other, margin, tie: float) -> int:
    """Labels equal wherever the fp32 one-window top-two margin is at least ``tie``; returns how many differ."""
    differ = label != other
    assert not (differ & (margin >= tie)).any(), f"{int((differ & (margin >= tie)).sum())} labels differ off ties"
    return int(differ.sum())


def top_two_margin(probs):
    top = torch.as_tensor(probs).topk(2, dim=0).values
    return (top[0] - top[1]).numpy()


@pytest.mark.parametrize("method", ["crossmatch", "cml"])
def test_batched_and_bf16_windows_give_one_window_fp32_labels(method, one_thread):
    """LA sliding window, 64 x 28 x 24 volume, 48 x 16 x 16 windows at stride 8 (18 windows; the last call of
    --sw_batch 4 holds 2): ``--sw_batch 4`` and ``--sw_batch 4 --amp bf16`` against one window at a time in fp32.
    Batched fp32: the same labels wherever the top-two probability margin is at least 1e-4, and probabilities within
    1e-5; bf16: the same labels wherever the margin is at least 0.05 (counts printed; measured in
    docs/PERFORMANCE.md)."""
    net = sharpened(build_cml("la") if method == "cml" else make_net("la", method))
    image = torch.randn((64, 28, 24), generator=torch.Generator().manual_seed(1)).numpy()
    kw = dict(patch_size=SHAPES["la"], stride_xy=8, stride_z=8, device="cpu")
    probs, label = sliding_window(net, image, sw_batch=1, **kw)
    margin = top_two_margin(probs)
    probs4, label4 = sliding_window(net, image, sw_batch=4, **kw)
    assert abs(probs4 - probs).max() <= 1e-5
    n_fp32 = near_tie_check(label, label4, margin, 1e-4)
    _, label_bf16 = sliding_window(net, image, sw_batch=4, amp_dtype=torch.bfloat16, **kw)
    n_bf16 = near_tie_check(label, label_bf16, margin, 0.05)
    print(f"\nLA {method}: of {label.size} voxels, {n_fp32} labels differ with --sw_batch 4, {n_bf16} with bf16 "
          f"(fp32 margin < 0.05 at {(margin < 0.05).sum()} voxels)")
    assert n_bf16 < 0.05 * label.size


@pytest.mark.parametrize("method", ["crossmatch", "cml"])
def test_batched_and_bf16_slices_give_one_slice_fp32_labels(method, one_thread):
    """ACDC slices already at the patch size (no zoom): 16 slices per forward call, in fp32 and bf16, against one
    slice at a time in fp32; the same tie rules as the LA windows."""
    net = sharpened(build_cml("acdc") if method == "cml" else make_net("acdc", method))
    image = torch.rand((12, 32, 32), generator=torch.Generator().manual_seed(1)).numpy()
    label = predict_slices(net, image, SHAPES["acdc"], batch_slices=1)
    with torch.no_grad():
        margin = top_two_margin(net(torch.from_numpy(image)[:, None]).float().softmax(1).transpose(0, 1))
    n_fp32 = near_tie_check(label, predict_slices(net, image, SHAPES["acdc"], batch_slices=16), margin, 1e-4)
    label_bf16 = predict_slices(net, image, SHAPES["acdc"], batch_slices=16, amp_dtype=torch.bfloat16)
    n_bf16 = near_tie_check(label, label_bf16, margin, 0.05)
    print(f"\nACDC {method}: of {label.size} pixels, {n_fp32} labels differ with 16 slices per call, {n_bf16} with "
          f"bf16 (fp32 margin < 0.05 at {(margin < 0.05).sum()} pixels)")
    assert n_bf16 < 0.05 * label.size


# ------------------------------------------------------------------------------------------------ compile
@pytest.fixture(scope="module")
def dynamo():
    """A clean dynamo cache and counters for this module, and inductor's random numbers drawn by the eager
    kernels (``fallback_random``), so that compiled dropout masks equal eager ones and the losses can be
    compared. The cache stays across this module's tests: a configuration that compiles the graphs of an
    earlier one compiles nothing new (both CrossMatch presets share the network's graphs)."""
    torch._dynamo.reset()
    counters.clear()
    before = inductor_config.fallback_random
    inductor_config.fallback_random = True
    yield counters
    inductor_config.fallback_random = before
    torch._dynamo.reset()


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


# inductor (the GPU runs' backend) for CrossMatch, whose graphs are the network's with its perturbed decoder;
# supervised and CML with aot_eager: dynamo's capture, its guards and recompilations, and AOT autograd, all
# but inductor's code generation (a cold inductor compile costs a minute per network on this CPU)
BACKEND = {"paper": "inductor", "release": "inductor", "supervised": "aot_eager", "cml": "aot_eager"}
# graphs per configuration: CrossMatch the training forward (passes A and B have one shape) and the eval-mode
# CutMix-partner forward; supervised one; CML the training forward (pre-training, and self-training's mixed
# halves) and self-training's no-grad pseudo-label forward
MAX_GRAPHS = {"paper": 2, "release": 2, "supervised": 1, "cml": 2}


@pytest.mark.parametrize("task,method", CONFIGS)
def test_compiled_iterations_equal_eager_with_bounded_compilations(task, method, dynamo, one_thread):
    """Three iterations of the compiled network against eager (CML: pre-training, then self-training): the first
    iteration's terms within 1e-5 (measured at most 1.2e-7), all within 5e-3 (after a step the weights differ by
    rounding, which AdamW's normalised step and a flipped pseudo-label or confidence mask magnify; measured at
    most 1.3e-3, LA). At most MAX_GRAPHS graphs, none compiled by the last iteration, no graph break."""
    args = parse(task, method)
    net = make_net(task, method)
    eager, _ = train(task, method, args, net, CPU, 3)
    before, compiled = graphs(), []
    result, _ = train(task, method, args, net, CPU, 3, wrap=lambda m: torch.compile(m, backend=BACKEND[method]),
                      after=lambda it: compiled.append(graphs()))
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert compiled[-1] - before <= MAX_GRAPHS[method] and compiled[-1] == compiled[-2], (before, compiled)
    assert largest_difference(eager[:1], result[:1]) <= 1e-5
    assert largest_difference(eager, result) <= 5e-3
    print(f"\ncompile {task} {method} ({BACKEND[method]}): graphs compiled by iterations 1, 2, 3: "
          f"{[b - a for a, b in zip([before] + compiled, compiled)]}; largest difference "
          f"{largest_difference(eager, result):.1e}")


@pytest.mark.parametrize("task", ["la", "acdc"])
def test_compiled_command_line_with_validation_and_resume(task, dynamo, syn_la, syn_acdc, tmp_path, monkeypatch,
                                                          one_thread):
    """``train_<task>.py --compile`` (inductor) for three iterations, stopped after two and resumed, against the
    same command eager: the logged terms within 5e-3 at every iteration (as above). The first run compiles at most two
    graphs, all in its first iteration; ACDC's --val_every 1 evaluates the plain network after every iteration
    and compiles nothing; the resumed run (a new process would start with an empty cache: reset here) compiles
    at most the same two graphs again, and nothing breaks a graph."""
    script = script_of(task, "paper")
    root = syn_la if task == "la" else syn_acdc
    flags = ["--root_path", str(root), "--out_dir", str(tmp_path), "--device", "cpu", "--patch_size",
             *map(str, SHAPES[task]), "--batch_size", "4", "--labeled_bs", "2", "--max_iterations", "3",
             "--labelnum", "2" if task == "la" else "1", "--conf_thresh", iterations.CONF[task], "--num_workers", "0",
             "--log_every", "1", "--save_every", "1"] + (["--val_every", "1"] if task == "acdc" else [])
    eager_dir = script.main(flags + ["--exp", "eager"])
    seen = []  # graphs compiled so far, at the start and the end of each iteration
    real = script.train_iteration

    def counting(model, optimizer, batch, it, args, device):
        if it == 2 and not args.resume:
            raise Interrupt(f"stopped before iteration {it}")
        seen.append(("start", it, graphs()))
        out = real(model, optimizer, batch, it, args, device)
        seen.append(("end", it, graphs()))
        return out
    monkeypatch.setattr(script, "train_iteration", counting)
    torch._dynamo.reset()  # count this run's own compilations, not those of the tests before it
    before = graphs()
    with pytest.raises(Interrupt):
        script.main(flags + ["--exp", "compiled", "--compile"])
    first_run = seen[-1][2] - before
    torch._dynamo.reset()
    seen.append(("resume", 2, graphs()))
    compiled_dir = script.main(flags + ["--exp", "compiled", "--compile", "--resume"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    counts = [g for *_, g in seen]
    assert 0 < first_run <= 2 and counts[1] == counts[2] == counts[3], seen  # iteration 2 and the hook: none
    assert 0 < counts[-1] - counts[-3] <= first_run, seen
    eager, compiled = logged_scalars(eager_dir), logged_scalars(compiled_dir)
    assert set(eager) == set(compiled) and all(len(v) == 3 for k, v in compiled.items() if k != "val/mean_dice")
    difference = max(abs(compiled[k][s][-1] - eager[k][s][-1]) for k in eager for s in eager[k])
    print(f"\ncompiled command line {task}: graphs {seen}; largest difference of a logged value {difference:.1e}")
    assert difference <= 5e-3


def test_default_loader_workers_from_the_cores():
    """--num_workers when not given: a third of the cores, at most the 5 that feed a GPU iteration, at least 1."""
    from utils.flags import default_workers
    assert [default_workers(n) for n in (1, 2, 3, 8, 16, 64)] == [1, 1, 1, 2, 5, 5]
    assert iterations.parse("la", "paper").num_workers == default_workers()
