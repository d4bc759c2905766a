"""Exact resume and safe checkpoints (docs/RELIABILITY.md).

With --deterministic on CPU a run interrupted at any iteration (SIGKILL, an exception) and continued with
--resume ends with a final checkpoint equal, tensor for tensor (torch.equal), to an uninterrupted run of the
same length: model (parameters and batch-norm buffers) and optimizer state. The data-loader worker count does
not matter either. Runs are tiny (ACDC 48 x 48 slices, LA 40 x 40 x 28 volumes with 32 x 32 x 16 patches)
and use one intra-op thread in every process, so that all runs compute with the same kernels.
"""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train_acdc
import train_la
from utils import checkpoint as ckpt_mod
from utils.checkpoint import CheckpointError, load_checkpoint, remove_stale_temp_files, save_checkpoint
from utils.synthetic import make_acdc, make_la

CODE = Path(__file__).resolve().parents[1] / "code"

ACDC_ITERS = 8


# ------------------------------------------------------------------------------------------------ helpers
def flatten(obj, prefix=""):
    """{'model/conv.weight': tensor, 'optimizer/state/0/exp_avg': tensor, 'optimizer/param_groups/0/lr': 0.01, ...}"""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}/{k}" if prefix else str(k)))
        return out
    if isinstance(obj, (list, tuple)):
        out = {}
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}/{i}"))
        return out
    return {prefix: obj}


def assert_same_training_state(path_a, path_b):
    """Every tensor and value of model and optimizer state equal (torch.equal), and the same iteration."""
    a, b = load_checkpoint(path_a), load_checkpoint(path_b)
    assert a["iteration"] == b["iteration"]
    fa = flatten({"model": a["model"], "optimizer": a["optimizer"]})
    fb = flatten({"model": b["model"], "optimizer": b["optimizer"]})
    assert fa.keys() == fb.keys()
    differ = [k for k in fa if not (torch.equal(fa[k], fb[k]) if torch.is_tensor(fa[k]) else fa[k] == fb[k])]
    assert not differ, f"{len(differ)} of {len(fa)} entries differ, e.g. {differ[:5]}"
    n_tensors = sum(torch.is_tensor(v) for v in fa.values())
    assert n_tensors > 50  # really compared the whole state
    return n_tensors


@pytest.fixture
def one_thread():
    """The in-process runs compute with one intra-op thread, like the subprocesses (OMP_NUM_THREADS=1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def child_env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("CROSSMATCH_DUMP_RANK_STATE", None)
    return env


def checkpoint_iteration(path):
    try:
        return load_checkpoint(path)["iteration"]
    except CheckpointError:  # not there yet
        return None


# ------------------------------------------------------------------------------------------------ data, runs
@pytest.fixture(scope="module")
def acdc_root(tmp_path_factory):
    # 2 patients x 2 frames x 16 slices = 64 slices: the first 32 (--labelnum 1) are patient001's
    return make_acdc(tmp_path_factory.mktemp("acdc") / "ACDC", n_train_patients=2, n_val=1, n_test=0,
                     shape=(16, 48, 48), shape_jitter=0.0)


@pytest.fixture(scope="module")
def la_root(tmp_path_factory):
    return make_la(tmp_path_factory.mktemp("la") / "LA", n_train=4, n_test=0, shape=(40, 40, 28), shape_jitter=0.0)


def acdc_args(root, out, exp, *extra, iters=ACDC_ITERS, workers=0):
    return ["--root_path", str(root), "--out_dir", str(out), "--exp", exp, "--labelnum", "1",
            "--patch_size", "48", "48", "--batch_size", "4", "--labeled_bs", "2", "--max_iterations", str(iters),
            "--num_workers", str(workers), "--device", "cpu", "--deterministic", "--save_every", "1",
            "--image_every", "2", *extra]


def la_args(root, out, exp, *extra, iters=3, workers=0):
    return ["--root_path", str(root), "--out_dir", str(out), "--exp", exp, "--labelnum", "2",
            "--patch_size", "32", "32", "16", "--max_iterations", str(iters), "--num_workers", str(workers),
            "--device", "cpu", "--deterministic", "--save_every", "1", *extra]


@pytest.fixture(scope="module")
def acdc_reference(acdc_root, tmp_path_factory):
    """An uninterrupted ACDC run of ACDC_ITERS iterations (in this process, one thread, no workers)."""
    out = tmp_path_factory.mktemp("runs")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_dir = train_acdc.main(acdc_args(acdc_root, out, "ref"))
    finally:
        torch.set_num_threads(before)
    assert (run_dir / f"iter_{ACDC_ITERS}.pth").is_file()
    return run_dir


# ------------------------------------------------------------------------------------------------ exact resume
def test_acdc_sigkill_then_resume_equals_uninterrupted(acdc_root, acdc_reference, tmp_path):
    """Kill a training process with SIGKILL once latest.pth reaches iteration 2, resume it, compare."""
    out = acdc_reference.parent
    exp, kill_at = "killed", 2
    cmd = [sys.executable, str(CODE / "train_acdc.py"), *acdc_args(acdc_root, out, exp, workers=2)]
    run_dir = out / f"ACDC_{exp}_1_labeled"
    latest = run_dir / "latest.pth"
    proc = subprocess.Popen(cmd, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            it = checkpoint_iteration(latest) if latest.exists() else None
            if it is not None and it >= kill_at:
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"the run ended before it could be killed:\n{proc.stderr.read()[-2000:]}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    killed_at = load_checkpoint(latest)["iteration"]
    assert kill_at <= killed_at < ACDC_ITERS, killed_at
    assert not (run_dir / f"iter_{ACDC_ITERS}.pth").exists()

    # resume in a fresh process, with another worker count
    res = subprocess.run([sys.executable, str(CODE / "train_acdc.py"),
                          *acdc_args(acdc_root, out, exp, "--resume", workers=1)],
                         env=child_env(), capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"{ACDC_ITERS} iterations (from {killed_at})" in res.stderr
    n = assert_same_training_state(acdc_reference / f"iter_{ACDC_ITERS}.pth", run_dir / f"iter_{ACDC_ITERS}.pth")
    assert_same_training_state(acdc_reference / "latest.pth", latest)
    assert not list(run_dir.glob("*.tmp"))
    print(f"\nSIGKILL resume: killed with latest.pth at iteration {killed_at}, resumed {killed_at} -> "
          f"{ACDC_ITERS}; {n} tensors of model and optimizer state equal to the uninterrupted run")


def test_acdc_worker_count_does_not_matter(acdc_root, acdc_reference, one_thread):
    run_dir = train_acdc.main(acdc_args(acdc_root, acdc_reference.parent, "workers2", workers=2))
    assert_same_training_state(acdc_reference / f"iter_{ACDC_ITERS}.pth", run_dir / f"iter_{ACDC_ITERS}.pth")


class Interrupt(BaseException):
    """Stands for Ctrl-C / a crash in the middle of an iteration."""


def interrupt_at(module, monkeypatch, at_iteration):
    real = module.train_iteration

    def wrapped(model, optimizer, scaler, batch, it, *a, **kw):
        if it == at_iteration:
            raise Interrupt(f"interrupted in iteration {it}")
        return real(model, optimizer, scaler, batch, it, *a, **kw)
    monkeypatch.setattr(module, "train_iteration", wrapped)


def test_la_interrupted_then_resumed_equals_uninterrupted(la_root, tmp_path, monkeypatch, one_thread):
    """LA, 3 iterations: uninterrupted (no workers) vs interrupted inside iteration 2 (2 workers) + resumed."""
    ref = train_la.main(la_args(la_root, tmp_path, "ref"))
    with monkeypatch.context() as m:
        interrupt_at(train_la, m, 1)
        with pytest.raises(Interrupt):
            train_la.main(la_args(la_root, tmp_path, "cut", workers=2))
    run_dir = tmp_path / "LA_cut_2_labeled"
    assert load_checkpoint(run_dir / "latest.pth")["iteration"] == 1
    train_la.main(la_args(la_root, tmp_path, "cut", "--resume"))
    assert_same_training_state(ref / "iter_3.pth", run_dir / "iter_3.pth")


def test_acdc_resume_from_every_iteration(acdc_root, acdc_reference, tmp_path, monkeypatch, one_thread):
    """Interruptions in the first and in the last iteration also resume exactly (iterations 0 and N - 1)."""
    for at in (0, ACDC_ITERS - 1):
        exp = f"cut{at}"
        with monkeypatch.context() as m:
            interrupt_at(train_acdc, m, at)
            with pytest.raises(Interrupt):
                train_acdc.main(acdc_args(acdc_root, tmp_path, exp))
        run_dir = tmp_path / f"ACDC_{exp}_1_labeled"
        if at == 0:  # nothing saved yet: --resume has nothing to continue, a plain start is refused
            assert not (run_dir / "latest.pth").exists()
            with pytest.raises(SystemExit, match="nothing to resume"):
                train_acdc.main(acdc_args(acdc_root, tmp_path, exp, "--resume"))
            with pytest.raises(SystemExit, match="already holds a run"):
                train_acdc.main(acdc_args(acdc_root, tmp_path, exp))
            train_acdc.main(acdc_args(acdc_root, tmp_path, exp, "--overwrite"))
        else:
            train_acdc.main(acdc_args(acdc_root, tmp_path, exp, "--resume"))
        assert_same_training_state(acdc_reference / f"iter_{ACDC_ITERS}.pth", run_dir / f"iter_{ACDC_ITERS}.pth")


# ------------------------------------------------------------------------------------------------ run folder rules
def test_existing_run_folder_is_refused_without_resume_or_overwrite(acdc_root, acdc_reference):
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as e:
        train_acdc.main(acdc_args(acdc_root, acdc_reference.parent, "ref"))
    assert "already holds a run" in str(e.value.code) and "--resume" in str(e.value.code)
    assert time.perf_counter() - t0 < 5


def test_overwrite_replaces_the_old_run(acdc_root, acdc_reference, tmp_path, one_thread):
    old = tmp_path / "ACDC_ow_1_labeled"
    shutil.copytree(acdc_reference, old)
    train_acdc.main(acdc_args(acdc_root, tmp_path, "ow", "--overwrite", iters=1))
    assert sorted(p.name for p in old.glob("*.pth")) == ["iter_1.pth", "latest.pth"]


def test_overwrite_keeps_the_old_run_when_the_data_is_bad(acdc_root, acdc_reference, tmp_path):
    old = tmp_path / "ACDC_ow_1_labeled"
    shutil.copytree(acdc_reference, old)
    with pytest.raises(SystemExit, match="root not found"):
        train_acdc.main(acdc_args(tmp_path / "missing", tmp_path, "ow", "--overwrite", iters=1))
    assert (old / f"iter_{ACDC_ITERS}.pth").is_file()


def test_resume_of_a_finished_run_says_so_and_trains_nothing(acdc_root, acdc_reference, tmp_path, capsys):
    run_dir = tmp_path / "ACDC_done_1_labeled"
    shutil.copytree(acdc_reference, run_dir)
    final = run_dir / f"iter_{ACDC_ITERS}.pth"
    stamp = final.stat().st_mtime_ns
    t0 = time.perf_counter()
    assert train_acdc.main(acdc_args(acdc_root, tmp_path, "done", "--resume")) == run_dir  # returns: exit 0
    assert time.perf_counter() - t0 < 5
    assert "already finished" in capsys.readouterr().err
    assert final.stat().st_mtime_ns == stamp and not (run_dir / "config_resume.json").exists()
    # killed between latest.pth and the final checkpoint: the final one is written from latest.pth
    final.unlink()
    train_acdc.main(acdc_args(acdc_root, tmp_path, "done", "--resume"))
    assert_same_training_state(acdc_reference / f"iter_{ACDC_ITERS}.pth", final)


def test_resume_of_a_finished_run_exits_0_through_the_cli(acdc_root, acdc_reference):
    res = subprocess.run([sys.executable, str(CODE / "train_acdc.py"),
                          *acdc_args(acdc_root, acdc_reference.parent, "ref", "--resume")],
                         env=child_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "already finished" in res.stderr and "nothing to train" in res.stderr


@pytest.mark.parametrize("flags, shown", [
    (["--max_iterations", "9"], "--max_iterations 9 (saved 8)"),
    (["--base_lr", "0.02"], "--base_lr 0.02 (saved 0.01)"),
    (["--seed", "1"], "--seed 1 (saved 1337)"),
    (["--eta", "0.5", "--cutmix_p", "0"], "--cutmix_p 0.0 (saved 0.5), --eta 0.5 (saved 0.3)"),
])
def test_resume_refuses_flags_that_change_the_method(acdc_root, acdc_reference, tmp_path, flags, shown):
    run_dir = tmp_path / "ACDC_chg_1_labeled"
    shutil.copytree(acdc_reference, run_dir)
    (run_dir / f"iter_{ACDC_ITERS}.pth").unlink()
    argv = acdc_args(acdc_root, tmp_path, "chg", "--resume")
    for flag, value in zip(flags[::2], flags[1::2]):  # replace or append
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    with pytest.raises(SystemExit) as e:
        train_acdc.main(argv)
    msg = str(e.value.code)
    assert msg.startswith("error: --resume: flags that change the method differ") and shown in msg, msg
    assert "\n" not in msg


def test_resume_warns_about_other_flags(acdc_root, acdc_reference):
    from utils.run import compare_resume_args
    args = train_acdc.parse_args(acdc_args(acdc_root, acdc_reference.parent, "ref", "--resume", workers=3)
                                 + ["--log_every", "5"])
    warnings = compare_resume_args(args, load_checkpoint(acdc_reference / "latest.pth"))
    assert any("--num_workers 3 (saved 0)" in w for w in warnings)
    assert any("--log_every 5 (saved 10)" in w for w in warnings)
    # another intra-op thread count: allowed, with a warning that the sums will be ordered differently
    from utils.run import load_resume
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ckpt = load_resume(args, torch.device("cpu"), 1)
    finally:
        torch.set_num_threads(before)
    assert load_checkpoint(acdc_reference / "latest.pth")["num_threads"] == 1
    assert any("2 intra-op CPU threads, the saved run used 1" in w for w in ckpt["resume_warnings"])


def test_resume_refuses_another_number_of_processes(acdc_root, acdc_reference, tmp_path):
    run_dir = tmp_path / "ACDC_w_1_labeled"
    shutil.copytree(acdc_reference, run_dir)
    state = load_checkpoint(run_dir / "latest.pth")
    state["world_size"] = 2
    save_checkpoint(state, run_dir / "latest.pth")
    with pytest.raises(SystemExit, match="trained by 2 process"):
        train_acdc.main(acdc_args(acdc_root, tmp_path, "w", "--resume"))


# ------------------------------------------------------------------------------------------------ checkpoints
def test_checkpoint_holds_what_resume_needs(acdc_reference):
    state = load_checkpoint(acdc_reference / "latest.pth")
    assert {"model", "optimizer", "scaler", "iteration", "args", "task", "world_size", "num_threads"} <= set(state)
    assert state["iteration"] == ACDC_ITERS and state["task"] == "acdc" and state["world_size"] == 1
    assert any(k.endswith("running_mean") for k in state["model"])  # buffers too
    assert state["optimizer"]["state"] and state["args"]["seed"] == 1337


def test_failed_write_leaves_the_old_checkpoint_and_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "latest.pth"
    save_checkpoint({"model": {"w": torch.ones(3)}, "iteration": 1}, path)
    before = path.read_bytes()

    def dies_midway(obj, f, *a, **kw):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full (simulated)")
    monkeypatch.setattr(ckpt_mod.torch, "save", dies_midway)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint({"model": {"w": torch.zeros(3)}, "iteration": 2}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["latest.pth"]
    monkeypatch.undo()
    assert load_checkpoint(path)["iteration"] == 1

    # a write killed at the same point (SIGKILL: no cleanup) leaves a temp file; resume removes it
    orphan = tmp_path / "latest.pth.abc123.tmp"
    orphan.write_bytes(b"PK\x03\x04 half")
    assert remove_stale_temp_files(tmp_path) == [orphan] and not orphan.exists()
    assert load_checkpoint(path)["iteration"] == 1


def test_non_finite_weights_are_never_written(tmp_path, acdc_reference):
    from argparse import Namespace

    from networks import build_model
    from utils.run import save_run_checkpoint
    path = tmp_path / "latest.pth"
    shutil.copy(acdc_reference / "latest.pth", path)
    before = path.read_bytes()
    model = build_model("acdc")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with torch.no_grad():
        next(model.parameters())[0].fill_(float("nan"))
    with pytest.raises(SystemExit, match="non-finite weights after iteration 9"):
        save_run_checkpoint(path, model, opt, torch.amp.GradScaler("cpu", enabled=False), 9,
                            Namespace(task="acdc", seed=1))
    assert path.read_bytes() == before
