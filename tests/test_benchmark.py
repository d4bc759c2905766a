"""code/benchmark.py on tiny shapes: the JSON it writes, FLOPs of the naive against the two-pass iteration,
the ratios, and the sliding-window evaluation timing."""
import json
import math

import pytest
import torch

import benchmark

# one thread: on a shared 2-core machine two OpenMP threads can wait on each other for seconds per iteration
TINY = {"la": ["--patch_size", "32", "32", "16", "--threads", "1"],
        "acdc": ["--patch_size", "64", "64", "--batch_size", "4", "--labeled_bs", "2", "--threads", "1"]}
RESULT_KEYS = {"ms_per_iter", "ms_std", "params", "gflops_per_iter", "peak_mem_mb", "saved_for_backward_mb",
               "peak_tensor_mb"}
PARAMS = {"la": 9_448_866, "acdc": 1_813_764}


@pytest.mark.parametrize("task", ["la", "acdc"])
def test_all_methods_tiny(task, tmp_path):
    path = tmp_path / f"{task}.json"
    threads_before = torch.get_num_threads()
    out = benchmark.main(["--task", task, *TINY[task], "--iters", "1", "--warmup", "2", "--device", "cpu",
                          "--json", str(path)])
    data = json.loads(path.read_text())
    assert data["results"].keys() == set(benchmark.METHODS)
    for key in ("ratio", "naive_vs_crossmatch", "flop_ratio", "device_name", "torch", "threads", "flags",
                "peak_mem_method", "time_method"):
        assert key in data, key
    assert data["flags"]["task"] == task and data["flags"]["iters"] == 1 and data["flags"]["warmup"] == 2
    for m, r in data["results"].items():
        assert RESULT_KEYS <= r.keys(), m
        assert r["ms_per_iter"] > 0 and r["gflops_per_iter"] > 0 and r["peak_mem_mb"] > 0
        assert r["params"] == PARAMS[task]
        assert len(r["ms_all"]) == 1
        assert all(math.isfinite(v) for v in r["last_losses"].values())
    res = data["results"]
    # Algorithm 1 as printed encodes x_s2 twice: more FLOPs than the two-pass batching
    assert res["crossmatch_naive"]["gflops_per_iter"] > res["crossmatch"]["gflops_per_iter"]
    assert res["crossmatch"]["gflops_per_iter"] > res["supervised"]["gflops_per_iter"]
    # and keeps more for the backward pass: without the weights (kept by every convolution), CrossMatch's
    # activations are about three supervised batches' worth, the naive iteration's more
    saved = {m: r["saved_for_backward_mb"] - 4 * r["params"] / 2 ** 20 for m, r in res.items()}
    assert saved["crossmatch_naive"] > saved["crossmatch"] and saved["supervised"] > 0
    assert 2.5 < saved["crossmatch"] / saved["supervised"] < 4.0
    # the peak of live tensors holds at least what is saved for backward (weights included) plus the optimizer
    # state, alive all along (two copies of the weights for AdamW, LA; one for SGD momentum, ACDC)
    for m, r in res.items():
        weights_mb = 4 * r["params"] / 2 ** 20
        assert r["peak_tensor_mb"] >= r["saved_for_backward_mb"] + (1 if task == "acdc" else 2) * weights_mb, m
    assert res["crossmatch"]["peak_tensor_mb"] > res["supervised"]["peak_tensor_mb"]
    assert data["ratio"] == pytest.approx(res["crossmatch"]["ms_per_iter"] / res["supervised"]["ms_per_iter"],
                                          rel=1e-12)
    assert data["naive_vs_crossmatch"] == pytest.approx(
        res["crossmatch_naive"]["ms_per_iter"] / res["crossmatch"]["ms_per_iter"], rel=1e-12)
    assert data["flop_ratio"] == pytest.approx(
        res["crossmatch"]["gflops_per_iter"] / res["supervised"]["gflops_per_iter"], rel=1e-12)
    assert out["ratio"] == data["ratio"]
    assert data["threads"] == 1 and torch.get_num_threads() == threads_before   # restored after main()
    # the FLOPs follow the stream counts: supervised B = L + U samples through encoder and decoder; two-pass
    # CrossMatch 2B encoder and 2(L + 3U) decoder samples (about 3x with L = U); naive U more encoder samples
    assert 2.8 < data["flop_ratio"] < 3.5
    assert 1.03 < data["flop_ratio_naive_vs_crossmatch"] < 1.12


def test_eval_tiny(tmp_path):
    path = tmp_path / "eval.json"
    benchmark.main(["--eval", *TINY["la"], "--eval_shape", "40", "36", "20", "--sw_batches", "1", "3",
                    "--device", "cpu", "--json", str(path)])
    e = json.loads(path.read_text())["eval"]
    assert e["windows"] == 2 * 2 * 2    # ceil((40-32)/18)+1, ceil((36-32)/18)+1, ceil((20-16)/4)+1
    assert set(e["sw_batch"]) == {"1", "3"}
    assert e["sw_batch"]["3"]["forward_calls"] == 3
    assert e["speedup_vs_baseline"]["1"] == pytest.approx(1.0)
    assert e["sw_batch"]["1"]["s_per_volume"] > 0
    assert e["max_abs_prob_diff_between_sw_batches"] < 1e-4


def test_flag_errors():
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--task", "acdc", "--eval"])
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--task", "la", "--patch_size", "64", "64"])
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--warmup", "0"])
    a = benchmark.parse_args(["--task", "acdc"])
    assert (a.batch_size, a.labeled_bs, a.patch_size) == (24, 12, [256, 256])
    a = benchmark.parse_args([])
    assert (a.task, a.batch_size, a.labeled_bs, a.patch_size) == ("la", 4, 2, [112, 112, 80])


def test_strip_flags_for_the_subprocesses():
    argv = ["--task", "la", "--methods", "supervised", "crossmatch", "--json", "x.json", "--isolate", "--iters", "2"]
    kept = benchmark._strip_flags(argv, {"--json": 1, "--isolate": 0, "--methods": None})
    assert kept == ["--task", "la", "--iters", "2"]


def test_isolated_subprocess(tmp_path):
    """--isolate: the method runs in a fresh process of the script; its max RSS is the peak."""
    path = tmp_path / "iso.json"
    data = benchmark.main(["--task", "acdc", "--patch_size", "32", "32", "--batch_size", "2", "--labeled_bs", "1",
                           "--threads", "1", "--methods", "supervised", "--iters", "1", "--warmup", "1",
                           "--device", "cpu", "--isolate", "--json", str(path)])
    assert data["results"].keys() == {"supervised"} and data["ratio"] is None
    assert "fresh process" in data["peak_mem_method"]
    r = json.loads(path.read_text())["results"]["supervised"]
    assert r["peak_mem_mb"] > 50 and r["params"] == PARAMS["acdc"]


def test_tensor_peak_counts_live_storages_only():
    mb = 2 ** 20
    keep = torch.zeros(mb // 4)                      # 1 MiB, existing before
    with benchmark.TensorPeak([keep, keep[:10]]) as tracker:   # a view shares the storage: counted once
        a = torch.ones(mb // 4)                      # 2 MiB live
        del a                                        # back to 1
        b = torch.ones(mb // 2)                      # 2 MiB buffer: 3 live
        c = b.view(2, -1)                            # a view: no new storage
        del b, c                                     # back to 1
        d = [torch.ones(mb // 4) for _ in range(3)]  # 4 live
        del d
    assert tracker.peak == 4 * mb
    assert tracker.current == mb
