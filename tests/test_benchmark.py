"""code/benchmark.py on tiny shapes: the figures and the JSON it writes, the FLOPs of the three iterations, the
sliding-window and loader timings, its flag errors, and the Algorithm1AsPrinted wrapper behind crossmatch_naive."""
import json
import math

import pytest
import torch
from torch import nn

import benchmark
from networks import build_model

TINY = {"la": ["--patch_size", "32", "32", "16"],
        "acdc": ["--patch_size", "32", "32", "--batch_size", "4", "--labeled_bs", "2"]}
RESULT_KEYS = {"ms_per_iter", "ms_std", "ms_median", "ms_all", "gflops_per_iter", "peak_mb", "batch", "patch_size"}


@pytest.mark.parametrize("task", ["la", "acdc"])
def test_all_methods_tiny(task, tmp_path, one_thread):
    path = tmp_path / f"{task}.json"
    out = benchmark.main(["--task", task, *TINY[task], "--warmup", "1", "--iters", "2", "--device", "cpu",
                          "--json", str(path)])
    data = json.loads(path.read_text())
    assert data == json.loads(json.dumps(out))          # the file holds what main returned
    assert data["task"] == task and data["device"].startswith("CPU") and data["amp"] == "none"
    res = data["methods"]
    assert list(res) == list(benchmark.METHODS)         # from the smallest (the CPU peak is cumulative)
    patch = [int(s) for s in TINY[task][1:1 + (3 if task == "la" else 2)]]
    for m, r in res.items():
        assert r.keys() == RESULT_KEYS, m
        assert len(r["ms_all"]) == 2 and all(t > 0 for t in r["ms_all"])
        assert r["ms_per_iter"] == pytest.approx(sum(r["ms_all"]) / 2)
        assert r["ms_median"] == pytest.approx(r["ms_per_iter"]) and r["ms_std"] >= 0
        assert r["gflops_per_iter"] > 0 and r["peak_mb"] > 0 and math.isfinite(r["peak_mb"])
        assert r["patch_size"] == patch
    assert [r["batch"] for r in res.values()] == ["4+0", "2+2", "2+2", "4+4" if task == "la" else "2+2"]  # CML: 4+4
    # Algorithm 1 as printed encodes x_s2 twice: more FLOPs than the two-pass batching, which costs about three
    # and a half supervised iterations (2B encoder and 2(L + 3U) decoder samples against B through both, L = U =
    # B/2, plus the CutMix partners' no-grad teacher forward: U encoder and 3U decoder samples, forward only).
    # Convolution FLOPs grow with the voxels, so the ratios hardly depend on the patch (LA 3.49 and 1.06,
    # ACDC 3.66 and 1.05 here; without the partners' forward they were LA 3.13 and 1.07, ACDC 3.28 and 1.06)
    flops = {m: r["gflops_per_iter"] for m, r in res.items()}
    assert flops["crossmatch_naive"] > flops["crossmatch"] > flops["supervised"]
    ratio, naive = data["crossmatch_vs_supervised"], data["crossmatch_naive_vs_crossmatch"]
    assert ratio["flops"] == pytest.approx(flops["crossmatch"] / flops["supervised"], rel=1e-12)
    assert naive["flops"] == pytest.approx(flops["crossmatch_naive"] / flops["crossmatch"], rel=1e-12)
    assert ratio["time"] == pytest.approx(res["crossmatch"]["ms_per_iter"] / res["supervised"]["ms_per_iter"],
                                          rel=1e-12)
    assert naive["time"] == pytest.approx(
        res["crossmatch_naive"]["ms_per_iter"] / res["crossmatch"]["ms_per_iter"], rel=1e-12)
    assert 3.2 < ratio["flops"] < 3.9
    assert data["cml_vs_crossmatch"]["flops"] == pytest.approx(flops["cml"] / flops["crossmatch"], rel=1e-12)
    assert 1.03 < naive["flops"] < 1.12


def test_one_method_no_ratio(one_thread):
    out = benchmark.main(["--task", "acdc", *TINY["acdc"], "--methods", "supervised", "--warmup", "1",
                          "--iters", "1", "--device", "cpu"])
    assert out["methods"].keys() == {"supervised"}
    assert "crossmatch_vs_supervised" not in out and "crossmatch_naive_vs_crossmatch" not in out
    assert "cml_vs_crossmatch" not in out


def test_eval_tiny(tmp_path, one_thread):
    path = tmp_path / "eval.json"
    out = benchmark.main(["--eval", "--eval_shape", "40", "36", "20", "--sw_batch", "1", "2", "--device", "cpu",
                          "--json", str(path)])
    e = json.loads(path.read_text())["eval"]
    assert e == out["eval"] and "methods" not in out
    assert e.keys() == {"1", "2"}
    for r in e.values():
        assert r["s_per_volume"] > 0 and r["peak_mb"] > 0


def test_loader_tiny(tmp_path):
    """--loader on 10 tiny synthetic LA cases (8 labeled): a positive ms per batch for each worker count."""
    from utils.synthetic import make_la
    root = make_la(tmp_path / "LA", n_train=10, n_test=0, shape=(36, 36, 24), seed=0)
    out = benchmark.main(["--task", "la", "--loader", "--root_path", str(root), "--workers", "0", "2", "--batches",
                          "3", "--device", "cpu", *TINY["la"]])
    assert out["loader_ms_per_batch"].keys() == {"0", "2"} and min(out["loader_ms_per_batch"].values()) > 0


def test_flag_errors(capsys):
    for argv in (["--warmup", "0"], ["--iters", "0"], ["--methods", "unimatch"], ["--amp", "fp16"],
                 ["--task", "brats"]):
        with pytest.raises(SystemExit):
            benchmark.parse_args(argv)
    assert "--warmup and --iters must be at least 1" in capsys.readouterr().err
    # the training flags are checked by the training script's own parser, before any work
    with pytest.raises(SystemExit):
        benchmark.main(["--task", "la", "--patch_size", "64", "64", "--device", "cpu"])
    assert "--patch_size" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        benchmark.main(["--task", "acdc", "--methods", "crossmatch", "--batch_size", "4", "--labeled_bs", "4",
                        "--device", "cpu"])
    assert "--labeled_bs" in capsys.readouterr().err
    a = benchmark.parse_args([])
    assert (a.task, a.methods, a.warmup, a.iters, a.amp) == ("la", list(benchmark.METHODS), 2, 5, "none")
    assert a.batch_size is a.labeled_bs is a.patch_size is None      # the task's defaults, from its script


def freeze_statistics(net):
    """Training mode with batch norm on its running statistics and every dropout module off, so that the
    outputs do not depend on how the samples are grouped into calls."""
    net.train()
    for m in net.modules():
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)):
            m.eval()


@pytest.mark.parametrize("task,shape", [("la", (32, 32, 16)), ("acdc", (32, 32))])
def test_algorithm1_as_printed_gives_the_two_pass_outputs(task, shape):
    """The wrapper's two training-mode calls return what train_iteration splits: [l, w, P_w w, P_s w] and
    [s1, s2, P_w s2, P_s s2]. With batch norm frozen and no dropout they equal the two-pass calls; with the
    perturbations on and the same seed too (the masks are drawn level by level, weak then strong, in both).
    An eval-mode call before them (the CutMix partners' teacher forward, n_pert=U on U samples) is the
    network's own forward and is not counted: the alternation of the two passes is kept."""
    torch.manual_seed(0)
    L, U = 2, 3
    x_l, x_w, x_s1, x_s2, x_p = (torch.randn(n, 1, *shape) for n in (L, U, U, U, U))
    net = build_model(task, 0.0, 0.0)
    naive = benchmark.Algorithm1AsPrinted(net)
    with torch.no_grad():
        for perturbed in (False, True):
            net.perturb.p_weak, net.perturb.p_strong = (0.25, 0.75) if perturbed else (0.0, 0.0)
            outs = []
            for model in (net, naive):
                model.eval()                          # the partners' teacher forward, as train_iteration does it
                torch.manual_seed(4)
                p = model(x_p, n_pert=U)
                freeze_statistics(model)
                torch.manual_seed(5)
                a = model(torch.cat([x_l, x_w]), n_pert=U)
                torch.manual_seed(6)
                b = model(torch.cat([x_s1, x_s2]), n_pert=U)
                outs.append((p, a, b))
            (p, a, b), (p_naive, a_naive, b_naive) = outs
            assert p_naive.shape == p.shape == (3 * U, net.out_conv.out_channels, *shape)
            assert torch.equal(p_naive, p)
            assert a_naive.shape == a.shape == (L + 3 * U, net.out_conv.out_channels, *shape)
            assert b_naive.shape == b.shape == (4 * U, net.out_conv.out_channels, *shape)
            assert torch.allclose(a_naive, a, atol=1e-5) and torch.allclose(b_naive, b, atol=1e-5)
            if perturbed:   # the perturbations really act on the last U samples of each call, in eval mode too
                assert not torch.allclose(a[L + U:L + 2 * U], a[L:L + U], atol=1e-3)
                assert not torch.allclose(b[2 * U:3 * U], b[U:2 * U], atol=1e-3)
                assert not torch.allclose(p[U:2 * U], p[:U], atol=1e-3)
    assert naive.calls == 4


@pytest.mark.parametrize("pert_out_dropout", [False, True])
def test_algorithm1_as_printed_decodes_as_the_perturbed_forward(pert_out_dropout):
    """V-Net's perturbed forward skips the output dropout unless pert_out_dropout; the wrapper's decoder calls
    (the unperturbed d(e(x_l)) and d(e(cat(x_s1, x_s2))) included) do the same as the two-pass calls."""
    U, shape = 2, (32, 32, 16)
    net = build_model("la", pert_out_dropout=pert_out_dropout).train()
    naive = benchmark.Algorithm1AsPrinted(net)
    seen = []   # the channel counts of the Dropout3d inputs: 256 the bottleneck, 16 the decoder output
    net.dropout.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[1]))
    with torch.no_grad():
        for model in (net, naive):
            seen.clear()
            model(torch.randn(2 * U, 1, *shape), n_pert=U)
            model(torch.randn(2 * U, 1, *shape), n_pert=U)
            assert (16 in seen) == pert_out_dropout and 256 in seen, (model is naive, seen)


@pytest.mark.parametrize("partner", ["second_batch", "batch"])
def test_algorithm1_as_printed_in_train_iteration(partner, one_thread):
    """train_iteration through the wrapper: two counted calls per iteration whatever the CutMix partner (the
    second_batch partners' eval-mode forward is not counted), training mode restored, finite losses."""
    import train_acdc
    args = train_acdc.parse_args(["--patch_size", "32", "32", "--batch_size", "4", "--labeled_bs", "2",
                                  "--max_iterations", "10", "--device", "cpu", "--cutmix_partner", partner])
    g = torch.Generator().manual_seed(0)
    batch = {k: torch.randn(2, 1, 32, 32, generator=g) for k in ("x_l", "x_w", "x_s1", "x_s2")}
    if partner == "second_batch":
        batch.update({k: torch.randn(2, 1, 32, 32, generator=g) for k in ("x_w_p", "x_s1_p", "x_s2_p")})
    batch["y_l"] = torch.randint(0, 4, (2, 32, 32), generator=g)
    torch.manual_seed(0)
    net = build_model("acdc")
    naive = benchmark.Algorithm1AsPrinted(net).train()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    for it in range(2):
        logs, _ = train_acdc.train_iteration(naive, optimizer, batch, it, args, torch.device("cpu"))
        assert naive.calls == 2 * (it + 1)
        assert naive.training and net.training
        assert all(torch.isfinite(v).all() for v in logs.values())
