"""The data on disk: lists, h5 files, the checks every case passes when it is loaded, the training set and its
loader, the ACDC labeled split, and check_data.py (on tiny synthetic roots)."""
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import check_data
import train_acdc
import train_la
from utils.data import (LABELED_SLICES, N_CLASSES, DataError, TrainSet, acdc_labeled_slices, case_path, check_case,
                        find_list, load_case, patient_of, read_h5, read_list, write_h5)
from utils.augment import strong_2d
from utils.sampler import TwoStreamBatchSampler, collate_two_stream

REPO = Path(__file__).resolve().parents[1]
PATCH_3D = (16, 16, 16)


def expect(match, fn, *args, **kw):
    """``fn`` raises a one-line DataError matching ``match``; returns the message."""
    with pytest.raises(DataError, match=match) as e:
        fn(*args, **kw)
    assert "\n" not in str(e.value)
    return str(e.value)


def arrays(path):
    with h5py.File(path) as h:
        return h["image"][()], h["label"][()]


# ------------------------------------------------------------------------------------------------ lists
def test_read_list(tmp_path):
    p = tmp_path / "x.list"
    p.write_text("a\n  b  \n\n\nc\n")
    assert read_list(p) == ["a", "b", "c"]
    p.write_bytes("\ufeffa\r\nb\r\n".encode("utf-8"))  # a list saved by a Windows editor
    assert read_list(p) == ["a", "b"]
    expect("nope.list", read_list, tmp_path / "nope.list")
    p.write_text("\n  \n")
    expect(r"x.list: empty", read_list, p)
    p.write_text("a\nb\na\n")
    expect(r"x.list: entry 'a' appears more than once", read_list, p)
    p.write_bytes(b"a\n\xff\xfe\n")
    expect(r"x.list: cannot be read as a text list", read_list, p)


def test_find_list(syn_la, tmp_path):
    assert find_list(syn_la, "train.list") == syn_la / "train.list"
    other = tmp_path / "mine.list"
    other.write_text("synla_000\n")
    assert find_list(syn_la, other) == other  # a path outside the root works too
    assert find_list(syn_la, str(syn_la / "test.list")) == syn_la / "test.list"
    expect(r"data root .*nowhere: no such folder \(pass --root_path\)", find_list, tmp_path / "nowhere", "train.list")
    msg = expect("other.list", find_list, syn_la, "other.list")
    assert str(syn_la / "other.list") in msg


# --------------------------------------------------------------------------------------------- h5 files
def test_case_path(tmp_path):
    assert case_path("la", tmp_path, "c1") == tmp_path / "2018LA_Seg_Training Set" / "c1" / "mri_norm2.h5"
    assert case_path("acdc", tmp_path, "patient001_frame01") == tmp_path / "data" / "patient001_frame01.h5"
    assert (case_path("acdc", tmp_path, "patient001_frame01_slice_3")
            == tmp_path / "data" / "slices" / "patient001_frame01_slice_3.h5")


def test_write_h5_read_h5(tmp_path):
    path = tmp_path / "sub" / "x.h5"
    image, label = np.arange(24, dtype=np.float64).reshape(2, 3, 4), np.ones((2, 3, 4), np.uint8)
    write_h5(path, image=image, label=label)
    assert [p.name for p in path.parent.iterdir()] == ["x.h5"]  # no temporary file left
    got_image, got_label = read_h5(path)
    assert got_image.dtype == np.float64 and got_label.dtype == np.uint8  # stored dtypes kept
    np.testing.assert_array_equal(got_image, image)
    np.testing.assert_array_equal(got_label, label)
    assert len(read_h5(path, ("label",))) == 1
    msg = expect(r"no 'mask' dataset \(expected \['image', 'mask'\], found \['image', 'label'\]\)", read_h5, path,
                 ("image", "mask"))
    assert str(path) in msg
    assert str(tmp_path / "y.h5") in expect("case file not found", read_h5, tmp_path / "y.h5")
    path.write_bytes(b"not an h5 file")
    assert str(path) in expect("unreadable h5 file", read_h5, path)
    write_h5(path, image=np.zeros((64, 64, 64), np.float32), label=label)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated: the header is there, the data is not
    assert str(path) in expect("unreadable h5 file", read_h5, path)


# ------------------------------------------------------------------------------------ synthetic layouts
def test_synthetic_la_layout(syn_la):
    train = read_list(syn_la / "train.list")
    test = read_list(syn_la / "test.list")
    assert len(train) == 5 and len(test) == 2 and not set(train) & set(test)
    for case in train + test:
        image, label = load_case("la", syn_la, case)
        assert image.dtype == np.float32 and label.dtype == np.uint8 and image.shape == label.shape
        assert image.shape[2] == 24 and set(np.unique(label)) == {0, 1}
        assert abs(image.mean()) < 1e-3 and abs(image.std() - 1) < 1e-3  # z-scored
        assert image[label == 1].mean() > image[label == 0].mean() + 1.0  # learnable contrast


def test_synthetic_acdc_layout(syn_acdc):
    train = read_list(syn_acdc / "train.list")
    assert train == ["patient001_frame01", "patient001_frame02", "patient002_frame01", "patient002_frame02",
                     "patient003_frame01", "patient003_frame02"]
    assert read_list(syn_acdc / "val.list") == ["patient004_frame01", "patient004_frame02"]
    assert read_list(syn_acdc / "test.list") == ["patient005_frame01", "patient005_frame02"]
    slices = read_list(syn_acdc / "train_slices.list")
    assert len(slices) == 6 * 6 and slices[0] == "patient001_frame01_slice_1"
    for vol in train:
        image, label = load_case("acdc", syn_acdc, vol)
        assert image.dtype == np.float64 and label.dtype == np.uint8 and image.shape[0] == 6
        assert image.min() >= 0 and image.max() <= 1
        assert set(np.unique(label[0])) == {0, 1, 2, 3}  # a basal slice has every structure
        for k in range(1, 7):
            si, sl = load_case("acdc", syn_acdc, f"{vol}_slice_{k}")
            assert np.array_equal(si, image[k - 1]) and np.array_equal(sl, label[k - 1])
        # blood pools brighter than myocardium
        assert image[label == 3].mean() > image[label == 2].mean() + 0.15


# ------------------------------------------------------------------------------- checks of a loaded case
def test_la_missing_root_list_case(syn_la, tmp_path):
    la = shutil.copytree(syn_la, tmp_path / "LA")
    expect("nowhere", find_list, tmp_path / "nowhere", "train.list")
    expect("other.list", find_list, la, "other.list")
    msg = expect("case file not found", load_case, "la", la, "ghost_case")
    assert str(case_path("la", la, "ghost_case")) in msg
    # a training run refuses the same (TrainSet reads and checks every case of the list)
    expect(r"ghost_case.*mri_norm2.h5", TrainSet, "la", la, ["synla_000", "ghost_case"], 1, PATCH_3D)


LA_BAD_CASES = [
    (lambda im, lb: dict(image=im), r"no 'label' dataset"),
    (lambda im, lb: dict(label=lb), r"no 'image' dataset"),
    (lambda im, lb: dict(image=im, label=lb[:-1]), r"image \(\d+, \d+, 24\) and label \(\d+, \d+, 24\), expected "
                                                   r"two equal 3D shapes"),
    (lambda im, lb: dict(image=im[..., 0], label=lb[..., 0]), r"expected two equal 3D shapes"),
    (lambda im, lb: dict(image=im[:0], label=lb[:0]), r"image \(0, \d+, 24\).*expected two equal 3D shapes"),
    (lambda im, lb: dict(image=(im * 100).astype(np.int16), label=lb), r"image int16 and label uint8, expected a "
                                                                       r"float image and an integer label"),
    (lambda im, lb: dict(image=im, label=lb.astype(np.float32)), r"label float32, expected a float image"),
    (lambda im, lb: dict(image=np.where(lb > 0, np.nan, im).astype(np.float32), label=lb), r"non-finite"),
    (lambda im, lb: dict(image=np.where(lb > 0, np.inf, im).astype(np.float32), label=lb), r"non-finite"),
    (lambda im, lb: dict(image=im, label=np.where(lb > 0, 2, 0).astype(np.uint8)), r"label values \[2\] outside "
                                                                                    r"the classes 0..1"),
    (lambda im, lb: dict(image=im, label=np.where(lb > 0, -1, 0).astype(np.int8)), r"label values \[-1\]"),
]


@pytest.mark.parametrize("mutate, match", LA_BAD_CASES, ids=[
    "no_label", "no_image", "shape_mismatch", "2d", "zero_size", "int_image", "float_label", "nan", "inf",
    "label_2", "label_negative"])
def test_la_bad_case_file(syn_la, tmp_path, mutate, match):
    write_h5(case_path("la", tmp_path, "bad"), **mutate(*arrays(case_path("la", syn_la, "synla_000"))))
    msg = expect(match, load_case, "la", tmp_path, "bad")
    assert str(case_path("la", tmp_path, "bad")) in msg


def test_la_not_an_h5(tmp_path):
    path = case_path("la", tmp_path, "bad")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not an h5 file")
    assert str(path) in expect("unreadable h5 file", load_case, "la", tmp_path, "bad")


def test_a_damaged_gzip_chunk_is_named_in_training_and_by_check_data(syn_la, tmp_path, capsys):
    """The published LA files are gzip-chunked: bytes zeroed inside one compressed chunk of the image give one line
    naming the file, from the training script (when the training set reads it) and from check_data.py."""
    la = shutil.copytree(syn_la, tmp_path / "LA")
    path = case_path("la", la, "synla_001")
    image, label = arrays(path)
    path.unlink()
    with h5py.File(path, "w") as h:
        h.create_dataset("image", data=image, chunks=(8, 8, 8), compression="gzip")
        h.create_dataset("label", data=label, chunks=(8, 8, 8), compression="gzip")
        chunk = h["image"].id.get_chunk_info(0)
    with open(path, "r+b") as f:
        f.seek(chunk.byte_offset + chunk.size // 2)
        f.write(bytes(16))
    expected = f"error: {path}: unreadable h5 file (OSError: "
    with pytest.raises(SystemExit) as e:
        train_la.main(["--root_path", str(la), "--out_dir", str(tmp_path / "runs"), "--labelnum", "2", "--patch_size",
                       "16", "16", "16", "--device", "cpu", "--num_workers", "0"])
    assert str(e.value.code).startswith(expected) and "\n" not in str(e.value.code), e.value.code
    assert check_data_error(capsys, ["--task", "la", "--root_path", str(la)]).startswith(expected)
    assert not (tmp_path / "runs").exists()


def test_check_case_accepts_what_the_lineage_stores():
    image, label = np.zeros((4, 5, 6), np.float32), np.zeros((4, 5, 6), np.uint8)
    image[0, 0, 0] = 1.0
    check_case("x.h5", image, label, 3, 2)
    check_case("x.h5", image.astype(np.float64) - 3.0, label.astype(np.int64) + 1, 3, 2)  # z-scored, int64 labels
    check_case("x.h5", image * 100 - 100, label, 3, 2)  # the LA bound, +-100, is allowed
    check_case("x.h5", image[0], label[0] + 3, 2, 4, unit_range=True)  # intensity 1.0 and label 3 are valid
    expect(r"intensities in \[0, 1.1\], expected \[0, 1\]", check_case, "x.h5", image[0] * 1.1, label[0], 2, 4,
           unit_range=True)
    expect(r"intensities in \[-100.1, -?0\], expected z-scored values within \+-100", check_case, "x.h5",
           image * -100.1, label, 3, 2)
    expect(r"image of one value \(0\) everywhere", check_case, "x.h5", image * 0, label, 3, 2)
    expect(r"image of one value \(0.5\) everywhere", check_case, "x.h5", image[0] * 0 + 0.5, label[0], 2, 4,
           unit_range=True)


@pytest.mark.parametrize("mutate, match", [
    (lambda im, lb: dict(image=im, label=np.where(lb > 0, 4, 0).astype(np.uint8)), r"label values \[4\] outside the "
                                                                                    r"classes 0..3"),
    (lambda im, lb: dict(image=im * 2 + 0.5, label=lb), r"intensities in \[.*\], expected \[0, 1\]"),
    (lambda im, lb: dict(image=im - im.min() - 0.01, label=lb), r"intensities in \[-0.01, .*\], expected \[0, 1\]"),
    (lambda im, lb: dict(image=im[None], label=lb[None]), r"expected two equal 2D shapes"),
    (lambda im, lb: dict(image=im), r"no 'label'"),
    (lambda im, lb: dict(image=im, label=lb[:, :-2]), r"expected two equal 2D shapes"),
], ids=["label_4", "range_high", "range_low", "3d_slice", "no_label", "shape_mismatch"])
def test_acdc_bad_slice(syn_acdc, tmp_path, mutate, match):
    name = "patient009_frame01_slice_2"
    write_h5(case_path("acdc", tmp_path, name),
             **mutate(*arrays(case_path("acdc", syn_acdc, "patient001_frame01_slice_2"))))
    assert str(case_path("acdc", tmp_path, name)) in expect(match, load_case, "acdc", tmp_path, name)


def test_acdc_bad_volume(syn_acdc, tmp_path):
    image, label = arrays(case_path("acdc", syn_acdc, "patient004_frame02"))
    write_h5(case_path("acdc", tmp_path, "patient004_frame02"), image=image[0], label=label[0])
    msg = expect(r"expected two equal 3D shapes", load_case, "acdc", tmp_path, "patient004_frame02")
    assert str(case_path("acdc", tmp_path, "patient004_frame02")) in msg
    assert str(case_path("acdc", tmp_path, "patient004_frame01")) in expect(
        "case file not found", load_case, "acdc", tmp_path, "patient004_frame01")


# ---------------------------------------------------------------------------------------- training set
def test_la_trainset_items(syn_la):
    cases = read_list(syn_la / "train.list")
    ds = TrainSet("la", syn_la, cases, n_labeled=2, patch_size=PATCH_3D)
    assert len(ds) == 5
    assert all(lb is not None for lb in ds.labels[:2]) and all(lb is None for lb in ds.labels[2:])  # unlabeled:
    lab = ds[(1, 11, "l")]                                                                           # labels unread
    assert lab["kind"] == "l" and lab["index"] == 1 and set(lab) == {"kind", "index", "image", "label"}
    assert lab["image"].shape == (1, *PATCH_3D) and lab["image"].dtype == torch.float32
    assert lab["label"].shape == PATCH_3D and lab["label"].dtype == torch.int64
    assert set(torch.unique(lab["label"]).tolist()) <= {0, 1}
    unl = ds[(3, 11, "u")]
    assert unl["kind"] == "u" and unl["index"] == 3 and set(unl) == {"kind", "index", "image_w", "image_s1", "image_s2"}
    for k in ("image_w", "image_s1", "image_s2"):
        assert unl[k].shape == (1, *PATCH_3D) and unl[k].dtype == torch.float32
    # the triple (index, seed, kind) -> the same sample; views differ; another seed differs
    again = ds[(3, 11, "u")]
    assert all(torch.equal(unl[k], again[k]) for k in ("image_w", "image_s1", "image_s2"))
    assert not torch.equal(ds[(3, 12, "u")]["image_w"], unl["image_w"])
    diffs = [not torch.equal(ds[(3, s, "u")]["image_s1"], ds[(3, s, "u")]["image_s2"]) for s in range(6)]
    assert sum(diffs) >= 4
    # a CutMix partner ('p') is an unlabeled item of its own kind: the same views for the same index and seed
    par = ds[(3, 11, "p")]
    assert par["kind"] == "p" and par["index"] == 3 and set(par) == set(unl)
    assert all(torch.equal(par[k], unl[k]) for k in ("image_w", "image_s1", "image_s2"))
    # the kind, not the index, picks the item: a labeled case can be drawn as a partner or an unlabeled sample
    assert ds[(1, 11, "p")]["kind"] == "p" and ds[(1, 11, "u")].keys() == unl.keys()
    # the labeled item's weak view is the unlabeled item's weak view of the same index and seed
    assert torch.equal(ds[(1, 11, "u")]["image_w"], lab["image"])
    with pytest.raises(IndexError):
        ds[(5, 0, "u")]
    with pytest.raises(IndexError):
        ds[(5, 0, "l")]


def test_la_patch_larger_than_volume_pads(syn_la):
    cases = read_list(syn_la / "train.list")
    ds = TrainSet("la", syn_la, cases[:1], 1, (48, 48, 32))
    lab = ds[(0, 0, "l")]
    assert lab["image"].shape == (1, 48, 48, 32)
    _, label = load_case("la", syn_la, cases[0])
    assert int(lab["label"].sum()) == int(label.sum())  # the whole volume is inside the padded patch


def test_loader_and_collate(syn_la):
    cases = read_list(syn_la / "train.list")
    ds = TrainSet("la", syn_la, cases, 2, PATCH_3D)
    sampler = TwoStreamBatchSampler(range(2), range(2, 5), 2, 2, seed=0, num_iterations=3, partner_bs=2)
    batches = list(DataLoader(ds, batch_sampler=sampler, collate_fn=collate_two_stream))
    assert len(batches) == 3
    for it, b in enumerate(batches):
        assert b["x_l"].shape == (2, 1, *PATCH_3D) and b["y_l"].shape == (2, *PATCH_3D)
        assert b["y_l"].dtype == torch.int64 and b["x_l"].dtype == torch.float32
        for k in ("x_w", "x_s1", "x_s2", "x_w_p", "x_s1_p", "x_s2_p"):
            assert b[k].shape == (2, 1, *PATCH_3D) and b[k].dtype == torch.float32
        triples = sampler.batch(it)
        idx = [i for i, _, _ in triples]
        assert [k for _, _, k in triples] == ["l", "l", "u", "u", "p", "p"]
        assert b["idx_l"].tolist() == idx[:2] and b["idx_u"].tolist() == idx[2:4] and b["idx_p"].tolist() == idx[4:]
        assert set(idx[:2]) <= {0, 1} and set(idx[2:]) <= {2, 3, 4}
        # the batch holds exactly the sampled items
        assert torch.equal(b["x_l"][1], ds[triples[1]]["image"]) and torch.equal(b["y_l"][1], ds[triples[1]]["label"])
        assert torch.equal(b["x_w"][0], ds[triples[2]]["image_w"])
        partner = ds[triples[5]]
        assert partner["kind"] == "p"
        assert all(torch.equal(b[f"x_{k}_p"][1], partner[f"image_{k}"]) for k in ("w", "s1", "s2"))
    # labeled stream only (supervised): empty unlabeled and partner tensors with the right trailing shape
    sup = TwoStreamBatchSampler(range(2), [], 3, 0, seed=0, num_iterations=1)
    b = next(iter(DataLoader(ds, batch_sampler=sup, collate_fn=collate_two_stream)))
    assert b["x_l"].shape == (3, 1, *PATCH_3D)
    assert b["x_w"].shape == (0, 1, *PATCH_3D) and b["idx_u"].shape == (0,)
    assert b["x_w_p"].shape == (0, 1, *PATCH_3D) and b["idx_p"].shape == (0,)
    assert torch.cat([b["x_l"], b["x_w"]]).shape[0] == 3
    # unlabeled only
    b = collate_two_stream([ds[(3, 0, "u")]])
    assert b["x_l"].shape == (0, 1, *PATCH_3D) and b["y_l"].shape == (0, *PATCH_3D)
    assert b["y_l"].dtype == torch.int64


def test_acdc_trainset(syn_acdc):
    names = read_list(syn_acdc / "train_slices.list")
    ds = TrainSet("acdc", syn_acdc, names, n_labeled=4, patch_size=(32, 32))
    assert len(ds) == 36 and N_CLASSES["acdc"] == 4
    lab = ds[(2, 9, "l")]
    assert lab["kind"] == "l" and lab["image"].shape == (1, 32, 32) and lab["label"].shape == (32, 32)
    assert lab["label"].dtype == torch.int64 and int(lab["label"].max()) <= 3
    unl = ds[(10, 9, "u")]
    assert unl["kind"] == "u" and all(unl[k].shape == (1, 32, 32) for k in ("image_w", "image_s1", "image_s2"))
    assert all(torch.equal(ds[(10, 9, "u")][k], unl[k]) for k in ("image_w", "image_s1", "image_s2"))
    par = ds[(10, 9, "p")]
    assert par["kind"] == "p" and all(torch.equal(par[k], unl[k]) for k in ("image_w", "image_s1", "image_s2"))
    sampler = TwoStreamBatchSampler(range(4), range(4, 36), 2, 3, seed=5, num_iterations=2, partner_bs=3)
    b0 = list(DataLoader(ds, batch_sampler=sampler, collate_fn=collate_two_stream))
    b2 = list(DataLoader(ds, batch_sampler=sampler, collate_fn=collate_two_stream, num_workers=2))
    for x, y in zip(b0, b2):  # the worker count does not change a batch
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert b0[0]["x_s1"].shape == b0[0]["x_s2_p"].shape == (3, 1, 32, 32)
    with pytest.raises(DataError, match="patient001_frame01_slice_9"):
        TrainSet("acdc", syn_acdc, names[:3] + ["patient001_frame01_slice_9"], 1, (32, 32))


def test_acdc_trainset_uint8_unlabeled(syn_acdc):
    """uint8_unlabeled (ACDC's release preset): the unlabeled and partner views hold 8-bit values, multiples of
    1/255 in [0, 1] (the weak view truncated, the strong views computed from it and rounded); the labeled item
    is unaffected."""
    names = read_list(syn_acdc / "train_slices.list")
    plain = TrainSet("acdc", syn_acdc, names, n_labeled=4, patch_size=(32, 32))
    u8 = TrainSet("acdc", syn_acdc, names, n_labeled=4, patch_size=(32, 32), uint8_unlabeled=True)
    assert not plain.uint8_unlabeled and u8.uint8_unlabeled
    for seed in range(4):
        for kind in ("u", "p"):
            item, ref = u8[(10 + seed, seed, kind)], plain[(10 + seed, seed, kind)]
            assert item["kind"] == kind and set(item) == set(ref)
            for k in ("image_w", "image_s1", "image_s2"):
                v = item[k]
                assert v.dtype == torch.float32 and v.shape == (1, 32, 32)
                assert 0 <= float(v.min()) and float(v.max()) <= 1
                steps = v.double() * 255
                assert torch.allclose(steps, steps.round(), rtol=0, atol=1e-4), (seed, kind, k)
            # the weak view is the plain one truncated to 8 bits (same geometry: the same seed)
            assert torch.equal(item["image_w"], torch.floor(ref["image_w"] * 255) / np.float32(255))
            # the strong views: the release's pipeline on the truncated weak view, then rounded
            rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3)]
            for k, rng in (("image_s1", rngs[1]), ("image_s2", rngs[2])):
                want = np.round(strong_2d(item["image_w"][0].numpy(), rng) * 255) / np.float32(255)
                assert torch.equal(item[k][0], torch.from_numpy(want)), (seed, kind, k)
        assert not torch.equal(u8[(10 + seed, seed, "u")]["image_s1"], plain[(10 + seed, seed, "u")]["image_s1"])
        # the labeled item is unaffected
        lab, ref = u8[(seed, seed, "l")], plain[(seed, seed, "l")]
        assert torch.equal(lab["image"], ref["image"]) and torch.equal(lab["label"], ref["label"])
    assert any(not torch.allclose(plain[(2, s, "l")]["image"] * 255, (plain[(2, s, "l")]["image"] * 255).round(),
                                  atol=1e-4) for s in range(4))   # ... which is not 8-bit by itself


# ----------------------------------------------------------------------------------- ACDC labeled split
def slice_names(counts):
    """Slice names of consecutive patients, ``counts[i]`` slices for patient i + 1."""
    return [f"patient{p + 1:03d}_frame01_slice_{k + 1}" for p, n in enumerate(counts) for k in range(n)]


def test_acdc_labeled_slices():
    assert LABELED_SLICES == {1: 32, 3: 68, 7: 136, 14: 256, 21: 396, 28: 512, 35: 664, 70: 1312}
    assert patient_of("patient012_frame01_slice_3") == "patient012" == patient_of("patient012_frame01")
    assert acdc_labeled_slices(slice_names([32, 20]), 1, "train_slices.list") == (32, [])
    # everything labeled: fine for supervised training, refused for CrossMatch (no unlabeled slice)
    assert acdc_labeled_slices(slice_names([32]), 1, "train_slices.list", need_unlabeled=False) == (32, [])
    expect(r"--labelnum 1 needs the first 32 slices labeled, train_slices.list has 32, which leaves no unlabeled",
           acdc_labeled_slices, slice_names([32]), 1, "train_slices.list")
    for bad in (0, 2, 5, 71, "7"):
        expect(r"--labelnum .*not an ACDC labeled-patient count; expected one of 1, 3, 7, 14, 21, 28, 35, 70",
               acdc_labeled_slices, slice_names([40]), bad, "train_slices.list")
    expect(r"--labelnum 3 needs the first 68 slices labeled, my.list has 36", acdc_labeled_slices,
           slice_names([12, 12, 12]), 3, "my.list")
    # 20 slices per patient: the first 32 come from 2 patients
    n, warnings = acdc_labeled_slices(slice_names([20, 20, 20]), 1, "train_slices.list")
    assert n == 32 and warnings == ["the first 32 slices of train_slices.list come from 2 patients, not 1"]
    # one patient with 40 slices: slice 32 cuts it into a labeled and an unlabeled part
    n, warnings = acdc_labeled_slices(slice_names([40, 10]), 1, "train_slices.list")
    assert n == 32 and warnings == ["the labeled/unlabeled split of train_slices.list at slice 32 cuts patient "
                                    "patient001"]


def test_training_refuses_a_labelnum_the_list_cannot_give(syn_la, syn_acdc, tmp_path):
    out = tmp_path / "model"
    common = ["--out_dir", str(out), "--device", "cpu", "--num_workers", "0"]
    with pytest.raises(SystemExit, match=r"^error: --labelnum 6 is larger than the 5 cases of train.list$"):
        train_la.main(["--root_path", str(syn_la), "--labelnum", "6", *common])
    with pytest.raises(SystemExit, match=r"^error: --labelnum 3 needs the first 68 slices labeled, "
                                         r"train_slices.list has 36$"):
        train_acdc.main(["--root_path", str(syn_acdc), "--labelnum", "3", *common])
    with pytest.raises(SystemExit, match=r"^error: --labelnum 5: not an ACDC labeled-patient count"):
        train_acdc.main(["--root_path", str(syn_acdc), "--labelnum", "5", *common])
    with pytest.raises(SystemExit, match=r"^error: data root .*nowhere: no such folder"):
        train_la.main(["--root_path", str(tmp_path / "nowhere"), *common])
    assert not out.exists()  # refused before the run folder is made


# ------------------------------------------------------------------------------------------ check_data.py
def test_check_data_good_roots(syn_la, syn_acdc, tmp_path, capsys):
    assert check_data.main(["--task", "la", "--root_path", str(syn_la)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"LA root {syn_la}: 2 list(s) OK") and len(out) == 3
    assert out[1].split()[:3] == ["train.list", "5", "cases"] and out[2].split()[:3] == ["test.list", "2", "cases"]
    assert "shape" in out[1] and "x24 .. " in out[1] and "class fractions" in out[1]
    assert check_data.main(["--task", "acdc", "--root_path", str(syn_acdc)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"ACDC root {syn_acdc}: 3 list(s) OK")
    assert [line.split()[:2] for line in out[1:]] == [["train_slices.list", "36"], ["val.list", "2"],
                                                      ["test.list", "2"]]
    info = check_data.check_list("acdc", syn_acdc, "val.list")
    assert info["cases"] == 2 and info["shape_min"][0] == 6 and len(info["class_fractions"]) == 4
    assert abs(info["class_fractions"].sum() - 1) < 1e-9 and min(info["class_fractions"]) > 0
    assert 0 <= info["intensity"][0] < info["intensity"][1] <= 1
    # --list: names inside the root or paths
    mine = tmp_path / "two.list"
    mine.write_text("synla_001\nsynla_004\n")
    assert check_data.main(["--task", "la", "--root_path", str(syn_la), "--list", str(mine), "test.list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"LA root {syn_la}: 2 list(s) OK") and out[1].split()[1] == "2"


def check_data_error(capsys, argv):
    assert check_data.main(argv) == 1
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error: ") and "\n" not in err and "OK" not in captured.out
    return err


def test_check_data_errors(syn_la, syn_acdc, tmp_path, capsys):
    la = shutil.copytree(syn_la, tmp_path / "LA")
    assert "nowhere: no such folder" in check_data_error(capsys, ["--task", "la", "--root_path",
                                                                  str(tmp_path / "nowhere")])
    assert "other.list" in check_data_error(capsys, ["--task", "la", "--root_path", str(la), "--list", "other.list"])
    # the first bad file of the second list stops the check, naming it
    path = case_path("la", la, "synla_006")
    write_h5(path, image=np.zeros((4, 4, 4), np.float32))
    assert str(path) in check_data_error(capsys, ["--task", "la", "--root_path", str(la)])
    (la / "test.list").unlink()  # without test.list only train.list is checked
    assert check_data.main(["--task", "la", "--root_path", str(la)]) == 0
    assert "1 list(s) OK" in capsys.readouterr().out
    empty = tmp_path / "empty"
    empty.mkdir()  # no list at all: train.list is asked for
    assert "train.list" in check_data_error(capsys, ["--task", "la", "--root_path", str(empty)])


def test_check_data_compares_acdc_slices_with_their_volume(syn_acdc, tmp_path, capsys):
    acdc = shutil.copytree(syn_acdc, tmp_path / "ACDC")
    # a valid slice, but the neighbour's: only the comparison with the volume can see it
    image, label = arrays(case_path("acdc", acdc, "patient002_frame01_slice_4"))
    write_h5(case_path("acdc", acdc, "patient002_frame01_slice_3"), image=image, label=label)
    err = check_data_error(capsys, ["--task", "acdc", "--root_path", str(acdc)])
    slice_3, volume = case_path("acdc", acdc, "patient002_frame01_slice_3"), case_path("acdc", acdc, "patient002_frame01")
    assert err == (f"error: slice patient002_frame01_slice_3 ({slice_3}) does not equal slice 2 of volume "
                   f"patient002_frame01 ({volume}), expected a copy of it"), err
    # a slice number past the end of its volume
    write_h5(case_path("acdc", acdc, "patient001_frame01_slice_7"), image=image, label=label)
    (tmp_path / "past.list").write_text("patient001_frame01_slice_7\n")
    err = check_data_error(capsys, ["--task", "acdc", "--root_path", str(acdc), "--list", str(tmp_path / "past.list")])
    assert "patient001_frame01_slice_7" in err and "has 6 slices, expected a slice number 1..6" in err, err
    # a slice whose volume is missing
    case_path("acdc", acdc, "patient003_frame02").unlink()
    (tmp_path / "orphan.list").write_text("patient003_frame02_slice_1\n")
    err = check_data_error(capsys, ["--task", "acdc", "--root_path", str(acdc), "--list",
                                    str(tmp_path / "orphan.list")])
    assert str(case_path("acdc", acdc, "patient003_frame02")) in err and "case file not found" in err
    assert err.endswith("(the volume of slice patient003_frame02_slice_1, which is compared with it)"), err


def test_check_data_process_exit_code(tmp_path):
    # one real process (importing torch is the slow part): the exit status reaches the shell
    bad = subprocess.run([sys.executable, str(REPO / "code" / "check_data.py"), "--task", "la", "--root_path",
                          str(tmp_path / "none")], capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.strip().startswith(f"error: data root {tmp_path / 'none'}: no such folder")
    assert len(bad.stderr.strip().splitlines()) == 1
