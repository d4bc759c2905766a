"""Loaders and checks on the real data; skipped unless LA_ROOT / ACDC_ROOT point at the unpacked roots
(e.g. ``LA_ROOT=/tmp/crossmatch-data/LA ACDC_ROOT=/tmp/crossmatch-data/ACDC``).

Arrays are compared with ``../shared/data/arrays.sha256.json`` (relative to the repository) when that
file exists: SHA-256 over, for each dataset name in sorted order, the name, the dtype string, the shape
string and the raw C-order bytes; keys are ``LA/<path under the LA root>`` and ``ACDC/<path under the
ACDC root>``. Only training lists (and ACDC val.list) are used to develop on; test lists are only read and checked.
"""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import check_data
from utils.data import (LABELED_SLICES, TrainSet, acdc_labeled_slices, case_path, load_case, patient_of,
                        read_list)
from utils.sampler import collate_two_stream

REPO = Path(__file__).resolve().parents[1]
HASHES = REPO.parent / "shared" / "data" / "arrays.sha256.json"
LA_ROOT = os.environ.get("LA_ROOT")
ACDC_ROOT = os.environ.get("ACDC_ROOT")

needs_la = pytest.mark.skipif(not LA_ROOT, reason="LA_ROOT not set")
needs_acdc = pytest.mark.skipif(not ACDC_ROOT, reason="ACDC_ROOT not set")


def array_hash(arrays: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(name.encode())
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def expected_hashes():
    if not HASHES.is_file():
        return None
    return json.loads(HASHES.read_text())


def check_hash(prefix: str, root: Path, path: Path, image, label):
    table = expected_hashes()
    if table is None:
        return False
    with h5py.File(path) as h:
        names = sorted(h.keys())
    assert names == ["image", "label"], f"{path}: unexpected datasets {names}"
    key = f"{prefix}/{path.relative_to(root).as_posix()}"
    assert key in table, f"{key} not in {HASHES}"
    assert array_hash({"image": image, "label": label}) == table[key], f"{path}: arrays differ from {HASHES}"
    return True


@needs_la
def test_la_cases_match_published_arrays():
    root = Path(LA_ROOT)
    cases = read_list(root / "train.list")
    assert len(cases) == 80
    for case in cases[:2] + cases[-1:]:
        image, label = load_case("la", root, case)  # read and checked as training reads them
        assert image.dtype == np.float32 and label.dtype == np.uint8 and image.ndim == 3
        check_hash("LA", root, case_path("la", root, case), image, label)


@needs_la
def test_la_trainset_on_real_cases():
    root = Path(LA_ROOT)
    cases = read_list(root / "train.list")[:3]
    ds = TrainSet("la", root, cases, n_labeled=1, patch_size=(112, 112, 80))
    batch = collate_two_stream([ds[(0, 1, "l")], ds[(2, 2, "u")]])
    assert batch["x_l"].shape == (1, 1, 112, 112, 80) and batch["y_l"].shape == (1, 112, 112, 80)
    assert set(torch.unique(batch["y_l"]).tolist()) <= {0, 1}
    assert batch["x_s1"].shape == (1, 1, 112, 112, 80)
    assert torch.isfinite(batch["x_s1"]).all() and not torch.equal(batch["x_s1"], batch["x_s2"])


@needs_la
def test_la_root_checks():
    info = check_data.check_list("la", Path(LA_ROOT), "train.list")  # every case read and checked
    assert info["cases"] == 80 and info["shape_min"][0] >= 112 and info["shape_min"][2] >= 80
    assert 0.02 < info["class_fractions"][1] < 0.3


@needs_acdc
def test_acdc_arrays_match_published_and_slices_match_volumes():
    root = Path(ACDC_ROOT)
    vols = read_list(root / "val.list")[:2] + read_list(root / "train.list")[:1]
    for vol in vols:
        image, label = load_case("acdc", root, vol)
        assert image.ndim == 3 and label.dtype == np.uint8
        check_hash("ACDC", root, case_path("acdc", root, vol), image, label)
    slices = read_list(root / "train_slices.list")
    for name in slices[:3]:
        image, label = load_case("acdc", root, name)
        check_hash("ACDC", root, case_path("acdc", root, name), image, label)
        vol, k = name.rsplit("_slice_", 1)
        vimage, vlabel = load_case("acdc", root, vol)
        # slice k = volume[k - 1]
        assert np.array_equal(label, vlabel[int(k) - 1])
        assert np.array_equal(image, vimage[int(k) - 1])


@needs_acdc
def test_acdc_labeled_slice_table_matches_the_list():
    slices = read_list(Path(ACDC_ROOT) / "train_slices.list")
    assert len(slices) == 1312
    patients = [patient_of(s) for s in slices]
    for n, m in LABELED_SLICES.items():
        # no warning: n patients, no split (all 70 labeled leaves no unlabeled slice: fine for supervised training)
        assert acdc_labeled_slices(slices, n, "train_slices.list", need_unlabeled=n < 70) == (m, [])
        assert len(set(patients[:m])) == n  # exactly n patients labeled
        assert m == len(slices) or patients[m] not in set(patients[:m])  # no patient split


@needs_acdc
def test_acdc_trainset_on_real_slices():
    root = Path(ACDC_ROOT)
    names = read_list(root / "train_slices.list")[:4]
    ds = TrainSet("acdc", root, names, n_labeled=2, patch_size=(256, 256))
    batch = collate_two_stream([ds[(i, i, "l" if i < 2 else "u")] for i in range(4)])
    assert batch["x_l"].shape == (2, 1, 256, 256) and batch["x_w"].shape == (2, 1, 256, 256)
    assert int(batch["y_l"].max()) <= 3 and float(batch["x_s1"].min()) >= 0 and float(batch["x_s1"].max()) <= 1


@needs_acdc
def test_acdc_root_checks(capsys):
    root = Path(ACDC_ROOT)
    # every list: every case read and checked, every training slice compared with its volume
    assert check_data.main(["--task", "acdc", "--root_path", str(root)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"ACDC root {root}: 3 list(s) OK")
    assert [line.split()[:2] for line in out[1:]] == [["train_slices.list", "1312"], ["val.list", "20"],
                                                      ["test.list", "40"]]
    val = check_data.check_list("acdc", root, "val.list")
    assert len({patient_of(v) for v in read_list(root / "val.list")}) == 10
    assert len(val["class_fractions"]) == 4 and min(val["class_fractions"]) > 0
    assert 0 <= val["intensity"][0] < val["intensity"][1] <= 1


def _run(script, *args):
    cmd = [sys.executable, str(REPO / "code" / script), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


@needs_la
def test_la_train_and_test_cli_on_real_cases(tmp_path):
    """Two CrossMatch iterations on 4 real training cases (small patch), then test_la.py on a held-apart case."""
    cases = read_list(Path(LA_ROOT) / "train.list")
    (tmp_path / "train4.list").write_text("\n".join(cases[:4]) + "\n")
    (tmp_path / "held1.list").write_text(cases[-1] + "\n")
    r = _run("train_la.py", "--root_path", LA_ROOT, "--train_list", tmp_path / "train4.list", "--labelnum", 2,
             "--max_iterations", 2, "--patch_size", 64, 64, 48, "--num_workers", 0, "--out_dir", tmp_path,
             "--exp", "real", "--log_every", 1, "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    r = _run("test_la.py", "--run", tmp_path / "LA_real_2_labeled", "--root_path", LA_ROOT,
             "--list", tmp_path / "held1.list", "--stride_xy", 48, "--stride_z", 40, "--sw_batch", 4, "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "LA_real_2_labeled" / "eval_held1" / "summary.json").read_text())
    assert summary["n_cases"] == 1 and 0.0 <= summary["dice"] <= 1.0


@needs_acdc
def test_acdc_train_and_test_cli_on_real_slices(tmp_path):
    """Two CrossMatch iterations on the first 40 real training slices (1 labeled patient = 32 slices), then
    test_acdc.py on one validation volume."""
    slices = read_list(Path(ACDC_ROOT) / "train_slices.list")[:40]
    (tmp_path / "slices40.list").write_text("\n".join(slices) + "\n")
    (tmp_path / "val1.list").write_text(read_list(Path(ACDC_ROOT) / "val.list")[0] + "\n")
    r = _run("train_acdc.py", "--root_path", ACDC_ROOT, "--train_list", tmp_path / "slices40.list", "--labelnum", 1,
             "--max_iterations", 2, "--patch_size", 64, 64, "--batch_size", 4, "--labeled_bs", 2,
             "--num_workers", 0, "--out_dir", tmp_path, "--exp", "real", "--log_every", 1, "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    r = _run("test_acdc.py", "--run", tmp_path / "ACDC_real_1_labeled", "--root_path", ACDC_ROOT,
             "--list", tmp_path / "val1.list", "--patch_size", 64, 64, "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "ACDC_real_1_labeled" / "eval_val1" / "summary.json").read_text())
    assert summary["n_cases"] == 1 and set(summary["per_class"]) == {"RV", "Myo", "LV"}
