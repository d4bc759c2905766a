"""The 3D data sets as descriptions (code/datasets/*.json, utils/datasets.py): LA unchanged, BraTS2019 / Pancreas-CT /
a user's own data in their layouts, trained and evaluated on tiny synthetic sets, and the one-line errors."""
import json
import re

import numpy as np
import pytest

import check_data
import make_synthetic
import reproduce
import test_la
import train_la
import train_la_cml
from reproduction.rows import MORE_TABLES, ROWS
from utils.data import read_h5
from utils.datasets import NAMES, load_description, saved_args
from utils.synthetic import make_3d

TINY = ["--device", "cpu", "--max_iterations", "2", "--patch_size", "32", "32", "16", "--num_workers", "0",
        "--log_every", "1", "--labelnum", "2"]
METHODS = {"crossmatch": (train_la, ["--method", "crossmatch"]), "supervised": (train_la, ["--method", "supervised"]),
           "cml": (train_la_cml, ["--pre_iterations", "1", "--batch_size", "4", "--labeled_bs", "2"])}
OWN = ["--case_file", "vol/{case}.h5", "--n_classes", "3"]  # the custom set: 3 classes (the tube is class 2)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """Tiny synthetic roots in the BraTS2019, Pancreas-CT and a custom 3-class layout: 4 training cases (and
    BraTS2019 1 validation), 1 test case, 32 x 32 x 16 voxels."""
    base = tmp_path_factory.mktemp("layouts")
    kw = dict(n_train=4, n_val=1, n_test=1, shape=(32, 32, 16), shape_jitter=0.0)
    return {"brats2019": (make_3d(base / "BraTS2019", "brats2019", **kw), []),
            "pancreas": (make_3d(base / "Pancreas", "pancreas", **kw), []),
            "custom": (make_3d(base / "own", "custom", n_classes=3, case_file="vol/{case}.h5", **kw), OWN)}


def printed_config(script, argv, capsys) -> dict:
    script.main([*argv, "--print_config"])
    return json.loads(capsys.readouterr().out)


# ------------------------------------------------------------------------------------------- descriptions
def test_la_stays_the_default_with_the_settings_it_had(capsys):
    for script in (train_la, train_la_cml):
        config = printed_config(script, [], capsys)
        args = config["args"]
        assert (args["dataset"], args["root_path"], args["train_list"], args["patch_size"]) == (
            "la", "data/LA", "train.list", [112, 112, 80])
        assert (args["labelnum"], args["case_file"], args["n_classes"]) == (
            8, "2018LA_Seg_Training Set/{case}/mri_norm2.h5", 2)
        assert re.search(r"/LA_(CrossMatch|CML)_8_labeled$", config["run_dir"])
    # a checkpoint or config.json written before --dataset existed reads as an LA one (resume, reproduce.py)
    assert saved_args({"task": "la", "labelnum": 8}) == {"task": "la", "labelnum": 8, "dataset": "la", "n_classes": 2,
                                                         "case_file": "2018LA_Seg_Training Set/{case}/mri_norm2.h5",
                                                         "float_labels": False}
    assert saved_args({"task": "acdc"}) == {"task": "acdc"}


@pytest.mark.parametrize("dataset, prefix, root, train_list, labelnum, case_file", [
    ("brats2019", "BraTS2019", "data/BraTS2019", "train.txt", 25, "data/{case}.h5"),
    ("pancreas", "Pancreas_CT", "data/Pancreas", "train.list", 6, "Pancreas_h5/{case}_norm.h5"),
    ("custom", "mine", "data/mine", "train.list", 3, "vol/{case}.h5")])
def test_print_config_prints_each_data_set_description(dataset, prefix, root, train_list, labelnum, case_file, capsys):
    own = ["--root_path", root, *OWN, "--labelnum", "3"] if dataset == "custom" else []
    for script in (train_la, train_la_cml):
        config = printed_config(script, ["--dataset", dataset, *own], capsys)
        args, desc = config["args"], config["dataset_description"]
        assert (args["root_path"], args["train_list"], args["labelnum"], args["case_file"]) == (
            root, train_list, labelnum, case_file)
        assert args["patch_size"] == [96, 96, 96] and desc["patch_size"] == [96, 96, 96]
        assert desc["name"] == dataset and desc["case_file"] == case_file and desc["intensity"]
        assert len(desc["classes"]) == args["n_classes"] == (3 if dataset == "custom" else 2)
        assert config["run_dir"].endswith(f"/{prefix}_{args['exp']}_{labelnum}_labeled")
    if dataset != "custom":  # each fact names the public repository and file it was read from
        assert desc["sources"] and all(re.search(r"\w+/\S+ \S+", where) for where in desc["sources"].values())


def test_every_named_description_loads():
    for name in NAMES:
        desc = load_description(name)
        assert desc["name"] == name and len(desc["patch_size"]) == 3
    assert (load_description("brats2019")["stride_xy"], load_description("pancreas")["stride_xy"]) == (64, 16)


# ------------------------------------------------------------------------ synthetic layouts and their checks
def test_synthetic_sets_are_in_the_lineage_layouts(layouts, capsys):
    brats, pancreas, own = (layouts[k][0] for k in ("brats2019", "pancreas", "custom"))
    assert sorted(p.name for p in brats.iterdir()) == ["data", "test.txt", "train.txt", "val.txt"]
    assert (brats / "data" / "BraTS19_SYN_000_1.h5").is_file()
    assert (pancreas / "train.list").read_text().split() == ["image0001", "image0002", "image0003", "image0004"]
    _, label = read_h5(pancreas / "Pancreas_h5" / "image0001_norm.h5")
    assert label.dtype == np.float32 and set(np.unique(label)) == {0.0, 1.0}  # as MC-Net's preprocessing writes
    _, label = read_h5(own / "vol" / "case_000.h5")
    assert set(np.unique(label)) == {0, 1, 2}
    for dataset, (root, own_flags) in layouts.items():
        assert check_data.main(["--dataset", dataset, "--root_path", str(root), *own_flags]) == 0
        out = capsys.readouterr().out
        assert re.search(r"root .*: [23] list\(s\) OK", out) and "class fractions" in out
    out_dir = brats.parent / "cli"
    make_synthetic.main(["--dataset", "brats2019", "--out", str(out_dir), "--n_train", "2", "--n_val", "1",
                         "--n_test", "1", "--shape", "16", "16", "16"])
    assert (out_dir / "val.txt").read_text().split() == ["BraTS19_SYN_002_1"]


@pytest.mark.parametrize("argv, message", [
    # a wrong layout: another data set's lists or case files
    (["--dataset", "brats2019", "--root_path", "{pancreas}"], r"^error: list train\.txt: neither .*/train\.txt"),
    (["--dataset", "la", "--root_path", "{pancreas}"], r"^error: case file not found: .*mri_norm2\.h5$"),
    (["--dataset", "custom", "--root_path", "{pancreas}", "--case_file", "Pancreas_h5/{{case}}_norm.h5", "--n_classes",
      "2"], r"^error: .*image0001_norm\.h5: image float32 and label float32, expected a float image and an integer "
            r"label$"),
    # a wrong class count: the 3-class set read as a binary one
    (["--dataset", "custom", "--root_path", "{custom}", "--case_file", "vol/{{case}}.h5", "--n_classes", "2"],
     r"^error: .*vol/case_000\.h5: label values \[2\] outside the classes 0\.\.1$")])
def test_wrong_layout_or_class_count_is_one_line_naming_the_file(layouts, argv, message, capsys):
    roots = {k: str(v[0]) for k, v in layouts.items()}
    assert check_data.main([a.format(**roots) for a in argv]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(message, err.strip()), err
    with pytest.raises(SystemExit) as e:  # training refuses the same data with the same line
        train_la.main([a.format(**roots) for a in argv] + TINY + ["--out_dir", str(layouts["custom"][0].parent / "x")])
    assert re.search(message, str(e.value)), e.value


def test_custom_needs_its_layout_flags(capsys):
    with pytest.raises(SystemExit):
        train_la.main(["--dataset", "custom", "--root_path", "data/mine", "--print_config"])
    assert re.search(r"error: --dataset custom: --case_file, --n_classes required", capsys.readouterr().err)


# --------------------------------------------------------------------- two iterations and an evaluation each
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("dataset", ["brats2019", "pancreas", "custom"])
def test_two_iterations_and_an_evaluation_on_each_layout(layouts, dataset, method, tmp_path, one_thread):
    root, own = layouts[dataset]
    script, flags = METHODS[method]
    run_dir = script.main(["--dataset", dataset, "--root_path", str(root), *own, "--out_dir", str(tmp_path), *TINY,
                           *flags])
    assert (run_dir / "iter_2.pth").is_file()
    config = json.loads((run_dir / "config.json").read_text())
    assert config["dataset_description"]["name"] == dataset and config["args"]["n_classes"] == (
        3 if dataset == "custom" else 2)
    summary = test_la.main(["--run", str(run_dir), "--no_png"])  # the data set's own test list and stride
    assert summary["dataset"] == dataset and summary["n_cases"] == 1 and 0.0 <= summary["dice"] <= 1.0
    assert (summary["stride_xy"], summary["stride_z"]) == {"brats2019": (64, 64)}.get(dataset, (16, 16))
    if dataset == "custom":  # per class, as ACDC
        assert set(summary["per_class"]) == {"class 1", "class 2"}
        with pytest.raises(SystemExit, match=r"trained for 3 classes, the data set evaluated \(custom\) has 2"):
            test_la.main(["--run", str(run_dir), "--n_classes", "2", "--no_png"])


def test_la_figures_unchanged(syn_la, tmp_path, one_thread):
    """LA through the description: the losses and test figures of two iterations per method, as measured with
    the code before --dataset existed (commit 8ee77c6, this machine, one thread)."""
    before = {"crossmatch": ([0.7346, 0.2913], (0.7804411995476264, 0.6399828272620853, 8.958077604988256,
                                                2.7783097985591585)),
              "supervised": ([0.6133, 0.4872], (0.794030773265235, 0.6584922694547335, 8.831709953785174,
                                                2.738604940396507)),
              "cml": ([1.7642, 3.475], (0.7361322095519482, 0.5826151681717053, 9.556331195328886,
                                        3.2261528865522466))}
    for method, (losses, figures) in before.items():
        script, flags = METHODS[method]
        argv = ["--root_path", str(syn_la), "--out_dir", str(tmp_path), *TINY, *flags]
        run_dir = script.main(argv)
        logged = [float(x) for x in re.findall(r"it \d+/2 lr \S+ loss (\S+)", (run_dir / "log.txt").read_text())]
        summary = test_la.main(["--run", str(run_dir), "--stride_xy", "16", "--stride_z", "8", "--no_png"])
        assert logged == losses, method
        assert [summary[m] for m in ("dice", "jaccard", "hd95", "asd")] == pytest.approx(figures, rel=1e-5), method


# -------------------------------------------------------------------------------------------- reproduce.py
def test_reproduce_rows_of_the_new_tables_plan_without_data(tmp_path, capsys):
    nowhere = tmp_path / "nowhere"
    argv = ["--dry_run", "--seeds", "1337", "--runs_dir", str(tmp_path / "model"), "--out", str(tmp_path / "res"),
            "--brats2019_root", str(nowhere / "BraTS2019"), "--pancreas_root", str(nowhere / "Pancreas")]
    assert reproduce.main(["table3", *argv]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^table3: 6 rows x 1 seeds = 6 runs, 40000 iterations / 9000 iterations each; 6 to train$", out,
                     re.M)
    assert out.count("train_la_cml.py --dataset brats2019") == 2 and out.count("train_la.py --dataset brats2019") == 4
    assert out.count("--list test.txt") == 6 and "BraTS2019_table3_brats25_cml_s1337_25_labeled" in out
    assert reproduce.main(["pancreas", *argv]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^pancreas: 4 rows x 1 seeds = 4 runs, 9000 iterations each", out, re.M)
    assert out.count("--list test.list") == 4 and "Pancreas_CT_pancreas_pancreas12_crossmatch_paper_s1337" in out
    rows = {r["key"]: r for r in ROWS if r["table"] in MORE_TABLES}
    assert rows["brats25_cml"]["paper"] == {"test.txt": pytest.approx((85.26, np.nan, 9.08, 1.83), nan_ok=True)}
    assert rows["brats50_supervised"]["paper"]["test.txt"][0] == 80.18
    assert all(not r["paper"] and "no paper figure" in r["row"] for k, r in rows.items() if "crossmatch" in k
               or k.startswith("pancreas"))
    with pytest.raises(SystemExit, match=r"no BRATS2019 data at .*nowhere/BraTS2019 .* --brats2019_root"):
        reproduce.main(["table3", *argv[1:]])  # without --dry_run: the data is looked for first
