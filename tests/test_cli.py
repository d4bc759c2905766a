"""Training and evaluation through the real command lines and the run scripts, on tiny synthetic data (CPU)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_acdc
import train_la

REPO = Path(__file__).resolve().parents[1]


def run(cmd, **kw):
    env = {**os.environ, "PYTHON": sys.executable, **kw.pop("env", {})}
    return subprocess.run(cmd, cwd=kw.pop("cwd", REPO), env=env, capture_output=True, text=True, timeout=600, **kw)


def py(script, *args, **kw):
    return run([sys.executable, str(REPO / "code" / script), *map(str, args)], **kw)


LA_TINY = ["--device", "cpu", "--labelnum", 2, "--max_iterations", 2, "--patch_size", 32, 32, 16, "--num_workers", 0,
           "--log_every", 1, "--image_every", 1]
ACDC_TINY = ["--device", "cpu", "--labelnum", 1, "--max_iterations", 2, "--patch_size", 32, 32, "--batch_size", 4,
             "--labeled_bs", 2, "--num_workers", 0, "--log_every", 1, "--image_every", 1]


def check_run_folder(run_dir, max_it, task):
    names = {p.name for p in run_dir.iterdir()}
    assert {"config.json", "log.txt", "latest.pth", f"iter_{max_it}.pth"} <= names, names
    assert any(n.startswith("events.out.tfevents") for n in names)
    # --image_every 1: the labeled image, its label and the prediction at every iteration
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    images = EventAccumulator(str(run_dir)).Reload().Tags()["images"]
    assert set(images) == {"train/image", "train/label", "train/prediction"}, images
    assert not any(n.endswith(".tmp") for n in names)
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["args"]["max_iterations"] == max_it and cfg["git_commit"] and cfg["versions"]["torch"]
    assert cfg["run_dir"] == str(run_dir) and cfg["world_size"] == 1 and cfg["device"] == "cpu"
    ckpt = torch.load(run_dir / f"iter_{max_it}.pth", weights_only=True)
    assert {"model", "optimizer", "iteration", "args", "world_size", "num_threads"} <= set(ckpt)
    assert ckpt["iteration"] == max_it and ckpt["args"]["task"] == task and ckpt["world_size"] == 1
    latest = torch.load(run_dir / "latest.pth", weights_only=True)
    assert latest["iteration"] == max_it
    assert all(torch.equal(latest["model"][k], v) for k, v in ckpt["model"].items())


def test_la_train_then_test_through_the_command_line(syn_la, tmp_path):
    r = py("train_la.py", "--root_path", syn_la, "--out_dir", tmp_path, "--exp", "cli", *LA_TINY)
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = tmp_path / "LA_cli_2_labeled"
    check_run_folder(run_dir, 2, "la")
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["n_labeled"] == 2 and cfg["n_unlabeled"] == 3
    assert "loss_tkd" in (run_dir / "log.txt").read_text()
    r = py("test_la.py", "--run", run_dir, "--list", "test.list", "--patch_size", 32, 32, 16, "--stride_xy", 8,
           "--stride_z", 8, "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((run_dir / "eval_test" / "summary.json").read_text())
    assert summary["n_cases"] == 2 and {"dice", "jaccard", "hd95", "asd", "n_empty"} <= set(summary)
    assert 0.0 <= summary["dice"] <= 1.0 and summary["final_checkpoint"] is True
    assert summary["checkpoint"] == str(run_dir / "iter_2.pth") and summary["root_path"] == str(syn_la)
    assert len((run_dir / "eval_test" / "metrics.csv").read_text().strip().splitlines()) == 1 + 2
    assert len(list((run_dir / "eval_test" / "png").glob("*.png"))) == 2
    assert re.search(r"^mean ", r.stdout, re.M) and re.search(r"^std ", r.stdout, re.M)


def test_acdc_train_then_test_through_the_command_line(syn_acdc, tmp_path):
    r = py("train_acdc.py", "--root_path", syn_acdc, "--out_dir", tmp_path, "--exp", "cli", *ACDC_TINY,
           "--val_every", 2)
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = tmp_path / "ACDC_cli_1_labeled"
    check_run_folder(run_dir, 2, "acdc")
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["n_labeled_slices"] == 32 and cfg["n_unlabeled_slices"] == 4
    assert "mean Dice on val.list" in (run_dir / "log.txt").read_text()
    r = py("test_acdc.py", "--run", run_dir, "--list", "val.list", "--patch_size", 32, 32, "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((run_dir / "eval_val" / "summary.json").read_text())
    assert summary["n_cases"] == 2 and set(summary["per_class"]) == {"RV", "Myo", "LV"}
    assert summary["list"] == str(syn_acdc / "val.list")


def test_supervised_method_runs(syn_la, tmp_path):
    r = py("train_la.py", "--root_path", syn_la, "--out_dir", tmp_path, "--exp", "sup", "--method", "supervised",
           *LA_TINY)
    assert r.returncode == 0, r.stderr[-3000:]
    log = (tmp_path / "LA_sup_2_labeled" / "log.txt").read_text()
    assert "loss_sup" in log and "loss_tkd" not in log
    assert "2 labeled / 0 unlabeled cases" in log


def first_losses(run_dir):
    lines = [re.sub(r"^\[[0-9:]+\] ", "", line) for line in (run_dir / "log.txt").read_text().splitlines()]
    return [line for line in lines if re.match(r"it \d+/", line)]


def test_same_seed_same_first_losses_other_seed_differs(syn_la, tmp_path):
    logs = {}
    for name, seed in (("a", 1337), ("b", 1337), ("c", 7)):
        r = py("train_la.py", "--root_path", syn_la, "--out_dir", tmp_path, "--exp", name, "--seed", seed,
               "--deterministic", *LA_TINY)
        assert r.returncode == 0, r.stderr[-3000:]
        logs[name] = first_losses(tmp_path / f"LA_{name}_2_labeled")
    assert len(logs["a"]) == 2
    assert logs["a"] == logs["b"]
    assert logs["a"] != logs["c"]


# ----------------------------------------------------------------------------- --print_run_dir / --print_config
def listing(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_mtime_ns) for p in Path(folder).rglob("*"))


def test_print_run_dir_prints_the_folder_and_touches_nothing(tmp_path):
    # a relative --out_dir is taken from the repository root, not the working directory; the data root may not exist
    rel = f"model_print_run_dir_test_{os.getpid()}"
    r = py("train_la.py", "--print_run_dir", "--out_dir", rel, "--exp", "x", "--labelnum", 4, "--root_path",
           tmp_path / "nowhere", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout == f"{REPO / rel / 'LA_x_4_labeled'}\n"
    assert not (REPO / rel).exists() and not (tmp_path / rel).exists() and list(tmp_path.iterdir()) == []


def test_print_run_dir_in_process(syn_acdc, tmp_path, capsys):
    before = listing(syn_acdc)
    assert train_acdc.main(["--print_run_dir", "--out_dir", str(tmp_path / "m"), "--root_path", str(syn_acdc),
                            "--labelnum", "1"]) == tmp_path / "m" / "ACDC_CrossMatch_1_labeled"
    assert capsys.readouterr().out == f"{tmp_path / 'm' / 'ACDC_CrossMatch_1_labeled'}\n"
    assert not (tmp_path / "m").exists() and listing(syn_acdc) == before


def test_print_config_is_json_and_touches_nothing(syn_la, syn_acdc, tmp_path, capsys):
    out = tmp_path / "m"
    before = listing(syn_la)
    run_dir = train_la.main(["--print_config", "--out_dir", str(out), "--root_path", str(syn_la), "--exp", "cfg",
                             "--labelnum", "2", "--patch_size", "32", "32", "16", "--amp", "bf16"])
    cfg = json.loads(capsys.readouterr().out)
    assert run_dir == out / "LA_cfg_2_labeled" and cfg["run_dir"] == str(run_dir)
    args = cfg["args"]
    assert args["task"] == "la" and args["labelnum"] == 2 and args["patch_size"] == [32, 32, 16]
    assert args["max_iterations"] == 9000 and args["base_lr"] == 1e-3 and args["amp"] == "bf16"
    assert args["root_path"] == str(syn_la) and not any(k.startswith("print_") for k in args)
    assert not out.exists() and listing(syn_la) == before
    # ACDC: the length in iterations comes from --epochs over the unlabeled slices of the list
    before = listing(syn_acdc)
    train_acdc.main(["--print_config", "--out_dir", str(out), "--root_path", str(syn_acdc), "--labelnum", "1",
                     "--batch_size", "4", "--labeled_bs", "2", "--epochs", "10"])
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["args"]["max_iterations"] == 10 * 2  # 4 unlabeled slices, 2 per batch
    assert cfg["run_dir"] == str(out / "ACDC_CrossMatch_1_labeled")
    assert not out.exists() and listing(syn_acdc) == before


EXPECTED_ROWS = {  # (task, preset): the rows of docs/METHOD.md's settings table
    ("la", "paper"): dict(max_iterations=9000, poly_horizon=None, conf_thresh=0.85, conf_ramp=0, ip_loss="stacked",
                          tkd_loss="stacked", kd_weight=0.5, nesterov=False, exp="CrossMatch"),
    ("la", "release"): dict(max_iterations=14000, poly_horizon=17000, conf_thresh=0.75, conf_ramp=17000,
                            ip_loss="mean", tkd_loss="mean", kd_weight=1.0, nesterov=False, exp="CrossMatch_release"),
    ("acdc", "paper"): dict(conf_thresh=0.95, conf_ramp=0, ip_loss="stacked", tkd_loss="stacked", kd_weight=0.5,
                            nesterov=False, uint8_unlabeled=False, optimizer="sgd", exp="CrossMatch"),
    ("acdc", "release"): dict(conf_thresh=0.95, conf_ramp=0, ip_loss="mean", tkd_loss="mean", kd_weight=0.5,
                              nesterov=True, uint8_unlabeled=True, optimizer="sgd", exp="CrossMatch_release"),
}


@pytest.mark.parametrize("task,preset", list(EXPECTED_ROWS))
def test_print_config_of_each_preset(task, preset, tmp_path):
    """--print_config through the command line: every preset row resolved, both presets share the rest
    (CutMix from a second batch, no output dropout in the perturbed forward, seed 1337), an explicit flag wins."""
    script = f"train_{task}.py"
    r = py(script, "--preset", preset, "--print_config", "--out_dir", tmp_path / "m", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    args = json.loads(r.stdout)["args"]
    assert args["preset"] == preset
    for key, value in EXPECTED_ROWS[(task, preset)].items():
        assert args[key] == value, (key, args[key])
    assert args["cutmix_partner"] == "second_batch" and args["pert_out_dropout"] is False and args["seed"] == 1337
    assert args["eta"] == 0.3 and (args["drop_weak"], args["drop_strong"]) == (0.25, 0.75)
    r = py(script, "--preset", preset, "--print_config", "--kd_weight", "0.3", "--conf_thresh", "0.9", cwd=tmp_path)
    args = json.loads(r.stdout)["args"]
    assert (args["kd_weight"], args["conf_thresh"]) == (0.3, 0.9)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("preset", ["paper", "release"])
def test_each_preset_trains_two_iterations(preset, syn_la, syn_acdc, tmp_path):
    r = py("train_la.py", "--root_path", syn_la, "--out_dir", tmp_path, "--preset", preset, *LA_TINY)
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = tmp_path / ("LA_CrossMatch_2_labeled" if preset == "paper" else "LA_CrossMatch_release_2_labeled")
    check_run_folder(run_dir, 2, "la")
    assert json.loads((run_dir / "config.json").read_text())["args"]["preset"] == preset
    tau = [float(m) for m in re.findall(r" tau ([0-9.]+)", (run_dir / "log.txt").read_text())]
    assert tau == ([0.85, 0.85] if preset == "paper" else [pytest.approx(0.521, abs=1e-3)] * 2)
    r = py("train_acdc.py", "--root_path", syn_acdc, "--out_dir", tmp_path, "--preset", preset, *ACDC_TINY)
    assert r.returncode == 0, r.stderr[-3000:]


# ---------------------------------------------------------------------------------------------- run scripts
def test_run_scripts_without_data_explain_where_it_comes_from(tmp_path):
    r = run(["bash", "run_la.sh", "8"], env={"LA_ROOT": str(tmp_path / "nowhere")})
    assert r.returncode == 1
    assert "no LA data" in r.stderr and "README" in r.stderr and "--demo" in r.stderr
    r = run(["bash", "run_acdc.sh", "7"], env={"ACDC_ROOT": str(tmp_path / "nowhere")})
    assert r.returncode == 1 and "no ACDC data" in r.stderr and "--demo" in r.stderr
    r = run(["bash", "run_la.sh"])
    assert r.returncode == 2 and "usage" in r.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("script,task", [("run_la.sh", "LA"), ("run_acdc.sh", "ACDC")])
def test_demo_script_wiring(tmp_path, script, task):
    """The demo end to end with 2 iterations (the real demo trains longer: README)."""
    r = run(["bash", script, "--demo", "--max_iterations", "2", "--out_dir", str(tmp_path / "model"),
             "--num_workers", "0"], env={"DEMO_ROOT": str(tmp_path / "data")})
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    run_dirs = list((tmp_path / "model").iterdir())
    assert [p.name for p in run_dirs] == [f"{task}_demo_{3 if task == 'ACDC' else 4}_labeled"]
    summary = json.loads((run_dirs[0] / "eval_test" / "summary.json").read_text())
    assert summary["final_checkpoint"] is True and summary["list"] == str(tmp_path / "data" / "test.list")
    assert re.search(r"^finished in \d+ s$", r.stdout, re.M)
