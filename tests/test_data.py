import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from utils.checks import DataError
from utils.data_acdc import (ACDCSlices, acdc_slice_path, acdc_volume_path, labeled_slice_count, load_slice,
                             load_volume, slices_of_first_patients)
from utils.data_acdc import collate_two_stream as collate_acdc
from utils.data_la import LADataset, collate_two_stream, la_case_path, load_case, read_list
from utils.sampler import TwoStreamBatchSampler
from utils.synthetic import make_acdc, make_la

PATCH_3D = (16, 16, 8)


@pytest.fixture(scope="module")
def la_root(tmp_path_factory):
    return make_la(tmp_path_factory.mktemp("la"), n_train=5, n_test=1, shape=(20, 20, 12), seed=3)


@pytest.fixture(scope="module")
def acdc_root(tmp_path_factory):
    return make_acdc(tmp_path_factory.mktemp("acdc"), n_train_patients=2, n_val=1, n_test=1,
                     shape=(4, 24, 24), seed=4)


def test_read_list(tmp_path):
    p = tmp_path / "x.list"
    p.write_text("a\n  b  \n\n\nc\n")
    assert read_list(p) == ["a", "b", "c"]
    with pytest.raises(DataError, match="nope.list"):
        read_list(tmp_path / "nope.list")


def test_synthetic_la_layout(la_root):
    train = read_list(la_root / "train.list")
    test = read_list(la_root / "test.list")
    assert len(train) == 5 and len(test) == 1 and not set(train) & set(test)
    for case in train + test:
        image, label = load_case(la_case_path(la_root, case))
        assert image.dtype == np.float32 and label.dtype == np.uint8 and image.shape == label.shape
        assert image.shape[2] == 12 and set(np.unique(label)) == {0, 1}
        assert abs(image.mean()) < 1e-3 and abs(image.std() - 1) < 1e-3   # z-scored
        assert image[label == 1].mean() > image[label == 0].mean() + 1.0   # learnable contrast


def test_la_dataset_items(la_root):
    cases = read_list(la_root / "train.list")
    ds = LADataset(la_root, cases, labeled_count=2, patch_size=PATCH_3D)
    assert len(ds) == 5 and ds.labeled_idxs == [0, 1] and ds.unlabeled_idxs == [2, 3, 4]
    lab = ds[(1, 11)]
    assert lab["kind"] == "l" and lab["index"] == 1
    assert lab["image"].shape == (1, *PATCH_3D) and lab["image"].dtype == torch.float32
    assert lab["label"].shape == PATCH_3D and lab["label"].dtype == torch.int64
    unl = ds[(3, 11)]
    assert unl["kind"] == "u" and set(unl) == {"kind", "index", "image_w", "image_s1", "image_s2"}
    for k in ("image_w", "image_s1", "image_s2"):
        assert unl[k].shape == (1, *PATCH_3D) and unl[k].dtype == torch.float32
    # the deterministic pair (index, seed) -> the same sample; views differ; another seed differs
    again = ds[(3, 11)]
    assert all(torch.equal(unl[k], again[k]) for k in ("image_w", "image_s1", "image_s2"))
    assert not torch.equal(ds[(3, 12)]["image_w"], unl["image_w"])
    diffs = [not torch.equal(ds[(3, s)]["image_s1"], ds[(3, s)]["image_s2"]) for s in range(6)]
    assert sum(diffs) >= 4
    with pytest.raises(IndexError):
        ds[(5, 0)]


def test_la_cache_on_off_equal(la_root):
    cases = read_list(la_root / "train.list")
    on = LADataset(la_root, cases, 2, PATCH_3D, cache=True)
    off = LADataset(la_root, cases, 2, PATCH_3D, cache=False)
    for item in [(0, 1), (1, 2), (2, 3), (4, 4)]:
        a, b = on[item], off[item]
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))


def test_la_patch_larger_than_volume_pads(la_root):
    cases = read_list(la_root / "train.list")
    ds = LADataset(la_root, cases, 1, (32, 32, 16), cache=False)
    lab = ds[(0, 0)]
    assert lab["image"].shape == (1, 32, 32, 16)
    _, label = load_case(la_case_path(la_root, cases[0]))
    assert int(lab["label"].sum()) == int(label.sum())


def test_la_dataset_errors(la_root, tmp_path):
    with pytest.raises(ValueError, match="labeled_count"):
        LADataset(la_root, ["a"], 2, PATCH_3D, cache=False)
    with pytest.raises(DataError, match="missing_case"):
        LADataset(la_root, ["missing_case"], 1, PATCH_3D)
    bad = tmp_path / "bad.h5"
    with h5py.File(bad, "w") as h:
        h["image"] = np.zeros((4, 4, 4), np.float32)
    with pytest.raises(DataError, match="bad.h5.*label"):
        load_case(bad)


def test_loader_and_collate(la_root):
    cases = read_list(la_root / "train.list")
    ds = LADataset(la_root, cases, 2, PATCH_3D)
    sampler = TwoStreamBatchSampler(ds.labeled_idxs, ds.unlabeled_idxs, 2, 2, seed=0, num_iterations=3)
    batches = list(DataLoader(ds, batch_sampler=sampler, collate_fn=collate_two_stream))
    assert len(batches) == 3
    for it, b in enumerate(batches):
        assert b["x_l"].shape == (2, 1, *PATCH_3D) and b["y_l"].shape == (2, *PATCH_3D)
        assert b["y_l"].dtype == torch.int64 and b["x_l"].dtype == torch.float32
        for k in ("x_w", "x_s1", "x_s2"):
            assert b[k].shape == (2, 1, *PATCH_3D)
        idx = [i for i, _ in sampler.batch(it)]
        assert b["idx_l"].tolist() == idx[:2] and b["idx_u"].tolist() == idx[2:]
    # labeled stream only (supervised): empty unlabeled tensors with the right trailing shape
    sup = TwoStreamBatchSampler(ds.labeled_idxs, [], 3, 0, seed=0, num_iterations=1)
    b = next(iter(DataLoader(ds, batch_sampler=sup, collate_fn=collate_two_stream)))
    assert b["x_l"].shape == (3, 1, *PATCH_3D)
    assert b["x_w"].shape == (0, 1, *PATCH_3D) and b["idx_u"].shape == (0,)
    assert torch.cat([b["x_l"], b["x_w"]]).shape[0] == 3
    # unlabeled only
    b = collate_two_stream([ds[(3, 0)]])
    assert b["x_l"].shape == (0, 1, *PATCH_3D) and b["y_l"].shape == (0, *PATCH_3D)
    assert b["y_l"].dtype == torch.int64
    assert collate_acdc is collate_two_stream


# -------------------------------------------------------------------------------------------- ACDC


def test_synthetic_acdc_layout(acdc_root):
    train = read_list(acdc_root / "train.list")
    assert train == ["patient001_frame01", "patient001_frame02", "patient002_frame01", "patient002_frame02"]
    assert read_list(acdc_root / "val.list") == ["patient003_frame01", "patient003_frame02"]
    assert read_list(acdc_root / "test.list") == ["patient004_frame01", "patient004_frame02"]
    slices = read_list(acdc_root / "train_slices.list")
    assert len(slices) == 4 * 4 and slices[0] == "patient001_frame01_slice_1"
    for vol in train:
        image, label = load_volume(acdc_volume_path(acdc_root, vol))
        assert image.dtype == np.float64 and label.dtype == np.uint8 and image.shape[0] == 4
        assert image.min() >= 0 and image.max() <= 1
        assert set(np.unique(label[0])) == {0, 1, 2, 3}   # a basal slice has every structure
        for k in range(1, 5):
            si, sl = load_slice(acdc_slice_path(acdc_root, f"{vol}_slice_{k}"))
            assert np.array_equal(si, image[k - 1]) and np.array_equal(sl, label[k - 1])
        # blood pools brighter than myocardium
        assert image[label == 3].mean() > image[label == 2].mean() + 0.15


def test_acdc_dataset(acdc_root):
    names = read_list(acdc_root / "train_slices.list")
    ds = ACDCSlices(acdc_root, names, labeled_count=4, patch_size=(32, 32))
    off = ACDCSlices(acdc_root, names, labeled_count=4, patch_size=(32, 32), cache=False)
    lab = ds[(2, 9)]
    assert lab["kind"] == "l" and lab["image"].shape == (1, 32, 32) and lab["label"].shape == (32, 32)
    assert lab["label"].dtype == torch.int64 and int(lab["label"].max()) <= 3
    unl = ds[(10, 9)]
    assert unl["kind"] == "u" and all(unl[k].shape == (1, 32, 32) for k in ("image_w", "image_s1", "image_s2"))
    for item in [(0, 0), (3, 1), (4, 2), (15, 3)]:
        a, b = ds[item], off[item]
        assert all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))
    sampler = TwoStreamBatchSampler(ds.labeled_idxs, ds.unlabeled_idxs, 2, 3, seed=5, num_iterations=2)
    b0 = [b for b in DataLoader(ds, batch_sampler=sampler, collate_fn=collate_two_stream)]
    b2 = [b for b in DataLoader(ds, batch_sampler=sampler, collate_fn=collate_two_stream, num_workers=2)]
    for x, y in zip(b0, b2):   # worker count does not change a batch
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert b0[0]["x_s1"].shape == (3, 1, 32, 32)


def test_labeled_slice_count():
    table = {1: 32, 3: 68, 7: 136, 14: 256, 21: 396, 28: 512, 35: 664, 70: 1312}
    assert {k: labeled_slice_count(k) for k in table} == table
    for bad in (0, 2, 5, 71, "7", 7.0):
        with pytest.raises(ValueError, match=r"--labelnum.*1, 3, 7, 14, 21, 28, 35, 70"):
            labeled_slice_count(bad)


def test_slices_of_first_patients():
    names = ["patient002_frame01_slice_2", "patient002_frame02_slice_1", "patient007_frame01_slice_1",
             "patient001_frame01_slice_1"]
    assert [slices_of_first_patients(names, n) for n in range(4)] == [0, 2, 3, 4]
    with pytest.raises(ValueError, match="--labelnum 4"):
        slices_of_first_patients(names, 4)
