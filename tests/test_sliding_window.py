"""LA sliding-window inference, checkpoint selection and the test_la.py command line on a tiny synthetic root."""
import csv
import json

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

import test_la
from networks import VNet
from utils.evaluation import find_checkpoint, largest_connected_component
from utils.sliding_window import sliding_window_inference, window_starts


class Constant(nn.Module):
    """Logits that do not depend on the input: softmax (0.25, 0.75) at every voxel."""

    def __init__(self):
        super().__init__()
        self.register_buffer("logits", torch.tensor([0.0, float(np.log(3.0))]))

    def forward(self, x):
        return self.logits.view(1, 2, 1, 1, 1).expand(x.shape[0], 2, *x.shape[2:])


def test_window_starts_like_the_lineage():
    assert window_starts(199, 112, 18) == [0, 18, 36, 54, 72, 87]  # ceil(87 / 18) + 1 = 6, last one flush
    assert window_starts(88, 80, 4) == [0, 4, 8]
    assert window_starts(112, 112, 18) == [0]
    assert window_starts(20, 16, 4) == [0, 4]
    with pytest.raises(ValueError):
        window_starts(10, 16, 4)


@pytest.mark.parametrize("shape", [(21, 19, 17), (9, 19, 17), (21, 7, 5), (5, 6, 3), (16, 16, 16)])
def test_every_voxel_covered_exactly_averaged(shape):
    # smaller than the patch on one, two or all axes, odd sizes, equal to the patch
    image = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    probs, labels = sliding_window_inference(Constant(), image, (16, 16, 8), stride_xy=5, stride_z=3)
    assert probs.shape == (2, *shape) and probs.dtype == np.float32
    np.testing.assert_allclose(probs[0], 0.25, rtol=0, atol=1e-6)
    np.testing.assert_allclose(probs[1], 0.75, rtol=0, atol=1e-6)
    assert labels.shape == shape and labels.dtype == np.uint8 and (labels == 1).all()


def test_pointwise_model_equals_whole_volume_forward():
    # a 1x1x1 convolution sees no context: windows, padding and cropping must not change its output
    torch.manual_seed(0)
    model = nn.Conv3d(1, 3, 1)
    image = np.random.default_rng(1).normal(size=(23, 13, 11)).astype(np.float32)
    probs, labels = sliding_window_inference(model, image, (16, 16, 8), stride_xy=6, stride_z=2)
    with torch.no_grad():
        ref = torch.softmax(model(torch.from_numpy(image)[None, None]), dim=1)[0].numpy()
    np.testing.assert_allclose(probs, ref, atol=1e-6)
    np.testing.assert_array_equal(labels, ref.argmax(0))


def test_sw_batch_does_not_change_the_result():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(), nn.Conv3d(4, 2, 3, padding=1))
    image = np.random.default_rng(2).normal(size=(27, 22, 13)).astype(np.float32)
    p1, l1 = sliding_window_inference(model, image, (16, 16, 8), stride_xy=8, stride_z=4, sw_batch=1)
    p3, l3 = sliding_window_inference(model, image, (16, 16, 8), stride_xy=8, stride_z=4, sw_batch=4)
    np.testing.assert_allclose(p1, p3, atol=1e-6)
    np.testing.assert_array_equal(l1, l3)
    assert not model.training  # evaluation puts the model in eval mode


def test_autocast_bf16_runs_and_stays_float32():
    torch.manual_seed(0)
    model = nn.Conv3d(1, 2, 1)
    image = np.random.default_rng(3).normal(size=(18, 17, 9)).astype(np.float32)
    ref, _ = sliding_window_inference(model, image, (16, 16, 8), stride_xy=6, stride_z=2)
    probs, _ = sliding_window_inference(model, image, (16, 16, 8), stride_xy=6, stride_z=2, amp_dtype=torch.bfloat16)
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


# ------------------------------------------------------------------------------------------ checkpoint choice
def _fake_ckpt(path, iteration, max_iterations=None):
    args = {} if max_iterations is None else {"max_iterations": max_iterations}
    torch.save({"model": {}, "iteration": iteration, "args": args}, path)


def test_find_checkpoint_final_from_config(tmp_path):
    for it in (100, 200, 300):
        _fake_ckpt(tmp_path / f"iter_{it}.pth", it)
    _fake_ckpt(tmp_path / "best_model.pth", 150)
    _fake_ckpt(tmp_path / "iter_300_best.pth", 300)
    (tmp_path / "config.json").write_text(json.dumps({"args": {"max_iterations": 200}}))
    assert find_checkpoint(tmp_path) == tmp_path / "iter_200.pth"


def test_find_checkpoint_from_checkpoint_args_and_fallback(tmp_path, capsys):
    _fake_ckpt(tmp_path / "iter_100.pth", 100, max_iterations=100)
    assert find_checkpoint(tmp_path) == tmp_path / "iter_100.pth"
    assert capsys.readouterr().err == ""
    _fake_ckpt(tmp_path / "iter_50.pth", 50, max_iterations=300)
    _fake_ckpt(tmp_path / "iter_200.pth", 200, max_iterations=300)  # unfinished run of 300 iterations
    assert find_checkpoint(tmp_path) == tmp_path / "iter_200.pth"
    assert "iter_300.pth does not exist" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- test_la CLI
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
        d = root / "2018LA_Seg_Training Set" / case
        d.mkdir(parents=True)
        with h5py.File(d / "mri_norm2.h5", "w") as f:
            f["image"], f["label"] = image, label
    (root / "test.list").write_text("\n".join(cases) + "\n")
    run.mkdir()
    torch.manual_seed(0)
    args = {"task": "la", "max_iterations": 10, "patch_size": PATCH, "root_path": str(root)}
    torch.save({"model": VNet(n_channels=1, n_classes=2).state_dict(), "iteration": 10, "args": args},
               run / "iter_10.pth")
    (run / "config.json").write_text(json.dumps({"args": args}))
    return root, run, cases


def test_test_la_cli(la_run):
    root, run, cases = la_run
    summary = test_la.main(["--run", str(run), "--stride_xy", "8", "--stride_z", "4", "--device", "cpu",
                            "--sw_batch", "4", "--save_nii"])
    for key in ("dice", "jaccard", "hd95", "asd", "dice_std", "hd95_std", "n_cases", "n_empty", "n_empty_label",
                "n_both_empty", "distance_policy", "checkpoint", "iteration", "list"):
        assert key in summary
    assert summary["n_cases"] == 2 and summary["iteration"] == 10 and summary["final_checkpoint"] is True
    assert summary["lcc"] is False
    assert summary["checkpoint"] == str(run / "iter_10.pth") and summary["patch_size"] == PATCH
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk["n_cases"] == 2 and on_disk["distance_policy"] == summary["distance_policy"]
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["case"] for r in rows] == cases
    assert np.mean([float(r["dice"]) for r in rows]) == pytest.approx(summary["dice"])
    assert all((run / "png" / f"{c}.png").is_file() for c in cases)
    # the saved prediction is the sliding-window prediction of the checkpoint's model
    model = VNet(n_channels=1, n_classes=2)
    model.load_state_dict(torch.load(run / "iter_10.pth", weights_only=True)["model"])
    with h5py.File(root / "2018LA_Seg_Training Set" / "caseA" / "mri_norm2.h5") as f:
        image = f["image"][()]
    _, pred = sliding_window_inference(model, image, PATCH, stride_xy=8, stride_z=4, sw_batch=4)
    np.testing.assert_array_equal(nib.load(run / "predictions" / "caseA_pred.nii.gz").get_fdata(), pred)


def test_test_la_cli_ckpt_and_options(la_run, tmp_path):
    _, run, _ = la_run
    out = tmp_path / "elsewhere"
    summary = test_la.main(["--ckpt", str(run / "iter_10.pth"), "--out", str(out), "--stride_xy", "16",
                            "--stride_z", "16", "--sw_batch", "4", "--device", "cpu", "--lcc", "--empty_distance", "zero",
                            "--no_png"])
    assert summary["lcc"] is True and summary["empty_distance"] == "zero"
    assert (out / "summary.json").is_file() and not (out / "png").exists()


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
    with pytest.raises(SystemExit, match="ghost"):
        test_la.main(["--run", str(run), "--list", "bad.list"] + base)
    with h5py.File(root / "2018LA_Seg_Training Set" / "caseA" / "mri_norm2.h5", "a") as f:
        del f["label"]
    with pytest.raises(SystemExit, match=r"caseA.*label"):
        test_la.main(["--run", str(run)] + base)
