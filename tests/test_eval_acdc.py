"""ACDC evaluation: slice-wise prediction against a known answer, per-class metrics, the test_acdc.py CLI."""
import csv
import json
import math

import h5py
import numpy as np
import pytest
import torch
from torch import nn

import test_acdc
from networks import UNet
from utils.evaluation import predict_volume_slices


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
    pred = predict_volume_slices(Quantizer(), image, (32, 32), batch_slices=3)
    assert pred.dtype == np.uint8 and pred.shape == image.shape
    np.testing.assert_array_equal(pred, target)


def test_batch_slices_and_larger_slices():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 4, size=(5, 40, 27)) / 3.0
    a = predict_volume_slices(Quantizer(), image, (32, 32), batch_slices=1)
    b = predict_volume_slices(Quantizer(), image, (32, 32), batch_slices=4)
    assert a.shape == image.shape  # zoomed down and back up to the stored size
    np.testing.assert_array_equal(a, b)


def test_evaluate_volume_per_class():
    image, label, target = volume_with_known_prediction()
    pred, per_class = test_acdc.evaluate_volume(Quantizer(), image, label, (32, 32))
    np.testing.assert_array_equal(pred, target)
    rv, myo, lv = per_class[1], per_class[2], per_class[3]
    assert rv["dice"] == pytest.approx(4 / 6) and rv["jaccard"] == pytest.approx(4 / 8)
    assert rv["hd95"] == pytest.approx(2.0)  # shifted by two voxels
    assert myo["empty_pred"] and myo["dice"] == 0.0 and math.isnan(myo["hd95"]) and math.isnan(myo["asd"])
    # LV labelled on slices 0-2 and predicted on slices 0-3 (same 2 x 4 block): Dice 2 * 3 / (3 + 4)
    assert lv["dice"] == pytest.approx(6 / 7) and lv["jaccard"] == pytest.approx(3 / 4) and lv["asd"] >= 0
    # a class present in the prediction only, once the label is restricted to slice 3
    _, only_pred = test_acdc.evaluate_volume(Quantizer(), image[3:], label[3:], (32, 32))
    assert only_pred[3]["empty_label"] and only_pred[3]["dice"] == 0.0 and math.isnan(only_pred[3]["hd95"])
    assert only_pred[2]["both_empty"] and only_pred[2]["dice"] == 1.0 and only_pred[2]["hd95"] == 0.0


# --------------------------------------------------------------------------------------------- test_acdc CLI
@pytest.fixture
def acdc_run(tmp_path):
    root, run = tmp_path / "ACDC", tmp_path / "run"
    (root / "data").mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = ["patient001_frame01", "patient002_frame12"]
    for name in names:
        label = np.zeros((3, 24, 20), dtype=np.uint8)
        label[:, 4:10, 4:10], label[:, 12:20, 6:14], label[:, 14:18, 8:12] = 1, 2, 3
        image = np.clip(label / 3.0 + rng.normal(0, 0.05, label.shape), 0, 1)
        with h5py.File(root / "data" / f"{name}.h5", "w") as f:
            f["image"], f["label"] = image, label
    (root / "test.list").write_text("\n".join(names) + "\n")
    run.mkdir()
    args = {"task": "acdc", "max_iterations": 20, "patch_size": [32, 32], "root_path": str(root)}
    torch.manual_seed(0)
    torch.save({"model": UNet(in_chns=1, class_num=4).state_dict(), "iteration": 20, "args": args},
               run / "iter_20.pth")
    (run / "config.json").write_text(json.dumps({"args": args}))
    return root, run, names


def test_test_acdc_cli(acdc_run):
    root, run, names = acdc_run
    summary = test_acdc.main(["--run", str(run), "--device", "cpu", "--batch_slices", "2", "--save_nii"])
    assert summary["n_cases"] == 2 and summary["iteration"] == 20 and summary["patch_size"] == [32, 32]
    assert set(summary["per_class"]) == {"RV", "Myo", "LV"}
    for key in ("dice", "jaccard", "hd95", "asd", "n_empty", "n_empty_label", "n_both_empty", "distance_policy"):
        assert key in summary and key in summary["per_class"]["RV"]
    assert summary["dice"] == pytest.approx(np.mean([summary["per_class"][c]["dice"] for c in ("RV", "Myo", "LV")]))
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["case"], r["class"]) for r in rows] == [(n, c) for n in names for c in ("RV", "Myo", "LV")]
    on_disk = json.loads((run / "summary.json").read_text())  # strict JSON: NaN written as null
    assert on_disk["per_class"]["LV"]["n_cases"] == 2
    assert all((run / "png" / f"{n}.png").is_file() for n in names)
    assert (run / "predictions" / f"{names[0]}_pred.nii.gz").is_file()


def test_test_acdc_cli_errors(acdc_run, tmp_path):
    root, run, _ = acdc_run
    with pytest.raises(SystemExit, match="not 'acdc'"):  # an LA checkpoint given to the ACDC script
        torch.save({"model": {}, "iteration": 1, "args": {"task": "la"}}, tmp_path / "la.pth")
        test_acdc.main(["--ckpt", str(tmp_path / "la.pth"), "--device", "cpu"])
    (root / "bad.list").write_text("patient009_frame01\n")
    with pytest.raises(SystemExit, match="patient009_frame01.h5"):
        test_acdc.main(["--run", str(run), "--list", "bad.list", "--device", "cpu", "--no_png"])
