"""Evaluation: LA sliding-window inference, ACDC slice-by-slice prediction, the final-checkpoint choice, the checks
before any case is evaluated, the printed table, and the test_la.py / test_acdc.py command lines (tiny data, CPU)."""
import csv
import json
import math
import os
import signal
import time

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

import test_acdc
import test_la
import utils.evaluation as evaluation
from networks import build_model
from utils.checkpoint import CheckpointError, load_weights
from utils.data import case_path, load_case, write_h5
from utils.evaluation import (Table, final_checkpoint, largest_connected_component, predict_slices, sliding_window,
                              window_starts)
from utils.metrics import binary_metrics, multiclass_metrics


class Constant(nn.Module):
    """Logits that do not depend on the input: softmax (0.25, 0.75) at every voxel."""

    def __init__(self):
        super().__init__()
        self.register_buffer("logits", torch.tensor([0.0, float(np.log(3.0))]))

    def forward(self, x):
        return self.logits.view(1, 2, 1, 1, 1).expand(x.shape[0], 2, *x.shape[2:])


# ------------------------------------------------------------------------------------ sliding window (LA)
def test_window_starts_like_the_lineage():
    assert window_starts(199, 112, 18) == [0, 18, 36, 54, 72, 87]  # ceil(87 / 18) + 1 = 6, the last one flush
    assert window_starts(88, 80, 4) == [0, 4, 8]
    assert window_starts(112, 112, 18) == [0]
    assert window_starts(20, 16, 4) == [0, 4]
    assert window_starts(21, 16, 4) == [0, 4, 5]


@pytest.mark.parametrize("shape", [(21, 19, 17), (9, 19, 17), (21, 7, 5), (5, 6, 3), (16, 16, 16)])
def test_every_voxel_covered_exactly_averaged(shape):
    # smaller than the patch on one, two or all axes, odd sizes, equal to the patch
    image = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    probs, labels = sliding_window(Constant(), image, (16, 16, 8), stride_xy=5, stride_z=3)
    assert probs.shape == (2, *shape) and probs.dtype == np.float32
    np.testing.assert_allclose(probs[0], 0.25, rtol=0, atol=1e-6)
    np.testing.assert_allclose(probs[1], 0.75, rtol=0, atol=1e-6)
    assert labels.shape == shape and labels.dtype == np.uint8 and (labels == 1).all()


def test_pointwise_model_equals_whole_volume_forward():
    # a 1x1x1 convolution sees no context: windows, padding and cropping must not change its output
    torch.manual_seed(0)
    model = nn.Conv3d(1, 3, 1)
    image = np.random.default_rng(1).normal(size=(23, 13, 11)).astype(np.float32)
    probs, labels = sliding_window(model, image, (16, 16, 8), stride_xy=6, stride_z=2)
    with torch.no_grad():
        ref = torch.softmax(model(torch.from_numpy(image)[None, None]), dim=1)[0].numpy()
    np.testing.assert_allclose(probs, ref, atol=1e-6)
    np.testing.assert_array_equal(labels, ref.argmax(0))


def test_sw_batch_does_not_change_the_result():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(), nn.Conv3d(4, 2, 3, padding=1))
    image = np.random.default_rng(2).normal(size=(27, 22, 13)).astype(np.float32)
    p1, l1 = sliding_window(model, image, (16, 16, 8), stride_xy=8, stride_z=4, sw_batch=1)
    p3, l3 = sliding_window(model, image, (16, 16, 8), stride_xy=8, stride_z=4, sw_batch=4)
    np.testing.assert_allclose(p1, p3, atol=1e-6)
    np.testing.assert_array_equal(l1, l3)
    assert not model.training  # evaluation puts the model in eval mode


def test_autocast_bf16_runs_and_stays_float32():
    torch.manual_seed(0)
    model = nn.Conv3d(1, 2, 1)
    image = np.random.default_rng(3).normal(size=(18, 17, 9)).astype(np.float32)
    ref, _ = sliding_window(model, image, (16, 16, 8), stride_xy=6, stride_z=2)
    probs, _ = sliding_window(model, image, (16, 16, 8), stride_xy=6, stride_z=2, amp_dtype=torch.bfloat16)
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs, ref, atol=2e-2)


def test_largest_connected_component():
    m = np.zeros((10, 10, 10), dtype=np.uint8)
    m[0:2, 0:2, 0:2] = 1
    m[5:9, 5:9, 5:9] = 1
    m[4, 4, 4] = 1  # touches the big block only by a corner: joined under full connectivity
    out = largest_connected_component(m)
    assert out.sum() == 4 ** 3 + 1 and not out[0, 0, 0]
    assert not largest_connected_component(np.zeros((4, 4, 4))).any()


# --------------------------------------------------------------------------------- slice by slice (ACDC)
class Quantizer(nn.Module):
    """Predicts class round(3 x) at every pixel: an image equal to target / 3 yields exactly the target."""

    def forward(self, x):
        centres = torch.arange(4, dtype=x.dtype, device=x.device).view(1, 4, 1, 1)
        return -(3 * x - centres) ** 2


def volume_with_known_prediction():
    """A (4, 20, 24) label with all three classes and a prediction that shifts RV, misses Myo on every slice
    and adds LV on slice 3, where the label has none."""
    label = np.zeros((4, 20, 24), dtype=np.uint8)
    label[:, 2:8, 2:10] = 1  # RV
    label[:3, 10:16, 4:12] = 2  # Myo
    label[:3, 12:14, 6:10] = 3  # LV, inside Myo; absent from slice 3
    target = label.copy()
    target[label == 2] = 0  # Myo missing from the prediction
    target[:, 2:8, 2:10] = 0
    target[:, 4:10, 2:10] = 1  # RV shifted by 2 rows: overlap 4 of 6 rows
    target[3, 12:14, 6:10] = 3  # LV where the label has none
    return (target / 3.0).astype(np.float64), label, target


def test_quantizer_prediction_is_known_through_the_zoom():
    image, _, target = volume_with_known_prediction()
    # slices smaller than the network input: the nearest zoom there and back is exact
    pred = predict_slices(Quantizer(), image, (32, 32), batch_slices=3)
    assert pred.dtype == np.uint8 and pred.shape == image.shape
    np.testing.assert_array_equal(pred, target)


def test_batch_slices_and_larger_slices():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 4, size=(5, 40, 27)) / 3.0
    a = predict_slices(Quantizer(), image, (32, 32), batch_slices=1)
    b = predict_slices(Quantizer(), image, (32, 32), batch_slices=4)
    assert a.shape == image.shape  # zoomed down and back up to the stored size
    np.testing.assert_array_equal(a, b)


def test_acdc_volume_per_class():
    image, label, target = volume_with_known_prediction()
    pred = predict_slices(Quantizer(), image, (32, 32))
    np.testing.assert_array_equal(pred, target)
    per_class = multiclass_metrics(pred, label, test_acdc.CLASS_NAMES)
    rv, myo, lv = per_class[1], per_class[2], per_class[3]
    assert rv["dice"] == pytest.approx(4 / 6) and rv["jaccard"] == pytest.approx(4 / 8)
    assert rv["hd95"] == pytest.approx(2.0)  # shifted by two voxels
    assert myo["empty_pred"] and myo["dice"] == 0.0 and math.isnan(myo["hd95"]) and math.isnan(myo["asd"])
    # LV labelled on slices 0-2 and predicted on slices 0-3 (same 2 x 4 block): Dice 2 * 3 / (3 + 4)
    assert lv["dice"] == pytest.approx(6 / 7) and lv["jaccard"] == pytest.approx(3 / 4) and lv["asd"] >= 0
    # a class present in the prediction only, once the label is restricted to slice 3
    only_pred = multiclass_metrics(predict_slices(Quantizer(), image[3:], (32, 32)), label[3:], test_acdc.CLASS_NAMES)
    assert only_pred[3]["empty_label"] and only_pred[3]["dice"] == 0.0 and math.isnan(only_pred[3]["hd95"])
    assert only_pred[2]["both_empty"] and only_pred[2]["dice"] == 1.0 and only_pred[2]["hd95"] == 0.0


# ------------------------------------------------------------------------------------------- the table
def test_table_tiny_dice_in_scientific_notation():
    table = Table(name_width=6)
    m = binary_metrics(np.pad(np.ones((1, 1, 1)), ((0, 49), (0, 49), (0, 49))),  # a single voxel of a 50^3 cube
                       np.ones((50, 50, 50)))
    assert 0 < m["dice"] < 1e-3 and math.isfinite(m["hd95"]) and m["hd95"] > 1
    line = table.line("case01", m)
    cells = line.split()
    assert cells[0] == "case01" and cells[1] == f"{m['dice']:.2e}" and "e-" in cells[1]  # not 0.0000
    assert cells[3] == f"{m['hd95']:.4f}"  # the 95HD next to it as usual
    values = {"dice": 0.0, "jaccard": 1.0, "hd95": float("nan"), "asd": 1e-3}
    assert table.line("x", values, "empty prediction").split() == ["x", "0.0000", "1.0000", "nan", "0.0010", "empty",
                                                                   "prediction"]
    assert table.line("x", {**values, "dice": -2e-4}).split()[1] == "-2.00e-04"
    # fixed width: a column per metric, each 10 wide, under its header
    header, rule = table.header().splitlines()
    assert header.split() == ["case", "dice", "jaccard", "hd95", "asd", "note"] and set(rule) == {"-"}
    assert len(table.line("case01", m)) == 6 + 4 * 10 == header.index("  note")
    std = {f"{k}_std": 0.5 for k in ("dice", "jaccard", "hd95", "asd")}
    mean, sd = table.mean_std("LV", {**values, **std}).splitlines()
    assert mean.startswith("LV mean") and sd.split() == ["LV", "std", "0.5000", "0.5000", "0.5000", "0.5000"]


# ------------------------------------------------------------------------------------ checkpoint choice
def _fake_ckpt(path, iteration):
    torch.save({"model": {}, "iteration": iteration, "args": {}}, path)


def test_final_checkpoint_from_config(tmp_path, capsys):
    for it in (100, 200, 300):
        _fake_ckpt(tmp_path / f"iter_{it}.pth", it)
    _fake_ckpt(tmp_path / "best_model.pth", 150)
    _fake_ckpt(tmp_path / "iter_300_best.pth", 300)
    (tmp_path / "config.json").write_text(json.dumps({"args": {"max_iterations": 200}}))
    assert final_checkpoint(tmp_path) == tmp_path / "iter_200.pth"
    assert capsys.readouterr().err == ""


def test_final_checkpoint_fallback_and_errors(tmp_path, capsys):
    with pytest.raises(CheckpointError, match="no such folder"):
        final_checkpoint(tmp_path / "missing")
    (tmp_path / "config.json").write_text(json.dumps({"args": {"max_iterations": 300}}))
    _fake_ckpt(tmp_path / "best_model.pth", 150)
    with pytest.raises(CheckpointError, match=r"no iter_<N>.pth checkpoint"):
        final_checkpoint(tmp_path)
    _fake_ckpt(tmp_path / "iter_50.pth", 50)
    _fake_ckpt(tmp_path / "iter_200.pth", 200)  # an unfinished run of 300 iterations: the highest, with a warning
    assert final_checkpoint(tmp_path) == tmp_path / "iter_200.pth"
    err = capsys.readouterr().err
    assert "iter_300.pth is missing" in err and "iter_200.pth" in err
    (tmp_path / "config.json").unlink()  # no config: the highest, with a warning
    assert final_checkpoint(tmp_path) == tmp_path / "iter_200.pth"
    assert "warning" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- load_weights
def test_load_weights_names_missing_and_unexpected_keys(tmp_path):
    model = build_model("la")
    state = model.state_dict()
    keys = sorted(state)
    foreign = {k: v for k, v in state.items() if k != keys[0]}
    foreign["head.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as e:
        load_weights(build_model("la"), foreign, tmp_path / "x.pth")
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "x.pth") in msg and "VNet" in msg
    assert f"1 missing keys ['{keys[0]}']" in msg and "1 unexpected keys ['head.extra.weight']" in msg
    # a DDP-style checkpoint ("module." prefixes): every key missing, only a few named
    with pytest.raises(CheckpointError) as e:
        load_weights(build_model("la"), {f"module.{k}": v for k, v in state.items()}, "ddp.pth")
    msg = str(e.value)
    assert f"{len(keys)} missing keys {keys[:3]}" in msg and f"{len(keys)} unexpected keys" in msg
    assert f"module.{keys[0]}" in msg and len(msg) < 600
    # the right keys with a wrong shape
    wrong = {**state, keys[0]: torch.zeros(3)}
    with pytest.raises(CheckpointError, match=rf"do not fit the VNet: .*size mismatch for {keys[0]}") as e:
        load_weights(build_model("la"), wrong, "shape.pth")
    assert "\n" not in str(e.value)
    fresh = build_model("la")
    load_weights(fresh, state, "ok.pth")
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())


# ------------------------------------------------------------------------------------------ test_la CLI
SHAPE, PATCH = (24, 20, 16), [16, 16, 16]  # stride 8: 2 x 2 x 1 windows


@pytest.fixture
def la_run(tmp_path):
    """A data root with two cases and a run folder holding a V-Net checkpoint."""
    root, run = tmp_path / "LA", tmp_path / "run"
    rng = np.random.default_rng(0)
    cases = ["caseA", "caseB"]
    for case in cases:
        label = np.zeros(SHAPE, dtype=np.uint8)
        label[6:18, 5:15, 4:12] = 1
        image = (rng.normal(size=SHAPE) + 2.0 * label).astype(np.float32)
        write_h5(case_path("la", root, case), image=image, label=label)
    (root / "test.list").write_text("\n".join(cases) + "\n")
    run.mkdir()
    torch.manual_seed(0)
    args = {"task": "la", "max_iterations": 10, "patch_size": PATCH, "root_path": str(root)}
    torch.save({"model": build_model("la").state_dict(), "iteration": 10, "args": args}, run / "iter_10.pth")
    (run / "config.json").write_text(json.dumps({"args": args}))
    return root, run, cases


def test_test_la_cli(la_run):
    root, run, cases = la_run
    summary = test_la.main(["--run", str(run), "--stride_xy", "8", "--stride_z", "4", "--device", "cpu",
                            "--sw_batch", "4", "--save_nii"])
    for key in ("dice", "jaccard", "hd95", "asd", "dice_std", "hd95_std", "n_cases", "n_empty", "n_empty_label",
                "n_both_empty", "distance_policy", "checkpoint", "iteration", "list", "root_path", "device", "amp",
                "empty_distance", "stride_xy", "stride_z", "sw_batch"):
        assert key in summary
    assert summary["n_cases"] == 2 and summary["iteration"] == 10 and summary["final_checkpoint"] is True
    assert summary["lcc"] is False and summary["amp"] == "none" and summary["device"] == "cpu"
    assert summary["checkpoint"] == str(run / "iter_10.pth") and summary["patch_size"] == PATCH
    assert summary["root_path"] == str(root) and summary["list"] == str(root / "test.list")
    on_disk = json.loads((run / "eval_test" / "summary.json").read_text())
    assert on_disk["n_cases"] == 2 and on_disk["distance_policy"] == summary["distance_policy"]
    with open(run / "eval_test" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["case"] for r in rows] == cases
    assert np.mean([float(r["dice"]) for r in rows]) == pytest.approx(summary["dice"])
    assert all((run / "eval_test" / "png" / f"{c}.png").is_file() for c in cases)
    # the saved prediction is the sliding-window prediction of the checkpoint's model
    model = build_model("la")
    model.load_state_dict(torch.load(run / "iter_10.pth", weights_only=True)["model"])
    image, label = load_case("la", root, "caseA")
    _, pred = sliding_window(model, image, PATCH, stride_xy=8, stride_z=4, sw_batch=4)
    np.testing.assert_array_equal(nib.load(run / "eval_test" / "predictions" / "caseA_pred.nii.gz").get_fdata(), pred)
    np.testing.assert_array_equal(nib.load(run / "eval_test" / "predictions" / "caseA_gt.nii.gz").get_fdata(), label)
    assert float(rows[0]["dice"]) == pytest.approx(binary_metrics(pred == 1, label != 0)["dice"])


def test_test_la_cli_ckpt_and_options(la_run, tmp_path, capsys):
    _, run, _ = la_run
    state = torch.load(run / "iter_10.pth", weights_only=True)
    torch.save({**state, "iteration": 5}, tmp_path / "iter_5.pth")  # not the run's final checkpoint
    out = tmp_path / "elsewhere"
    summary = test_la.main(["--ckpt", str(tmp_path / "iter_5.pth"), "--out", str(out), "--stride_xy", "16",
                            "--stride_z", "16", "--sw_batch", "4", "--device", "cpu", "--lcc", "--empty_distance",
                            "zero", "--no_png"])
    assert summary["lcc"] is True and summary["empty_distance"] == "zero"
    assert summary["iteration"] == 5 and summary["final_checkpoint"] is False
    assert "iteration 5 is not the final one (10)" in capsys.readouterr().err
    assert (out / "summary.json").is_file() and not (out / "png").exists()
    assert not (tmp_path / "eval_test").exists()  # --out, not beside the checkpoint


def test_test_la_bare_checkpoint_with_explicit_flags(la_run, tmp_path):
    """A checkpoint holding only weights (no training flags): --root_path and --patch_size say the rest."""
    root, run, _ = la_run
    torch.save({"model": torch.load(run / "iter_10.pth", weights_only=True)["model"]}, tmp_path / "bare.pth")
    summary = test_la.main(["--ckpt", str(tmp_path / "bare.pth"), "--root_path", str(root), "--patch_size", "16", "16",
                            "16", "--stride_xy", "16", "--stride_z", "16", "--device", "cpu", "--no_png"])
    assert summary["n_cases"] == 2 and summary["patch_size"] == [16, 16, 16] and summary["iteration"] is None
    assert summary["final_checkpoint"] is False and (tmp_path / "eval_test" / "metrics.csv").is_file()


def test_test_la_cli_errors(la_run, tmp_path):
    root, run, _ = la_run
    base = ["--stride_xy", "16", "--stride_z", "16", "--device", "cpu", "--no_png"]
    with pytest.raises(SystemExit, match="no such folder"):
        test_la.main(["--run", str(tmp_path / "missing")] + base)
    with pytest.raises(SystemExit, match="nope.pth"):
        test_la.main(["--ckpt", str(tmp_path / "nope.pth")] + base)
    with pytest.raises(SystemExit, match="other.list"):
        test_la.main(["--run", str(run), "--list", "other.list"] + base)
    (root / "bad.list").write_text("ghost\ncaseA\n")
    with pytest.raises(SystemExit, match=r"1 case files missing, e.g. .*ghost"):
        test_la.main(["--run", str(run), "--list", "bad.list"] + base)
    write_h5(case_path("la", root, "caseA"), image=np.zeros(SHAPE, np.float32))
    with pytest.raises(SystemExit, match=r"caseA.*no 'label' dataset"):
        test_la.main(["--run", str(run)] + base)
    with pytest.raises(SystemExit, match=r"not 'la'"):  # an ACDC checkpoint given to the LA script
        torch.save({"model": {}, "iteration": 1, "args": {"task": "acdc"}}, tmp_path / "acdc.pth")
        test_la.main(["--ckpt", str(tmp_path / "acdc.pth")] + base)


@pytest.fixture
def no_evaluation(monkeypatch):
    """Fails the test if a model is built or a case is read or predicted."""
    def refuse(*args, **kw):
        raise AssertionError("evaluation started before the checks were done")
    monkeypatch.setattr(evaluation, "build_model", refuse)
    for name in ("load_case", "sliding_window"):
        monkeypatch.setattr(test_la, name, refuse)


@pytest.mark.parametrize("flags, match", [
    (lambda tmp, root: ["--root_path", str(tmp / "nowhere")], r"^error: data root .*nowhere: no such folder"),
    (lambda tmp, root: ["--root_path", str(tmp)], r"^error: list test.list: neither .*test.list nor .* exists"),
    (lambda tmp, root: ["--list", "val.list"], r"^error: list val.list: neither "),
], ids=["no_root", "root_without_list", "missing_list"])
def test_test_la_wrong_root_or_list_fails_before_any_evaluation(la_run, tmp_path, no_evaluation, flags, match):
    root, run, _ = la_run
    start = time.perf_counter()
    with pytest.raises(SystemExit, match=match) as e:
        test_la.main(["--run", str(run), "--device", "cpu", *flags(tmp_path, root)])
    assert "\n" not in str(e.value) and time.perf_counter() - start < 30
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "iter_10.pth"]  # nothing written


def test_test_la_foreign_checkpoint_names_missing_and_unexpected_keys(la_run, tmp_path):
    _, run, _ = la_run
    state = torch.load(run / "iter_10.pth", weights_only=True)
    keys = sorted(state["model"])
    foreign = {f"module.{k}": v for k, v in state["model"].items()}  # saved from a DDP wrapper
    torch.save({**state, "model": foreign}, tmp_path / "ddp.pth")
    with pytest.raises(SystemExit) as e:
        test_la.main(["--ckpt", str(tmp_path / "ddp.pth"), "--device", "cpu", "--no_png"])
    msg = str(e.value)
    assert msg.startswith(f"error: checkpoint {tmp_path / 'ddp.pth'}: its weights do not fit the VNet")
    assert "\n" not in msg
    assert f"{len(keys)} missing keys ['{keys[0]}'" in msg and f"unexpected keys ['module.{keys[0]}'" in msg
    torch.save({**state, "model": build_model("acdc").state_dict()}, tmp_path / "unet.pth")  # another network
    with pytest.raises(SystemExit, match=r"do not fit the VNet: \d+ missing keys \['.+'.*\d+ unexpected keys \['.+'"):
        test_la.main(["--ckpt", str(tmp_path / "unet.pth"), "--device", "cpu", "--no_png"])
    assert not (tmp_path / "eval_test").exists()


# ---------------------------------------------------------------------------------------- test_acdc CLI
@pytest.fixture
def acdc_run(tmp_path):
    root, run = tmp_path / "ACDC", tmp_path / "run"
    rng = np.random.default_rng(0)
    names = ["patient001_frame01", "patient002_frame12"]
    for name in names:
        label = np.zeros((3, 24, 20), dtype=np.uint8)
        label[:, 4:10, 4:10], label[:, 12:20, 6:14], label[:, 14:18, 8:12] = 1, 2, 3
        image = np.clip(label / 3.0 + rng.normal(0, 0.05, label.shape), 0, 1)
        write_h5(case_path("acdc", root, name), image=image, label=label)
    (root / "test.list").write_text("\n".join(names) + "\n")
    run.mkdir()
    args = {"task": "acdc", "max_iterations": 20, "patch_size": [32, 32], "root_path": str(root)}
    torch.manual_seed(0)
    torch.save({"model": build_model("acdc").state_dict(), "iteration": 20, "args": args}, run / "iter_20.pth")
    (run / "config.json").write_text(json.dumps({"args": args}))
    return root, run, names


def test_test_acdc_cli(acdc_run):
    root, run, names = acdc_run
    summary = test_acdc.main(["--run", str(run), "--device", "cpu", "--batch_slices", "2", "--save_nii"])
    assert summary["n_cases"] == 2 and summary["iteration"] == 20 and summary["patch_size"] == [32, 32]
    assert summary["batch_slices"] == 2 and summary["final_checkpoint"] is True
    assert set(summary["per_class"]) == {"RV", "Myo", "LV"}
    for key in ("dice", "jaccard", "hd95", "asd", "n_empty", "n_empty_label", "n_both_empty", "distance_policy"):
        assert key in summary and key in summary["per_class"]["RV"]
    assert summary["dice"] == pytest.approx(np.mean([summary["per_class"][c]["dice"] for c in ("RV", "Myo", "LV")]))
    with open(run / "eval_test" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["case"], r["class"]) for r in rows] == [(n, c) for n in names for c in ("RV", "Myo", "LV")]
    on_disk = json.loads((run / "eval_test" / "summary.json").read_text())  # strict JSON: NaN written as null
    assert on_disk["per_class"]["LV"]["n_cases"] == 2
    assert all((run / "eval_test" / "png" / f"{n}.png").is_file() for n in names)
    # the saved prediction is the slice-by-slice prediction of the checkpoint's model, scored per class
    model = build_model("acdc")
    model.load_state_dict(torch.load(run / "iter_20.pth", weights_only=True)["model"])
    image, label = load_case("acdc", root, names[0])
    pred = predict_slices(model, image, (32, 32), batch_slices=2)
    np.testing.assert_array_equal(nib.load(run / "eval_test" / "predictions" / f"{names[0]}_pred.nii.gz").get_fdata(), pred)
    lv = multiclass_metrics(pred, label, test_acdc.CLASS_NAMES)[3]
    assert float(rows[2]["dice"]) == pytest.approx(lv["dice"])


def test_test_acdc_cli_errors(acdc_run, tmp_path):
    root, run, _ = acdc_run
    with pytest.raises(SystemExit, match="not 'acdc'"):  # an LA checkpoint given to the ACDC script
        torch.save({"model": {}, "iteration": 1, "args": {"task": "la"}}, tmp_path / "la.pth")
        test_acdc.main(["--ckpt", str(tmp_path / "la.pth"), "--device", "cpu"])
    (root / "bad.list").write_text("patient009_frame01\n")
    with pytest.raises(SystemExit, match="patient009_frame01.h5"):
        test_acdc.main(["--run", str(run), "--list", "bad.list", "--device", "cpu", "--no_png"])
    image = np.full((3, 24, 20), 2.0)
    image[0, 0, 0] = 1.5
    write_h5(case_path("acdc", root, "patient002_frame12"), image=image, label=np.zeros((3, 24, 20), np.uint8))
    with pytest.raises(SystemExit, match=r"patient002_frame12.h5: image intensities in \[1.5, 2\], expected \[0, 1\]"):
        test_acdc.main(["--run", str(run), "--device", "cpu", "--no_png"])


@pytest.mark.parametrize("during", ["inference", "png"])
def test_a_stop_signal_ends_the_evaluation_with_one_line_and_nothing_half_written(acdc_run, capsys, monkeypatch,
                                                                                   during):
    """SIGTERM while the second volume is predicted, or while the first volume's png is written: one line, exit
    143; the png of the first volume is whole (the write is finished first), no metrics.csv or summary.json. The
    handlers are put back afterwards."""
    from skimage import io
    root, run, names = acdc_run
    real_predict, real_save = evaluation.predict_slices, io.imsave
    calls = []

    def predict(*args, **kw):
        calls.append("predict")
        if during == "inference" and calls.count("predict") == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_predict(*args, **kw)

    def imsave(path, *args, **kw):
        if during == "png":
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)  # the handler has run: the signal is held, not raised
        calls.append("png")
        return real_save(path, *args, **kw)
    monkeypatch.setattr(test_acdc, "predict_slices", predict)
    monkeypatch.setattr(io, "imsave", imsave)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        test_acdc.main(["--run", str(run), "--device", "cpu"])
    assert e.value.code == 143
    err = capsys.readouterr().err.strip()
    assert err == ("error: stopped by SIGTERM while evaluating on test.list: metrics.csv and summary.json not "
                   "written; start the evaluation again"), err
    out = run / "eval_test"
    assert calls == ["predict", "png", "predict"] if during == "inference" else ["predict", "png"]
    assert io.imread(out / "png" / f"{names[0]}.png").ndim == 3
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == [f"{names[0]}.png"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
