"""Training and evaluation through the real command lines, on tiny synthetic data (CPU)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from utils.synthetic import make_acdc, make_la

REPO = Path(__file__).resolve().parents[1]


def run(cmd, **kw):
    env = {**os.environ, "PYTHON": sys.executable, **kw.pop("env", {})}
    out = subprocess.run(cmd, cwd=kw.pop("cwd", REPO), env=env, capture_output=True, text=True, timeout=600, **kw)
    return out


def py(script, *args, **kw):
    return run([sys.executable, str(REPO / "code" / script), *map(str, args)], **kw)


@pytest.fixture(scope="module")
def la_root(tmp_path_factory):
    return make_la(tmp_path_factory.mktemp("la"), n_train=5, n_test=2, shape=(36, 36, 24), seed=0)


@pytest.fixture(scope="module")
def acdc_root(tmp_path_factory):
    return make_acdc(tmp_path_factory.mktemp("acdc"), n_train_patients=3, n_val=1, n_test=1, shape=(6, 48, 48), seed=0)


LA_TINY = ["--labelnum", 2, "--max_iterations", 2, "--patch_size", 32, 32, 16, "--num_workers", 0, "--log_every", 1,
           "--image_every", 1]
ACDC_TINY = ["--labelnum", 1, "--max_iterations", 2, "--patch_size", 32, 32, "--batch_size", 4, "--labeled_bs", 2,
             "--num_workers", 0, "--log_every", 1, "--image_every", 1]


def check_run_folder(run_dir, max_it, task):
    names = {p.name for p in run_dir.iterdir()}
    assert {"config.json", "log.txt", "latest.pth", f"iter_{max_it}.pth"} <= names, names
    assert any(n.startswith("events.out.tfevents") for n in names)
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["args"]["max_iterations"] == max_it and cfg["git_commit"] and cfg["versions"]["torch"]
    ckpt = torch.load(run_dir / f"iter_{max_it}.pth", weights_only=True)
    assert {"model", "optimizer", "iteration", "args", "scaler"} <= set(ckpt)
    assert ckpt["iteration"] == max_it and ckpt["args"]["task"] == task


def test_la_train_then_test_through_the_command_line(la_root, tmp_path):
    r = py("train_la.py", "--root_path", la_root, "--out_dir", tmp_path, "--exp", "cli", *LA_TINY)
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = tmp_path / "LA_cli_2_labeled"
    check_run_folder(run_dir, 2, "la")
    assert "loss_tkd" in (run_dir / "log.txt").read_text()
    r = py("test_la.py", "--run", run_dir, "--list", "test.list", "--patch_size", 32, 32, 16, "--stride_xy", 8,
           "--stride_z", 8, "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["n_cases"] == 2 and {"dice", "jaccard", "hd95", "asd", "n_empty"} <= set(summary)
    assert 0.0 <= summary["dice"] <= 1.0
    assert len((run_dir / "metrics.csv").read_text().strip().splitlines()) == 1 + 2
    assert list((run_dir / "png").glob("*.png"))
    assert "mean" in r.stdout


def test_acdc_train_then_test_through_the_command_line(acdc_root, tmp_path):
    r = py("train_acdc.py", "--root_path", acdc_root, "--out_dir", tmp_path, "--exp", "cli", *ACDC_TINY,
           "--val_every", 2)
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = tmp_path / "ACDC_cli_1_labeled"
    check_run_folder(run_dir, 2, "acdc")
    assert "mean Dice on val.list" in (run_dir / "log.txt").read_text()
    r = py("test_acdc.py", "--run", run_dir, "--list", "val.list", "--patch_size", 32, 32, "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["n_cases"] == 2 and set(summary["per_class"]) == {"RV", "Myo", "LV"}


def test_supervised_method_runs(la_root, tmp_path):
    r = py("train_la.py", "--root_path", la_root, "--out_dir", tmp_path, "--exp", "sup", "--method", "supervised",
           *LA_TINY)
    assert r.returncode == 0, r.stderr[-3000:]
    log = (tmp_path / "LA_sup_2_labeled" / "log.txt").read_text()
    assert "loss_sup" in log and "loss_tkd" not in log


def first_losses(run_dir):
    lines = [re.sub(r"^\[[0-9:]+\] ", "", l) for l in (run_dir / "log.txt").read_text().splitlines()]
    return [l for l in lines if re.match(r"it \d+/", l)]


def test_same_seed_same_first_losses_other_seed_differs(la_root, tmp_path):
    logs = {}
    for name, seed in (("a", 1337), ("b", 1337), ("c", 7)):
        r = py("train_la.py", "--root_path", la_root, "--out_dir", tmp_path, "--exp", name, "--seed", seed,
               "--deterministic", *LA_TINY)
        assert r.returncode == 0, r.stderr[-3000:]
        logs[name] = first_losses(tmp_path / f"LA_{name}_2_labeled")
    assert len(logs["a"]) == 2
    assert logs["a"] == logs["b"]
    assert logs["a"] != logs["c"]


def test_run_la_sh_without_data_explains_where_it_comes_from(tmp_path):
    r = run(["bash", "run_la.sh", "8"], env={"LA_ROOT": str(tmp_path / "nowhere")})
    assert r.returncode == 1
    assert "no LA data" in r.stderr and "README" in r.stderr and "--demo" in r.stderr
    r = run(["bash", "run_acdc.sh", "7"], env={"ACDC_ROOT": str(tmp_path / "nowhere")})
    assert r.returncode == 1 and "no ACDC data" in r.stderr and "--demo" in r.stderr


@pytest.mark.parametrize("script,task", [("run_la.sh", "LA"), ("run_acdc.sh", "ACDC")])
def test_demo_script_wiring(tmp_path, script, task):
    """The demo end to end with 2 iterations (the real demo trains longer: README)."""
    r = run(["bash", script, "--demo", "--max_iterations", "2", "--out_dir", str(tmp_path / "model"),
             "--num_workers", "0"], env={"DEMO_ROOT": str(tmp_path / "data")})
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    run_dir = next((tmp_path / "model").glob(f"{task}_demo_*_labeled"))
    assert (run_dir / "summary.json").is_file() and "demo finished" in r.stdout
