import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

import check_data
from utils.checks import DataError, check_acdc_root, check_la_root
from utils.data_acdc import acdc_slice_path, acdc_volume_path
from utils.data_la import la_case_path, read_list
from utils.synthetic import make_acdc, make_la

REPO = check_data.__file__.rsplit("/code/", 1)[0]


@pytest.fixture(scope="module")
def la_master(tmp_path_factory):
    return make_la(tmp_path_factory.mktemp("la_master"), n_train=3, n_test=1, shape=(16, 16, 10),
                   shape_jitter=0.0)


@pytest.fixture(scope="module")
def acdc_master(tmp_path_factory):
    return make_acdc(tmp_path_factory.mktemp("acdc_master"), n_train_patients=2, n_val=1, n_test=0,
                     shape=(3, 20, 20), shape_jitter=0.0)


@pytest.fixture
def la(la_master, tmp_path):
    return shutil.copytree(la_master, tmp_path / "LA")


@pytest.fixture
def acdc(acdc_master, tmp_path):
    return shutil.copytree(acdc_master, tmp_path / "ACDC")


def rewrite(path, **arrays):
    """Replace an h5 file by one holding exactly ``arrays``."""
    path.unlink()
    with h5py.File(path, "w") as h:
        for k, v in arrays.items():
            h[k] = v


def first_case(root):
    return la_case_path(root, read_list(root / "train.list")[0])


def la_arrays(root):
    with h5py.File(first_case(root)) as h:
        return h["image"][()], h["label"][()]


# ------------------------------------------------------------------------------------------------ LA

def test_la_good_root_summary(la):
    info = check_la_root(la, "train.list", labelnum=2, patch_size=(8, 8, 8))
    assert info["n_cases"] == 3 and info["n_read"] == 3
    assert info["shape_min"] == info["shape_max"] == (16, 16, 10)
    assert abs(sum(info["class_fractions"]) - 1) < 1e-9 and info["class_fractions"][1] > 0
    assert info["intensity_min"] < 0 < info["intensity_max"] and info["warnings"] == []
    assert check_la_root(la, la / "test.list")["n_cases"] == 1     # a list path works too
    assert check_la_root(la, "train.list", cases_limit=1)["n_read"] == 1


def test_la_patch_larger_than_volume_is_a_warning(la):
    info = check_la_root(la, "train.list", patch_size=(20, 16, 10))
    assert len(info["padded_cases"]) == 3 and "zero-padded" in info["warnings"][0]


def expect(match, fn, *args, **kw):
    with pytest.raises(DataError, match=match) as e:
        fn(*args, **kw)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_la_missing_root_list_case(la, tmp_path):
    expect("nowhere", check_la_root, tmp_path / "nowhere")
    expect("other.list", check_la_root, la, "other.list")
    (la / "train.list").write_text("synla_000\nghost_case\n")
    expect("ghost_case.*mri_norm2.h5", check_la_root, la)
    (la / "train.list").write_text("\n\n")
    expect("train.list.*empty", check_la_root, la)
    (la / "train.list").write_text("synla_000\nsynla_000\n")
    expect("synla_000.*more than once", check_la_root, la)


@pytest.mark.parametrize("mutate, match", [
    (lambda im, lb: dict(image=im), "no 'label' dataset"),
    (lambda im, lb: dict(label=lb), "no 'image' dataset"),
    (lambda im, lb: dict(image=im, label=lb[:-1]), r"image shape \(16, 16, 10\) != label shape"),
    (lambda im, lb: dict(image=im, label=np.where(lb > 0, 2, 0).astype(np.uint8)), r"label values \[2\]"),
    (lambda im, lb: dict(image=np.where(lb > 0, np.nan, im).astype(np.float32), label=lb), "non-finite"),
    (lambda im, lb: dict(image=(im * 100).astype(np.int16), label=lb), "image dtype int16"),
    (lambda im, lb: dict(image=im, label=lb.astype(np.float32)), "label dtype float32"),
    (lambda im, lb: dict(image=im[..., 0], label=lb[..., 0]), "image has 2 dims"),
])
def test_la_bad_case_file(la, mutate, match):
    path = first_case(la)
    rewrite(path, **mutate(*la_arrays(la)))
    msg = expect(match, check_la_root, la)
    assert str(path) in msg


def test_la_not_an_h5(la):
    path = first_case(la)
    path.write_bytes(b"not an h5 file")
    assert str(path) in expect("cannot open", check_la_root, la)


def test_la_bad_flags(la):
    expect(r"--labelnum 4 is larger than the 3 cases of .*train.list", check_la_root, la, labelnum=4)
    expect("--labelnum", check_la_root, la, labelnum=-1)
    expect("--patch_size must be 3", check_la_root, la, patch_size=(8, 8))
    expect("--patch_size must be 3", check_la_root, la, patch_size=(8, 0, 8))


# ---------------------------------------------------------------------------------------------- ACDC

def test_acdc_good_root(acdc):
    info = check_acdc_root(acdc, "train_slices.list", patch_size=(256, 256))
    assert info["kind"] == "slices" and info["n_cases"] == 12 and info["n_patients"] == 2
    assert len(info["class_fractions"]) == 4 and info["intensity_min"] >= 0 and info["intensity_max"] <= 1
    # 32 labeled slices for one patient do not fit a 12-slice list
    expect(r"--labelnum 3 needs the first 68 slices", check_acdc_root, acdc, labelnum=3)
    val = check_acdc_root(acdc, "val.list")
    assert val["kind"] == "volumes" and val["shape_min"] == (3, 20, 20)


def test_acdc_labelnum_not_in_table(acdc):
    expect(r"--labelnum 5 .*allowed: 1, 3, 7, 14, 21, 28, 35, 70", check_acdc_root, acdc, labelnum=5)


def test_acdc_labelnum_patient_mismatch_warns(tmp_path):
    root = make_acdc(tmp_path / "A", n_train_patients=3, n_val=0, n_test=0, shape=(8, 12, 12),
                     shape_jitter=0.0)
    # 16 slices per patient: the first 32 slices (labelnum 1) come from 2 patients
    info = check_acdc_root(root, labelnum=1)
    assert info["n_labeled"] == 32 and "come from 2 patients, not 1" in info["warnings"][0]


@pytest.mark.parametrize("mutate, match", [
    (lambda im, lb: dict(image=im, label=np.where(lb > 0, 4, 0).astype(np.uint8)), r"label values \[4\]"),
    (lambda im, lb: dict(image=im * 2 + 0.5, label=lb), r"expected within \[0, 1\]"),
    (lambda im, lb: dict(image=im[None], label=lb[None]), "image has 3 dims"),
    (lambda im, lb: dict(image=im), "no 'label'"),
    (lambda im, lb: dict(image=im, label=lb[:, :-2]), "!= label shape"),
])
def test_acdc_bad_slice(acdc, mutate, match):
    name = read_list(acdc / "train_slices.list")[1]
    path = acdc_slice_path(acdc, name)
    with h5py.File(path) as h:
        im, lb = h["image"][()], h["label"][()]
    rewrite(path, **mutate(im, lb))
    assert str(path) in expect(match, check_acdc_root, acdc)


def test_acdc_bad_volume_and_missing_files(acdc):
    path = acdc_volume_path(acdc, "patient003_frame02")
    with h5py.File(path) as h:
        im, lb = h["image"][()], h["label"][()]
    rewrite(path, image=im[0], label=lb[0])
    assert str(path) in expect("image has 2 dims", check_acdc_root, acdc, "val.list")
    path.unlink()
    assert str(path) in expect("case file not found", check_acdc_root, acdc, "val.list")
    missing = acdc_slice_path(acdc, "patient001_frame01_slice_2")
    missing.unlink()
    # existence is checked for every entry even when only the first arrays are read
    assert str(missing) in expect("case file not found", check_acdc_root, acdc, cases_limit=1)
    expect("ACDC root not found", check_acdc_root, acdc / "nope")
    expect("test.list", check_acdc_root, acdc, "test.list")


# ----------------------------------------------------------------------------------------------- CLI

def test_cli_ok_and_errors(la, acdc, capsys):
    assert check_data.main(["--task", "la", "--root_path", str(la), "--labelnum", "2"]) == 0
    out = capsys.readouterr().out
    assert "train.list" in out and "test.list" in out and "class fractions" in out
    assert check_data.main(["--task", "acdc", "--root_path", str(acdc)]) == 0
    out = capsys.readouterr().out
    assert "train_slices.list" in out and "val.list" in out
    assert check_data.main(["--task", "la", "--root_path", str(la), "--labelnum", "9"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --labelnum 9") and "\n" not in err
    rewrite(first_case(la), image=np.zeros((4, 4, 4), np.float32))
    assert check_data.main(["--task", "la", "--root_path", str(la)]) == 1
    assert str(first_case(la)) in capsys.readouterr().err


def test_cli_process_exit_code(tmp_path):
    # one real process (importing torch is the slow part): the exit status reaches the shell
    script = f"{REPO}/code/check_data.py"
    bad = subprocess.run([sys.executable, script, "--task", "la", "--root_path", str(tmp_path / "none")],
                         capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 1 and bad.stderr.strip().startswith("error: LA root not found")
