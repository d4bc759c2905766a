"""Tests of code/prepare_la.py and code/prepare_acdc.py on tiny synthetic raw files (SPEC.md 3 layouts)."""
import shutil

import h5py
import nibabel as nib
import nrrd
import numpy as np
import pytest

import prepare_acdc
import prepare_la

# ---------------------------------------------------------------------------------------------- LA

LA_SHAPE = (40, 36, 20)
# label boxes (x0, x1, y0, y1, z0, z1), half-open; the last one touches the volume border
LA_BOXES = {
    "CASEA": (10, 20, 12, 22, 6, 14),
    "CASEB": (15, 30, 5, 25, 3, 10),
    "CASEC": (0, 8, 20, 36, 12, 20),
    "CASED": (18, 26, 10, 18, 8, 12),
}


def _la_raw(tmp_path, label_value=255, cases=LA_BOXES):
    raw = tmp_path / "raw"
    rng = np.random.default_rng(0)
    for case, (x0, x1, y0, y1, z0, z1) in cases.items():
        d = raw / case
        d.mkdir(parents=True)
        image = rng.integers(0, 200, size=LA_SHAPE).astype(np.uint8)
        label = np.zeros(LA_SHAPE, np.uint8)
        label[x0:x1, y0:y1, z0:z1] = label_value
        nrrd.write(str(d / "lgemri.nrrd"), image)
        nrrd.write(str(d / "laendo.nrrd"), label)
    return raw


def _read(path):
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in f}


def _lines(path):
    return [line for line in path.read_text().splitlines() if line]


def test_la_layout_default_uamt(tmp_path):
    raw = _la_raw(tmp_path)
    out = tmp_path / "LA"
    prepare_la.main(["--raw_dir", str(raw), "--out_dir", str(out), "--n_test", "1", "--seed", "3"])
    train, test = _lines(out / "train.list"), _lines(out / "test.list")
    assert len(train) == 3 and len(test) == 1
    assert train == sorted(train) and not set(train) & set(test)
    assert set(train) | set(test) == set(LA_BOXES)
    for case, (x0, x1, y0, y1, z0, z1) in LA_BOXES.items():
        d = _read(out / "2018LA_Seg_Training Set" / case / "mri_norm2.h5")
        assert set(d) == {"image", "label"}
        assert d["image"].dtype == np.float32 and d["label"].dtype == np.uint8
        assert d["image"].shape == d["label"].shape
        assert set(np.unique(d["label"]).tolist()) == {0, 1}
        assert d["label"].sum() == (x1 - x0) * (y1 - y0) * (z1 - z0)  # whole label inside the crop
        # z is not cropped; the box is padded towards 112 so x/y cover the whole small volume here
        assert d["image"].shape == LA_SHAPE
        # z-score over the whole volume before the crop (UA-MT)
        raw_img = nrrd.read(str(raw / case / "lgemri.nrrd"))[0].astype(np.float64)
        expect = (raw_img - raw_img.mean()) / raw_img.std()
        np.testing.assert_allclose(d["image"], expect, rtol=1e-5, atol=1e-5)


def test_la_fixed_margins_crop_z_and_norm_crop(tmp_path):
    raw = _la_raw(tmp_path)
    out = tmp_path / "LA"
    mxy, mz = 3, 2
    prepare_la.main(["--raw_dir", str(raw), "--out_dir", str(out), "--n_test", "2",
                     "--margin_xy", str(mxy), str(mxy), "--margin_z", str(mz), str(mz), "--crop_z",
                     "--pad_to", "0", "0", "0", "--norm", "crop", "--compression", "none"])
    for case, (x0, x1, y0, y1, z0, z1) in LA_BOXES.items():
        d = _read(out / "2018LA_Seg_Training Set" / case / "mri_norm2.h5")
        sx = slice(max(x0 - mxy, 0), min(x1 + mxy, LA_SHAPE[0]))
        sy = slice(max(y0 - mxy, 0), min(y1 + mxy, LA_SHAPE[1]))
        sz = slice(max(z0 - mz, 0), min(z1 + mz, LA_SHAPE[2]))
        assert d["image"].shape == (sx.stop - sx.start, sy.stop - sy.start, sz.stop - sz.start)
        raw_lab = nrrd.read(str(raw / case / "laendo.nrrd"))[0]
        np.testing.assert_array_equal(d["label"], (raw_lab[sx, sy, sz] == 255).astype(np.uint8))
        raw_img = nrrd.read(str(raw / case / "lgemri.nrrd"))[0].astype(np.float64)[sx, sy, sz]
        np.testing.assert_allclose(d["image"], (raw_img - raw_img.mean()) / raw_img.std(), rtol=1e-5, atol=1e-5)
        assert abs(float(d["image"].mean())) < 1e-4 and abs(float(d["image"].std()) - 1) < 1e-4
    assert len(_lines(out / "test.list")) == 2 and len(_lines(out / "train.list")) == 2


def test_la_random_margins_in_range_and_seeded(tmp_path):
    raw = _la_raw(tmp_path)
    args = ["--raw_dir", str(raw), "--margin_xy", "2", "5", "--pad_to", "0", "0", "0", "--n_test", "0"]
    prepare_la.main(args + ["--out_dir", str(tmp_path / "a")])
    prepare_la.main(args + ["--out_dir", str(tmp_path / "b")])
    for case, (x0, x1, y0, y1, z0, z1) in LA_BOXES.items():
        a = _read(tmp_path / "a" / "2018LA_Seg_Training Set" / case / "mri_norm2.h5")
        b = _read(tmp_path / "b" / "2018LA_Seg_Training Set" / case / "mri_norm2.h5")
        np.testing.assert_array_equal(a["image"], b["image"])  # same seed, same crop
        lab = a["label"]
        assert lab.sum() == (x1 - x0) * (y1 - y0) * (z1 - z0)
        assert lab.shape[2] == LA_SHAPE[2]
        nz = np.nonzero(lab)
        for axis, (lo, hi) in enumerate([(x0, x1), (y0, y1)]):
            before, after = nz[axis].min(), lab.shape[axis] - 1 - nz[axis].max()
            assert before == lo or 2 <= before <= 5  # lo == before: clipped at the border
            assert after == LA_SHAPE[axis] - hi or 2 <= after <= 5
    assert len(_lines(tmp_path / "a" / "train.list")) == 4 and _lines(tmp_path / "a" / "test.list") == []


def test_la_test_cases_file_and_01_labels(tmp_path):
    raw = _la_raw(tmp_path, label_value=1)
    tc = tmp_path / "test_cases.txt"
    tc.write_text("CASED\nCASEB\n")
    out = tmp_path / "LA"
    prepare_la.main(["--raw_dir", str(raw), "--out_dir", str(out), "--test_cases", str(tc)])
    assert _lines(out / "test.list") == ["CASEB", "CASED"]
    assert _lines(out / "train.list") == ["CASEA", "CASEC"]
    d = _read(out / "2018LA_Seg_Training Set" / "CASEA" / "mri_norm2.h5")
    assert set(np.unique(d["label"]).tolist()) == {0, 1}


def test_la_error_missing_label(tmp_path):
    raw = _la_raw(tmp_path)
    (raw / "CASEB" / "laendo.nrrd").unlink()
    with pytest.raises(prepare_la.PrepareError, match=r"CASEB.*laendo\.nrrd.*missing"):
        prepare_la.main(["--raw_dir", str(raw), "--out_dir", str(tmp_path / "o"), "--n_test", "1"])


def test_la_error_shape_mismatch_and_bad_values(tmp_path):
    raw = _la_raw(tmp_path)
    nrrd.write(str(raw / "CASEA" / "laendo.nrrd"), np.zeros((40, 36, 19), np.uint8))
    with pytest.raises(prepare_la.PrepareError, match=r"CASEA.*laendo\.nrrd.*shape"):
        prepare_la.main(["--raw_dir", str(raw), "--out_dir", str(tmp_path / "o"), "--n_test", "1"])
    bad = np.zeros(LA_SHAPE, np.uint8)
    bad[1:4, 1:4, 1:4] = 7
    nrrd.write(str(raw / "CASEA" / "laendo.nrrd"), bad)
    with pytest.raises(prepare_la.PrepareError, match=r"CASEA.*laendo\.nrrd.*values"):
        prepare_la.main(["--raw_dir", str(raw), "--out_dir", str(tmp_path / "o"), "--n_test", "1"])


def test_la_error_unknown_test_case(tmp_path):
    raw = _la_raw(tmp_path)
    tc = tmp_path / "tc.txt"
    tc.write_text("NOPE\n")
    with pytest.raises(prepare_la.PrepareError, match=r"tc\.txt.*NOPE"):
        prepare_la.main(["--raw_dir", str(raw), "--out_dir", str(tmp_path / "o"), "--test_cases", str(tc)])


# ---------------------------------------------------------------------------------------------- ACDC

# nibabel shape (X, Y, Z); X != Y so that the axis order is testable
ACDC_PATIENTS = {f"patient{i:03d}": (12 + i % 2 * 2, 10, 3 + i % 3) for i in range(1, 7)}
RAW_FRAMES = (1, 7)  # ACDC numbers frames by time; the output names are frame01, frame02


def _acdc_raw(tmp_path, subset="training", patients=ACDC_PATIENTS):
    raw = tmp_path / "acdc_raw"
    rng = np.random.default_rng(1)
    for p, shape in patients.items():
        d = raw / subset / p
        d.mkdir(parents=True)
        for fr in RAW_FRAMES:
            img = rng.integers(5, 900, size=shape).astype(np.int16)
            lab = rng.integers(0, 4, size=shape).astype(np.uint8)
            nib.save(nib.Nifti1Image(img, np.eye(4)), str(d / f"{p}_frame{fr:02d}.nii.gz"))
            nib.save(nib.Nifti1Image(lab, np.eye(4)), str(d / f"{p}_frame{fr:02d}_gt.nii.gz"))
        nib.save(nib.Nifti1Image(np.zeros(shape + (2,), np.int16), np.eye(4)), str(d / f"{p}_4d.nii.gz"))
    return raw


def _check_slices(root, train_vols, expected_list):
    names = _lines(root / "train_slices.list")
    assert names == expected_list
    for v in train_vols:
        vol = _read(root / "data" / f"{v}.h5")
        d = vol["image"].shape[0]
        assert not (root / "data" / "slices" / f"{v}_slice_0.h5").exists()
        assert not (root / "data" / "slices" / f"{v}_slice_{d + 1}.h5").exists()
        for k in range(1, d + 1):
            s = _read(root / "data" / "slices" / f"{v}_slice_{k}.h5")
            assert set(s) == {"image", "label"}
            assert s["label"].dtype == np.uint8
            np.testing.assert_array_equal(s["image"], vol["image"][k - 1])
            np.testing.assert_array_equal(s["label"], vol["label"][k - 1])


def test_acdc_layout_seeded_split_and_from_volumes(tmp_path):
    raw = _acdc_raw(tmp_path)
    out = tmp_path / "ACDC"
    prepare_acdc.main(["--raw_dir", str(raw), "--out_dir", str(out),
                       "--n_val_patients", "1", "--n_test_patients", "2", "--seed", "5"])
    lists = {p: _lines(out / f"{p}.list") for p in ("train", "val", "test")}
    pats = {p: {v.split("_frame")[0] for v in names} for p, names in lists.items()}
    assert [len(pats[p]) for p in ("train", "val", "test")] == [3, 1, 2]
    assert [len(lists[p]) for p in ("train", "val", "test")] == [6, 2, 4]
    assert not (pats["train"] & pats["val"] or pats["train"] & pats["test"] or pats["val"] & pats["test"])
    assert set().union(*pats.values()) == set(ACDC_PATIENTS)
    for names in lists.values():
        assert names == sorted(names)
    all_vols = sorted(lists["train"] + lists["val"] + lists["test"])
    assert sorted(f.stem for f in (out / "data").glob("*.h5")) == all_vols
    assert all(v.endswith(("_frame01", "_frame02")) for v in all_vols)

    for v in all_vols:
        p, fr = v.split("_frame")
        raw_fr = RAW_FRAMES[int(fr) - 1]
        d = _read(out / "data" / f"{v}.h5")
        assert set(d) == {"image", "label"}
        assert d["image"].dtype == np.float64 and d["label"].dtype == np.uint8
        x, y, z = ACDC_PATIENTS[p]
        assert d["image"].shape == d["label"].shape == (z, y, x)  # (D, H, W), SimpleITK order
        assert d["image"].min() == 0.0 and d["image"].max() == 1.0
        assert set(np.unique(d["label"]).tolist()) <= {0, 1, 2, 3}
        img = np.asarray(nib.load(str(raw / "training" / p / f"{p}_frame{raw_fr:02d}.nii.gz")).dataobj, np.float64)
        lab = np.asarray(nib.load(str(raw / "training" / p / f"{p}_frame{raw_fr:02d}_gt.nii.gz")).dataobj)
        img = (img - img.min()) / (img.max() - img.min())
        np.testing.assert_array_equal(d["image"], img.transpose(2, 1, 0))
        np.testing.assert_array_equal(d["label"], lab.transpose(2, 1, 0))

    expected = [f"{v}_slice_{k}" for v in lists["train"]
                for k in range(1, ACDC_PATIENTS[v.split("_frame")[0]][2] + 1)]
    _check_slices(out, lists["train"], expected)
    slice_files = sorted(f.stem for f in (out / "data" / "slices").glob("*.h5"))
    assert slice_files == sorted(expected)  # val/test volumes have no slices

    # --from_volumes: a root with only the volumes and train.list reproduces the slices and the list
    vol_root = tmp_path / "vols"
    (vol_root / "data").mkdir(parents=True)
    for v in all_vols:
        shutil.copy(out / "data" / f"{v}.h5", vol_root / "data" / f"{v}.h5")
    shutil.copy(out / "train.list", vol_root / "train.list")
    prepare_acdc.main(["--from_volumes", str(vol_root)])
    _check_slices(vol_root, lists["train"], expected)
    for s in expected:
        a = _read(out / "data" / "slices" / f"{s}.h5")
        b = _read(vol_root / "data" / "slices" / f"{s}.h5")
        for key in ("image", "label"):
            assert a[key].dtype == b[key].dtype
            np.testing.assert_array_equal(a[key], b[key])
    assert sorted(f.stem for f in (vol_root / "data" / "slices").glob("*.h5")) == sorted(expected)

    # a different seed gives a different, still disjoint split
    out2 = tmp_path / "ACDC2"
    prepare_acdc.main(["--raw_dir", str(raw), "--out_dir", str(out2), "--n_val_patients", "1",
                       "--n_test_patients", "2", "--seed", "5", "--compression", "none"])
    assert _lines(out2 / "test.list") == lists["test"]  # same seed, same split


def test_acdc_split_dir_keeps_order(tmp_path):
    raw = _acdc_raw(tmp_path)
    split = tmp_path / "split"
    split.mkdir()
    train = ["patient004_frame01", "patient004_frame02", "patient002_frame01", "patient002_frame02"]
    (split / "train.list").write_text("\n".join(train) + "\n")
    (split / "val.list").write_text("patient001_frame01\npatient001_frame02\n")
    (split / "test.list").write_text("patient003_frame02\n")
    # an existing slice list with the same names keeps its (shuffled) order
    d4, d2 = ACDC_PATIENTS["patient004"][2], ACDC_PATIENTS["patient002"][2]
    slices = [f"{v}_slice_{k}" for v in train for k in range(1, (d4 if "004" in v else d2) + 1)]
    shuffled = [slices[i] for i in np.random.default_rng(0).permutation(len(slices))]
    (split / "train_slices.list").write_text("\n".join(shuffled) + "\n")
    out = tmp_path / "ACDC"
    prepare_acdc.main(["--raw_dir", str(raw), "--out_dir", str(out), "--split_dir", str(split)])
    assert _lines(out / "train.list") == train
    assert _lines(out / "val.list") == ["patient001_frame01", "patient001_frame02"]
    assert _lines(out / "test.list") == ["patient003_frame02"]
    _check_slices(out, train, shuffled)


def test_acdc_keep_frame_numbers_and_testing(tmp_path):
    raw = _acdc_raw(tmp_path, patients={"patient001": (8, 6, 2), "patient002": (8, 6, 2)})
    _acdc_raw(tmp_path, subset="testing", patients={"patient101": (6, 8, 2)})
    out = tmp_path / "ACDC"
    prepare_acdc.main(["--raw_dir", str(raw), "--out_dir", str(out), "--n_val_patients", "1",
                       "--n_test_patients", "0", "--keep_frame_numbers", "--include_testing"])
    names = sorted(f.stem for f in (out / "data").glob("*.h5"))
    assert names == ["patient001_frame01", "patient001_frame07", "patient002_frame01", "patient002_frame07",
                     "patient101_frame01", "patient101_frame07"]
    assert _read(out / "data" / "patient101_frame07.h5")["image"].shape == (2, 8, 6)
    assert _lines(out / "test.list") == []
    assert len(_lines(out / "train.list")) == 2 and len(_lines(out / "val.list")) == 2


def test_acdc_error_missing_gt(tmp_path):
    raw = _acdc_raw(tmp_path)
    (raw / "training" / "patient003" / "patient003_frame07_gt.nii.gz").unlink()
    with pytest.raises(prepare_acdc.PrepareError, match=r"patient003_frame07_gt\.nii\.gz.*missing"):
        prepare_acdc.main(["--raw_dir", str(raw), "--out_dir", str(tmp_path / "o"),
                           "--n_val_patients", "1", "--n_test_patients", "1"])


def test_acdc_error_split_dir_unknown_volume(tmp_path):
    raw = _acdc_raw(tmp_path)
    split = tmp_path / "split"
    split.mkdir()
    (split / "train.list").write_text("patient001_frame01\npatient042_frame01\n")
    (split / "val.list").write_text("patient002_frame01\n")
    with pytest.raises(prepare_acdc.PrepareError, match=r"train\.list.*patient042_frame01"):
        prepare_acdc.main(["--raw_dir", str(raw), "--out_dir", str(tmp_path / "o"), "--split_dir", str(split)])
    (split / "val.list").unlink()
    (split / "train.list").write_text("patient001_frame01\n")
    with pytest.raises(prepare_acdc.PrepareError, match=r"val\.list.*missing"):
        prepare_acdc.main(["--raw_dir", str(raw), "--out_dir", str(tmp_path / "o"), "--split_dir", str(split)])


def test_acdc_error_bad_label_values(tmp_path):
    raw = _acdc_raw(tmp_path, patients={"patient001": (8, 6, 2)})
    gt = raw / "training" / "patient001" / "patient001_frame01_gt.nii.gz"
    nib.save(nib.Nifti1Image(np.full((8, 6, 2), 5, np.uint8), np.eye(4)), str(gt))
    with pytest.raises(prepare_acdc.PrepareError, match=r"patient001_frame01_gt\.nii\.gz.*label values"):
        prepare_acdc.main(["--raw_dir", str(raw), "--out_dir", str(tmp_path / "o"),
                           "--n_val_patients", "0", "--n_test_patients", "0"])


def test_acdc_from_volumes_errors(tmp_path):
    root = tmp_path / "vols"
    (root / "data").mkdir(parents=True)
    with pytest.raises(prepare_acdc.PrepareError, match=r"train\.list.*missing"):
        prepare_acdc.main(["--from_volumes", str(root)])
    (root / "train.list").write_text("patient009_frame01\n")
    with pytest.raises(prepare_acdc.PrepareError, match=r"patient009_frame01\.h5.*missing"):
        prepare_acdc.main(["--from_volumes", str(root)])
