"""Exact resume and safe checkpoints.

With --deterministic on CPU a run interrupted at any iteration (SIGKILL, an exception) and continued with
--resume ends with a final checkpoint equal, tensor for tensor (torch.equal), to an uninterrupted run of the
same length: model (parameters and batch-norm buffers) and optimizer state; the losses it logs are the same
too. The data-loader worker count does not matter either. Runs are tiny (ACDC 48 x 48 slices, LA 40 x 40 x 28
volumes with 32 x 32 x 16 patches) and use one intra-op thread in every process, so that all runs compute with
the same kernels.
"""
import errno
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import zipfile
from argparse import Namespace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import test_acdc
import train_acdc
import train_la
from utils import loop, run_folder
from utils import checkpoint as ckpt_mod
from utils.checkpoint import (CheckpointError, load_checkpoint, load_resume, mount_point, remove_temp_files,
                              save_checkpoint, save_training_state)
from utils.data import write_h5
from utils.flags import RESUME_MAY_DIFFER
from utils.synthetic import make_acdc, make_la

CODE = Path(__file__).resolve().parents[1] / "code"

ACDC_ITERS = 8


# ------------------------------------------------------------------------------------------------ helpers
def flatten(obj, prefix=""):
    """{'model/conv.weight': tensor, 'optimizer/state/0/momentum_buffer': tensor, ...}"""
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


def logged_scalars(run_dir):
    """{tag: {step: [values]}} of every tensorboard events file in a run folder (several after a resume)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util
    out = {}
    for f in sorted(Path(run_dir).glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(f)).Load():
            for v in event.summary.value:
                if v.metadata.plugin_data.plugin_name == "scalars":
                    out.setdefault(v.tag, {}).setdefault(event.step, []).append(
                        float(tensor_util.make_ndarray(v.tensor)))
    return out


def child_env():
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")


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
    """An uninterrupted ACDC run of ACDC_ITERS iterations (in this process, one thread, no workers).
    A copy of latest.pth after every iteration is kept in ``<run_dir>.snapshots/latest_<it>.pth``."""
    out = tmp_path_factory.mktemp("runs")
    snapshots = out / "ACDC_ref_1_labeled.snapshots"
    snapshots.mkdir()
    real = loop.save_training_state

    def keeping_copies(path, model, optimizer, iteration, *rest):
        real(path, model, optimizer, iteration, *rest)
        if Path(path).name == "latest.pth":
            shutil.copy(path, snapshots / f"latest_{iteration}.pth")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    loop.save_training_state = keeping_copies
    try:
        run_dir = train_acdc.main(acdc_args(acdc_root, out, "ref"))
    finally:
        loop.save_training_state = real
        torch.set_num_threads(before)
    assert (run_dir / f"iter_{ACDC_ITERS}.pth").is_file()
    assert sorted(p.name for p in snapshots.iterdir()) == sorted(f"latest_{i}.pth" for i in range(1, ACDC_ITERS + 1))
    return run_dir


# ------------------------------------------------------------------------------------------------ exact resume
def test_acdc_sigkill_then_resume_equals_uninterrupted(acdc_root, acdc_reference, tmp_path):
    """Kill a training process with SIGKILL once latest.pth reaches iteration 2, resume it, compare weights,
    optimizer state and logged losses; a temp file left by a killed checkpoint write is removed by the
    resume."""
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

    # a checkpoint write cut by the kill leaves a temp file; the resume removes it
    orphan = run_dir / "latest.pth.k1ll3d.tmp"
    orphan.write_bytes(b"PK\x03\x04 half a checkpoint")

    # resume in a fresh process, with another worker count (allowed, with a warning)
    res = subprocess.run([sys.executable, str(CODE / "train_acdc.py"),
                          *acdc_args(acdc_root, out, exp, "--resume", workers=1)],
                         env=child_env(), capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"iterations {killed_at} -> {ACDC_ITERS}" in res.stderr, res.stderr[-3000:]
    assert "--num_workers 1 (saved 2)" in res.stderr
    assert f"removed {orphan.name}" in res.stderr and not orphan.exists()
    assert not list(run_dir.glob("*.tmp"))
    assert (run_dir / "config_resume.json").is_file()
    n = assert_same_training_state(acdc_reference / f"iter_{ACDC_ITERS}.pth", run_dir / f"iter_{ACDC_ITERS}.pth")
    assert_same_training_state(acdc_reference / "latest.pth", latest)

    # the same losses, iteration by iteration (killed run and continuation together)
    ref, got = logged_scalars(acdc_reference), logged_scalars(run_dir)
    assert set(got["train/loss"]) == set(range(1, ACDC_ITERS + 1))
    compared = 0
    for tag, steps in got.items():
        for step, values in steps.items():
            assert all(v == ref[tag][step][0] for v in values), (tag, step, values, ref[tag][step])
            compared += len(values)
    assert compared >= 8 * ACDC_ITERS
    print(f"\nSIGKILL resume: killed with latest.pth at iteration {killed_at}, resumed {killed_at} -> "
          f"{ACDC_ITERS}; {n} tensors of model and optimizer state and {compared} logged scalars equal to the "
          f"uninterrupted run")


def test_acdc_worker_count_does_not_matter(acdc_root, acdc_reference, one_thread):
    run_dir = train_acdc.main(acdc_args(acdc_root, acdc_reference.parent, "workers2", workers=2))
    assert_same_training_state(acdc_reference / f"iter_{ACDC_ITERS}.pth", run_dir / f"iter_{ACDC_ITERS}.pth")


class Interrupt(BaseException):
    """Stands for Ctrl-C / a crash in the middle of an iteration."""


def interrupt_at(module, monkeypatch, at_iteration=None, error=Interrupt):
    """Make ``module.train_iteration`` raise ``error`` in iteration ``at_iteration``; returns the list of the
    iterations it trains (so that a test sees where a resumed run started)."""
    real, trained = module.train_iteration, []

    def wrapped(model, optimizer, batch, it, args, device):
        if it == at_iteration:
            raise error(f"interrupted in iteration {it}")
        trained.append(it)
        return real(model, optimizer, batch, it, args, device)
    monkeypatch.setattr(module, "train_iteration", wrapped)
    return trained


def test_la_interrupted_then_resumed_equals_uninterrupted(la_root, tmp_path, monkeypatch, one_thread):
    """LA, 3 iterations: uninterrupted (no workers) vs interrupted inside iteration 2 (2 workers) + resumed."""
    ref = train_la.main(la_args(la_root, tmp_path, "ref"))
    with monkeypatch.context() as m:
        interrupt_at(train_la, m, 1)
        with pytest.raises(Interrupt):
            train_la.main(la_args(la_root, tmp_path, "cut", workers=2))
    run_dir = tmp_path / "LA_cut_2_labeled"
    assert load_checkpoint(run_dir / "latest.pth")["iteration"] == 1
    assert not (run_dir / "iter_3.pth").exists()
    trained = interrupt_at(train_la, monkeypatch)
    train_la.main(la_args(la_root, tmp_path, "cut", "--resume"))
    assert trained == [1, 2]
    assert_same_training_state(ref / "iter_3.pth", run_dir / "iter_3.pth")


def test_acdc_interrupted_in_the_first_iteration(acdc_root, acdc_reference, tmp_path, monkeypatch, one_thread):
    """An interruption inside iteration 0 leaves a run folder without latest.pth: --resume has nothing to
    continue, a plain start is refused, --overwrite starts afresh and trains the same run."""
    exp = "cut0"
    with monkeypatch.context() as m:
        interrupt_at(train_acdc, m, 0)
        with pytest.raises(Interrupt):
            train_acdc.main(acdc_args(acdc_root, tmp_path, exp))
    run_dir = tmp_path / f"ACDC_{exp}_1_labeled"
    assert (run_dir / "config.json").is_file() and not (run_dir / "latest.pth").exists()
    with pytest.raises(SystemExit, match="nothing to resume"):
        train_acdc.main(acdc_args(acdc_root, tmp_path, exp, "--resume"))
    with pytest.raises(SystemExit, match="without latest.pth .*; pass --overwrite to start it again"):
        train_acdc.main(acdc_args(acdc_root, tmp_path, exp))
    train_acdc.main(acdc_args(acdc_root, tmp_path, exp, "--overwrite"))
    assert_same_training_state(acdc_reference / f"iter_{ACDC_ITERS}.pth", run_dir / f"iter_{ACDC_ITERS}.pth")


def test_acdc_interrupted_in_the_last_iteration(acdc_root, acdc_reference, tmp_path, monkeypatch, one_thread):
    """Also: the tensorboard events are flushed at every checkpoint, so an interrupted run (its writer never
    closed) keeps the logs of every iteration up to its latest.pth."""
    exp = "cutlast"
    flushed = []  # the iteration of latest.pth at each flush

    class RecordingWriter(run_folder.SummaryWriter):
        def flush(self):
            flushed.append(checkpoint_iteration(Path(self.log_dir) / "latest.pth"))
            super().flush()
    with monkeypatch.context() as m:
        m.setattr(run_folder, "SummaryWriter", RecordingWriter)
        interrupt_at(train_acdc, m, ACDC_ITERS - 1)
        with pytest.raises(Interrupt):
            train_acdc.main(acdc_args(acdc_root, tmp_path, exp))
    assert flushed == list(range(1, ACDC_ITERS)), flushed
    run_dir = tmp_path / f"ACDC_{exp}_1_labeled"
    assert load_checkpoint(run_dir / "latest.pth")["iteration"] == ACDC_ITERS - 1
    assert not (run_dir / f"iter_{ACDC_ITERS}.pth").exists()
    trained = interrupt_at(train_acdc, monkeypatch)
    train_acdc.main(acdc_args(acdc_root, tmp_path, exp, "--resume"))
    assert trained == [ACDC_ITERS - 1]
    assert_same_training_state(acdc_reference / f"iter_{ACDC_ITERS}.pth", run_dir / f"iter_{ACDC_ITERS}.pth")


def test_acdc_resume_from_every_iteration(acdc_root, acdc_reference, tmp_path, monkeypatch, one_thread):
    """The run folder as an interruption after iteration k leaves it (latest.pth of iteration k, no final
    checkpoint), for every k from 1 to N - 1: the resumed run ends equal to the uninterrupted one."""
    snapshots = acdc_reference.parent / f"{acdc_reference.name}.snapshots"
    for k in range(1, ACDC_ITERS):
        exp = f"from{k}"
        run_dir = tmp_path / f"ACDC_{exp}_1_labeled"
        run_dir.mkdir()
        shutil.copy(acdc_reference / "config.json", run_dir / "config.json")
        shutil.copy(snapshots / f"latest_{k}.pth", run_dir / "latest.pth")
        with monkeypatch.context() as m:
            trained = interrupt_at(train_acdc, m)
            train_acdc.main(acdc_args(acdc_root, tmp_path, exp, "--resume"))
        assert trained == list(range(k, ACDC_ITERS))  # continued, not started afresh
        assert_same_training_state(acdc_reference / f"iter_{ACDC_ITERS}.pth", run_dir / f"iter_{ACDC_ITERS}.pth")
        shutil.rmtree(run_dir)  # 15 MB per checkpoint


# ------------------------------------------------------------------------------------------------ run folder rules
def test_existing_run_folder_is_refused_without_resume_or_overwrite(acdc_root, acdc_reference):
    stamp = (acdc_reference / "latest.pth").stat().st_mtime_ns
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as e:
        train_acdc.main(acdc_args(acdc_root, acdc_reference.parent, "ref"))
    msg = str(e.value.code)
    assert "already holds a run" in msg and "--resume" in msg and "--overwrite" in msg and "\n" not in msg
    assert time.perf_counter() - t0 < 5
    assert (acdc_reference / "latest.pth").stat().st_mtime_ns == stamp


def test_overwrite_replaces_the_old_run(acdc_root, acdc_reference, tmp_path, one_thread):
    old = tmp_path / "ACDC_ow_1_labeled"
    shutil.copytree(acdc_reference, old)
    (old / "latest.pth.stale.tmp").write_bytes(b"x")
    train_acdc.main(acdc_args(acdc_root, tmp_path, "ow", "--overwrite", iters=1))
    assert sorted(p.name for p in old.glob("*.pth")) == ["iter_1.pth", "latest.pth"]
    assert not list(old.glob("*.tmp")) and not (old / "config_resume.json").exists()
    assert load_checkpoint(old / "latest.pth")["iteration"] == 1


@pytest.mark.parametrize("bad_data", ["missing root", "NaN in a slice"])
def test_overwrite_keeps_the_old_run_when_the_data_is_bad(acdc_root, acdc_reference, tmp_path, bad_data):
    """--overwrite deletes the old run only after the data is loaded and checked: a refusal for bad data, also
    one found when the training set reads its cases, leaves the old run folder as it was."""
    old = tmp_path / "ACDC_ow_1_labeled"
    shutil.copytree(acdc_reference, old)
    before = {p.name: p.stat().st_mtime_ns for p in old.iterdir()}
    if bad_data == "missing root":
        root, expected = tmp_path / "missing", "no such folder"
    else:
        root = shutil.copytree(acdc_root, tmp_path / "ACDC")
        name = (root / "train_slices.list").read_text().split()[40]
        path = root / "data" / "slices" / f"{name}.h5"
        with h5py.File(path, "r+") as h:
            image = h["image"][()]
            image[1, 2] = float("nan")
            h["image"][...] = image
        expected = "non-finite values"
    with pytest.raises(SystemExit) as e:
        train_acdc.main(acdc_args(root, tmp_path, "ow", "--overwrite", iters=1))
    assert expected in str(e.value.code)
    assert {p.name: p.stat().st_mtime_ns for p in old.iterdir()} == before


def test_resume_of_a_finished_run_says_so_and_trains_nothing(acdc_root, acdc_reference, tmp_path, capsys,
                                                             monkeypatch):
    def no_training(*a, **k):
        raise AssertionError("a finished run was trained again")
    monkeypatch.setattr(train_acdc, "train_iteration", no_training)
    monkeypatch.setattr(loop, "TrainSet", no_training)
    run_dir = tmp_path / "ACDC_done_1_labeled"
    shutil.copytree(acdc_reference, run_dir)
    final = run_dir / f"iter_{ACDC_ITERS}.pth"
    stamps = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()}
    t0 = time.perf_counter()
    assert train_acdc.main(acdc_args(acdc_root, tmp_path, "done", "--resume")) == run_dir  # returns: exit 0
    assert time.perf_counter() - t0 < 5
    assert "already finished" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()} == stamps  # nothing written
    # killed between latest.pth and the final checkpoint (while writing it): the final one is written from
    # latest.pth, the orphan temporary file removed
    final.unlink()
    orphan = run_dir / f"iter_{ACDC_ITERS}.pth.k1ll3d.tmp"
    orphan.write_bytes(b"PK\x03\x04 half a checkpoint")
    train_acdc.main(acdc_args(acdc_root, tmp_path, "done", "--resume"))
    assert_same_training_state(acdc_reference / f"iter_{ACDC_ITERS}.pth", final)
    assert f"removed {orphan.name}" in capsys.readouterr().err
    assert not (run_dir / "config_resume.json").exists() and not list(run_dir.glob("*.tmp"))
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(stamps)  # and no run.lock left


def test_resume_of_a_finished_run_exits_0_through_the_cli(acdc_root, acdc_reference):
    stamp = (acdc_reference / f"iter_{ACDC_ITERS}.pth").stat().st_mtime_ns
    res = subprocess.run([sys.executable, str(CODE / "train_acdc.py"),
                          *acdc_args(acdc_root, acdc_reference.parent, "ref", "--resume")],
                         env=child_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "already finished" in res.stderr and f"{ACDC_ITERS} of {ACDC_ITERS} iterations" in res.stderr
    assert (acdc_reference / f"iter_{ACDC_ITERS}.pth").stat().st_mtime_ns == stamp


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
    stamp = (run_dir / "latest.pth").stat().st_mtime_ns
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
    assert (run_dir / "latest.pth").stat().st_mtime_ns == stamp and not (run_dir / "config_resume.json").exists()


def other_value(v):
    if isinstance(v, bool):
        return not v
    if isinstance(v, (int, float)):
        return v + 1
    if isinstance(v, str):
        return v + "_other"
    if isinstance(v, list):
        return [x * 2 for x in v]
    if v is None:
        return 5
    raise TypeError(type(v))


def test_resume_refuses_every_other_differing_flag(acdc_root, acdc_reference, monkeypatch, one_thread):
    """Every saved flag outside RESUME_MAY_DIFFER refuses the resume when it differs; those inside give a
    warning."""
    path = acdc_reference / "latest.pth"
    saved = load_checkpoint(path)
    monkeypatch.setattr(ckpt_mod, "load_checkpoint", lambda *a, **k: saved)  # the same file, read once
    args = train_acdc.parse_args(acdc_args(acdc_root, acdc_reference.parent, "ref", "--resume"))
    assert load_resume(path, args, 1, saved["data"])[1] == []  # the original flags: no refusal, no warning
    method_flags = sorted(set(saved["args"]) - RESUME_MAY_DIFFER)
    assert {"seed", "base_lr", "eta", "cutmix_p", "conf_thresh", "patch_size", "batch_size", "labeled_bs",
            "optimizer", "max_iterations", "amp", "method", "no_ip", "drop_strong"} <= set(method_flags)
    for k in method_flags:
        changed = Namespace(**{**vars(args), k: other_value(getattr(args, k))})
        with pytest.raises(SystemExit) as e:
            load_resume(path, changed, 1, saved["data"])
        assert f"--{k} {getattr(changed, k)} (saved {saved['args'][k]})" in str(e.value.code), (k, e.value.code)
    for k in sorted(RESUME_MAY_DIFFER & set(saved["args"]) - {"resume", "overwrite", "print_config", "print_run_dir"}):
        changed = Namespace(**{**vars(args), k: other_value(getattr(args, k))})
        _, warnings = load_resume(path, changed, 1, saved["data"])
        assert warnings == [f"--resume: --{k} {getattr(changed, k)} (saved {saved['args'][k]})"], (k, warnings)


def test_resume_warns_about_other_flags_and_another_thread_count(acdc_root, acdc_reference):
    args = train_acdc.parse_args(acdc_args(acdc_root, acdc_reference.parent, "ref", "--resume", workers=3)
                                 + ["--log_every", "5"])
    data = load_checkpoint(acdc_reference / "latest.pth")["data"]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _, warnings = load_resume(acdc_reference / "latest.pth", args, 1, data)
    finally:
        torch.set_num_threads(before)
    assert any("--num_workers 3 (saved 0)" in w for w in warnings)
    assert any("--log_every 5 (saved 10)" in w for w in warnings)
    assert len(warnings) == 2, warnings
    # another intra-op thread count: allowed, with a warning that the continuation is not bit-identical
    torch.set_num_threads(2)
    try:
        ckpt, warnings = load_resume(acdc_reference / "latest.pth", args, 1, data)
    finally:
        torch.set_num_threads(before)
    assert ckpt["num_threads"] == 1 and ckpt["iteration"] == ACDC_ITERS
    assert any("2 CPU threads, the saved run used 1" in w and "OMP_NUM_THREADS=1" in w for w in warnings), warnings


def test_resume_refuses_another_number_of_processes(acdc_root, acdc_reference, tmp_path):
    run_dir = tmp_path / "ACDC_w_1_labeled"
    shutil.copytree(acdc_reference, run_dir)
    (run_dir / f"iter_{ACDC_ITERS}.pth").unlink()
    state = load_checkpoint(run_dir / "latest.pth")
    state["world_size"] = 2
    save_checkpoint(state, run_dir / "latest.pth")
    with pytest.raises(SystemExit, match=r"trained by 2 process\(es\), this command runs 1") as e:
        train_acdc.main(acdc_args(acdc_root, tmp_path, "w", "--resume"))
    assert str(e.value.code).startswith("error: --resume: ") and "\n" not in str(e.value.code)
    assert not (run_dir / f"iter_{ACDC_ITERS}.pth").exists()


# ------------------------------------------------------------------------------------------------ checkpoints
def test_checkpoint_holds_what_resume_needs(acdc_reference):
    state = load_checkpoint(acdc_reference / "latest.pth")
    assert set(state) == {"model", "optimizer", "iteration", "args", "world_size", "num_threads", "data"}
    assert state["iteration"] == ACDC_ITERS and state["args"]["task"] == "acdc" and state["world_size"] == 1
    assert any(k.endswith("running_mean") for k in state["model"])  # buffers too
    assert state["optimizer"]["state"] and state["args"]["seed"] == 1337
    assert state["num_threads"] == 1


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
    other = tmp_path / "notes.tmp"  # not a checkpoint's temp file: kept
    other.write_text("x")
    assert remove_temp_files(tmp_path) == [orphan.name] and not orphan.exists() and other.exists()
    assert load_checkpoint(path)["iteration"] == 1


def test_non_finite_weights_are_never_written(tmp_path, acdc_reference):
    from networks import build_model
    path = tmp_path / "latest.pth"
    shutil.copy(acdc_reference / "latest.pth", path)
    before = path.read_bytes()
    model = build_model("acdc")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with torch.no_grad():
        next(model.parameters())[0].fill_(float("nan"))
    with pytest.raises(SystemExit) as e:
        save_training_state(path, model, opt, 9, Namespace(task="acdc", seed=1), 1, {})
    msg = str(e.value.code)
    assert msg.startswith("error: non-finite weights after iteration 9") and "last checkpoint is kept" in msg
    assert str(path) in msg and "\n" not in msg
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["latest.pth"]


# ------------------------------------------------------------------------------------------------ issue 12
def finished_copy(acdc_reference, tmp_path, exp):
    """A copy of the reference run folder as a run killed after its last latest.pth: --resume writes the final
    checkpoint from latest.pth and trains nothing."""
    run_dir = shutil.copytree(acdc_reference, tmp_path / f"ACDC_{exp}_1_labeled")
    (run_dir / f"iter_{ACDC_ITERS}.pth").unlink()
    return run_dir


HOLDER = ("import sys, time; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
          "from utils.run_folder import hold_run_dir; hold_run_dir(Path(sys.argv[2])); print('held', flush=True); "
          "time.sleep(300)")


def test_a_run_folder_in_use_is_refused_naming_its_holder(acdc_root, acdc_reference, tmp_path):
    """Another process holds the run folder (run.lock): --resume is refused at once, naming it, and touches nothing
    (not the holder's in-flight temporary file). Once the holder is killed (SIGKILL: run.lock stays behind), the
    next run takes the folder over and leaves no run.lock."""
    run_dir = finished_copy(acdc_reference, tmp_path, "held")
    inflight = run_dir / "latest.pth.inflight.tmp"
    inflight.write_bytes(b"PK\x03\x04 being written")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(CODE), str(run_dir)], stdout=subprocess.PIPE,
                              text=True, env=child_env())
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.perf_counter()
        with pytest.raises(SystemExit) as e:
            train_acdc.main(acdc_args(acdc_root, tmp_path, "held", "--resume"))
        seconds = time.perf_counter() - t0
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    msg = str(e.value.code)
    assert msg.startswith(f"error: run folder {run_dir} is in use by pid {holder.pid} on {socket.gethostname()} "
                          f"since ") and "\n" not in msg and seconds < 5, msg
    assert inflight.exists() and not (run_dir / f"iter_{ACDC_ITERS}.pth").exists()
    assert (run_dir / "run.lock").exists()  # left by the killed holder
    train_acdc.main(acdc_args(acdc_root, tmp_path, "held", "--resume"))
    assert (run_dir / f"iter_{ACDC_ITERS}.pth").is_file() and not inflight.exists()
    assert not (run_dir / "run.lock").exists()
    print(f"\n{msg.replace(str(tmp_path), '<tmp>')} ({seconds:.2f} s)")


def flip_a_mantissa_bit(path):
    """Flip the lowest bit of one float32 weight inside a torch zip archive, in place: torch.load still reads it."""
    with zipfile.ZipFile(path) as archive:
        entry = next(i for i in archive.infolist() if "/data/" in i.filename and i.file_size >= 64)
    with open(path, "r+b") as f:
        f.seek(entry.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
        pos = entry.header_offset + 30 + name_len + extra_len + 32  # byte 0 of a little-endian float32: mantissa
        f.seek(pos)
        byte = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([byte ^ 1]))


def test_a_flipped_bit_in_a_checkpoint_is_refused(acdc_root, acdc_reference, tmp_path):
    run_dir = finished_copy(acdc_reference, tmp_path, "rot")
    latest = run_dir / "latest.pth"
    flip_a_mantissa_bit(latest)
    torch.load(latest, weights_only=True)  # what torch alone does: no complaint
    with pytest.raises(SystemExit) as e:
        train_acdc.main(acdc_args(acdc_root, tmp_path, "rot", "--resume"))
    msg = str(e.value.code)
    assert msg.startswith(f"error: --resume: checkpoint {latest}: damaged since it was written (the CRC-32 of its "
                          f"entry ") and "restore a copy" in msg and "\n" not in msg, msg
    assert "good" not in msg and not (run_dir / f"iter_{ACDC_ITERS}.pth").exists()
    final = shutil.copy(acdc_reference / f"iter_{ACDC_ITERS}.pth", tmp_path / "final.pth")
    flip_a_mantissa_bit(final)
    with pytest.raises(SystemExit, match=r"^error: checkpoint .*final.pth: damaged since it was written"):
        test_acdc.main(["--ckpt", str(final), "--root_path", str(acdc_root), "--list", "val.list", "--device", "cpu"])
    assert not (tmp_path / "eval_val").exists()


def test_resume_refuses_other_training_cases_and_warns_about_other_files(acdc_root, acdc_reference, tmp_path,
                                                                        capsys):
    """The checkpoint records the labeled and unlabeled slices (in order) and the size of each case file: a
    reordered list is refused; the same list at another path, or a case file that changed size, only warn."""
    finished_copy(acdc_reference, tmp_path, "data")
    names = (acdc_root / "train_slices.list").read_text().split()
    swapped = tmp_path / "swapped.list"  # two labeled slices trade places
    swapped.write_text("\n".join([names[1], names[0], *names[2:]]) + "\n")
    with pytest.raises(SystemExit) as e:
        train_acdc.main(acdc_args(acdc_root, tmp_path, "data", "--resume", "--train_list", str(swapped)))
    msg = str(e.value.code)
    assert msg.startswith("error: --resume: the labeled cases differ from the run in ") and "\n" not in msg
    assert f"the same cases in another order; entry 1 is {names[1]}, was {names[0]}" in msg, msg
    moved = tmp_path / "unlabeled_first.list"  # the unlabeled slices first: another labeled set
    moved.write_text("\n".join(names[32:] + names[:32]) + "\n")
    with pytest.raises(SystemExit, match="the labeled cases differ .*32 cases, the run started with 32; entry 1 is"):
        train_acdc.main(acdc_args(acdc_root, tmp_path, "data", "--resume", "--train_list", str(moved)))

    # the same cases through another list file and a copied root in which one case file changed size: the run
    # continues (its last iteration) with warnings
    snapshots = acdc_reference.parent / f"{acdc_reference.name}.snapshots"
    shutil.copy(snapshots / f"latest_{ACDC_ITERS - 1}.pth", tmp_path / "ACDC_data_1_labeled" / "latest.pth")
    same = tmp_path / "same.list"
    same.write_text("\n".join(names) + "\n")
    root = shutil.copytree(acdc_root, tmp_path / "ACDC")
    path = root / "data" / "slices" / f"{names[40]}.h5"
    with h5py.File(path, "r") as h:
        image, label = h["image"][()], h["label"][()]
    write_h5(path, image=image, label=label, note=np.zeros(100))
    capsys.readouterr()
    train_acdc.main(acdc_args(root, tmp_path, "data", "--resume", "--train_list", str(same)))
    err = capsys.readouterr().err
    assert f"--train_list {same} (saved train_slices.list)" in err
    assert f"1 case files changed size since the run started, e.g. {names[40]}: " in err
    assert (tmp_path / "ACDC_data_1_labeled" / f"iter_{ACDC_ITERS}.pth").is_file()


def test_resume_names_the_keys_of_weights_that_do_not_fit(acdc_root, acdc_reference, tmp_path):
    run_dir = finished_copy(acdc_reference, tmp_path, "keys")
    snapshots = acdc_reference.parent / f"{acdc_reference.name}.snapshots"
    state = load_checkpoint(snapshots / f"latest_{ACDC_ITERS - 1}.pth")
    state["model"] = {f"module.{k}": v for k, v in state["model"].items()}  # saved from a DDP wrapper
    save_checkpoint(state, run_dir / "latest.pth")
    with pytest.raises(SystemExit) as e:
        train_acdc.main(acdc_args(acdc_root, tmp_path, "keys", "--resume"))
    msg, n = str(e.value.code), len(state["model"])
    assert msg.startswith(f"error: --resume: checkpoint {run_dir / 'latest.pth'}: its weights do not fit the UNet: "
                          f"{n} missing keys [") and f"{n} unexpected keys ['module." in msg and "\n" not in msg, msg


def test_ctrl_c_ends_with_one_line_and_the_run_resumes(acdc_root, acdc_reference, tmp_path, monkeypatch, capsys,
                                                       one_thread):
    exp = "ctrlc"
    run_dir = tmp_path / f"ACDC_{exp}_1_labeled"
    with monkeypatch.context() as m:
        interrupt_at(train_acdc, m, 5, KeyboardInterrupt)
        with pytest.raises(SystemExit) as e:
            train_acdc.main(acdc_args(acdc_root, tmp_path, exp))
    assert e.value.code == 130
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line or "Traceback" in line]
    assert errors == [f"error: stopped by SIGINT (Ctrl-C) after iteration 5 of {ACDC_ITERS}; {run_dir / 'latest.pth'} "
                      f"holds iteration 5: resume with --resume"], errors
    assert not (run_dir / "run.lock").exists() and not list(run_dir.glob("*.tmp"))
    print(f"\n{errors[0].replace(str(tmp_path), '<tmp>')} (exit 130)")
    trained = interrupt_at(train_acdc, monkeypatch)
    train_acdc.main(acdc_args(acdc_root, tmp_path, exp, "--resume"))
    assert trained == [5, 6, 7]
    assert_same_training_state(acdc_reference / f"iter_{ACDC_ITERS}.pth", run_dir / f"iter_{ACDC_ITERS}.pth")


def test_disk_full_while_writing_a_checkpoint(acdc_root, acdc_reference, tmp_path, monkeypatch, one_thread):
    """The third checkpoint write fails with ENOSPC: one line naming the file system and the file, latest.pth still
    the second one, no temporary file; once there is space, --resume ends equal to the uninterrupted run."""
    exp = "full"
    run_dir = tmp_path / f"ACDC_{exp}_1_labeled"
    real, writes = os.fsync, []

    def full_at_the_third(fd):
        writes.append(fd)
        if len(writes) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)
    with monkeypatch.context() as m:
        m.setattr(os, "fsync", full_at_the_third)
        with pytest.raises(SystemExit) as e:
            train_acdc.main(acdc_args(acdc_root, tmp_path, exp))
    msg = str(e.value.code)
    assert msg == (f"error: no space left on {mount_point(run_dir)} while writing {run_dir / 'latest.pth'}; the "
                   f"previous checkpoint is intact"), msg
    assert load_checkpoint(run_dir / "latest.pth")["iteration"] == 2
    assert sorted(p.name for p in run_dir.glob("*.pth*")) == ["latest.pth"]
    train_acdc.main(acdc_args(acdc_root, tmp_path, exp, "--resume"))
    assert_same_training_state(acdc_reference / f"iter_{ACDC_ITERS}.pth", run_dir / f"iter_{ACDC_ITERS}.pth")


def signal_in(module, monkeypatch, at_iteration, signum=signal.SIGTERM, times=1):
    """Make ``module.train_iteration`` send ``signum`` to this process (``times`` times) in iteration
    ``at_iteration``, before it computes; returns the list of the iterations it trains."""
    real, trained = module.train_iteration, []

    def wrapped(model, optimizer, batch, it, args, device):
        if it == at_iteration:
            for _ in range(times):
                os.kill(os.getpid(), signum)
        trained.append(it)
        return real(model, optimizer, batch, it, args, device)
    monkeypatch.setattr(module, "train_iteration", wrapped)
    return trained


@pytest.mark.parametrize("workers", [0, 2], ids=["0_workers", "2_workers"])
def test_sigterm_finishes_the_iteration_writes_latest_and_the_run_resumes(acdc_root, acdc_reference, tmp_path,
                                                                          monkeypatch, capsys, one_thread, workers):
    """SIGTERM (twice: Slurm and torchrun may both send one) inside iteration 5 with --save_every 3: the iteration
    finishes, latest.pth holds iteration 5 (not 3), the loader workers are gone, run.lock released, one line, exit
    143; --resume trains 5..7 and ends equal to the uninterrupted run. The handlers are put back afterwards."""
    exp = f"term{workers}"
    run_dir = tmp_path / f"ACDC_{exp}_1_labeled"
    workers_seen = []
    real_stop = loop.stop_workers

    def recording_stop(loader):
        iterator = getattr(loader, "_iterator", None)
        procs = list(getattr(iterator, "_workers", []))
        real_stop(loader)
        workers_seen.append([w.is_alive() for w in procs])
    with monkeypatch.context() as m:
        m.setattr(loop, "stop_workers", recording_stop)
        trained = signal_in(train_acdc, m, 4, times=2)
        with pytest.raises(SystemExit) as e:
            train_acdc.main(acdc_args(acdc_root, tmp_path, exp, "--save_every", "3", workers=workers))
    assert e.value.code == 128 + signal.SIGTERM == 143
    assert trained == [0, 1, 2, 3, 4]
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line or "Traceback" in line]
    assert errors == [f"error: stopped by SIGTERM after iteration 5 of {ACDC_ITERS}; {run_dir / 'latest.pth'} holds "
                      f"iteration 5: resume with --resume"], errors
    assert workers_seen == [[False] * workers]  # stopped, not left to the garbage collector
    assert not (run_dir / "run.lock").exists() and not list(run_dir.glob("*.tmp"))
    assert not (run_dir / f"iter_{ACDC_ITERS}.pth").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    print(f"\n{errors[0].replace(str(tmp_path), '<tmp>')} (exit 143)")
    trained = interrupt_at(train_acdc, monkeypatch)
    train_acdc.main(acdc_args(acdc_root, tmp_path, exp, "--resume"))
    assert trained == [5, 6, 7]
    assert_same_training_state(acdc_reference / f"iter_{ACDC_ITERS}.pth", run_dir / f"iter_{ACDC_ITERS}.pth")


@pytest.mark.parametrize("signals", [[signal.SIGTERM], [signal.SIGINT, signal.SIGINT]],
                         ids=["sigterm", "second_ctrl_c"])
def test_a_stop_signal_during_a_checkpoint_write(acdc_root, tmp_path, monkeypatch, capsys, one_thread, signals):
    """Signals while latest.pth of iteration 3 is being written. SIGTERM (or one Ctrl-C) waits for the write: latest.pth
    holds iteration 3 and training stops there. A second Ctrl-C stops at once: the write is abandoned, latest.pth
    still holds iteration 2 and the line says so (not a wrong current iteration). Either way the file loads (CRC
    checked) and no temporary file is left."""
    exp = f"write{len(signals)}"
    run_dir = tmp_path / f"ACDC_{exp}_1_labeled"
    real, writes = os.fsync, []

    def signalled_at_the_third(fd):
        writes.append(fd)
        if len(writes) == 3:
            for signum in signals:
                os.kill(os.getpid(), signum)
        real(fd)
    with monkeypatch.context() as m:
        m.setattr(os, "fsync", signalled_at_the_third)
        with pytest.raises(SystemExit) as e:
            train_acdc.main(acdc_args(acdc_root, tmp_path, exp))
    name, held = ("SIGTERM", 3) if signals == [signal.SIGTERM] else ("SIGINT (Ctrl-C)", 2)
    assert e.value.code == 128 + signals[0]
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line or "Traceback" in line]
    assert errors == [f"error: stopped by {name} after iteration 3 of {ACDC_ITERS}; {run_dir / 'latest.pth'} holds "
                      f"iteration {held}: resume with --resume"], errors
    assert load_checkpoint(run_dir / "latest.pth")["iteration"] == held
    assert sorted(p.name for p in run_dir.glob("*.pth*")) == ["latest.pth"] and not (run_dir / "run.lock").exists()


def test_a_stop_signal_before_the_loop_ends_the_run_at_once(acdc_root, tmp_path, monkeypatch, capsys):
    """SIGTERM while the training cases are read: the run stops there, with one line and exit 143; the run folder
    it made is removed again (nothing was written into it)."""
    real = loop.TrainSet

    def reading(*args, **kw):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kw)
    monkeypatch.setattr(loop, "TrainSet", reading)
    with pytest.raises(SystemExit) as e:
        train_acdc.main(acdc_args(acdc_root, tmp_path, "early"))
    run_dir = tmp_path / "ACDC_early_1_labeled"
    assert e.value.code == 143
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line or "Traceback" in line]
    assert errors == [f"error: stopped by SIGTERM outside the training loop; no readable latest.pth in {run_dir}: "
                      f"start again (--overwrite if the run folder exists)"], errors
    assert not run_dir.exists()


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_every_file_a_run_writes_honours_the_umask(acdc_root, tmp_path, monkeypatch, one_thread, umask):
    """With umask 022 the run folder can be read by everyone, with 027 by the group (a cluster's shared file system):
    checkpoints (written through a temporary file), run.lock, config.json, log.txt, the tensorboard events, and the
    evaluation's files get 0666 less the umask, the folders 0777 less the umask."""
    run_dir = tmp_path / "runs" / "ACDC_mode_1_labeled"
    real, lock_modes = loop.save_training_state, []

    def saving(path, *args):
        lock_modes.append((run_dir / "run.lock").stat().st_mode & 0o777)
        real(path, *args)
    monkeypatch.setattr(loop, "save_training_state", saving)
    before = os.umask(umask)
    try:
        train_acdc.main(acdc_args(acdc_root, tmp_path / "runs", "mode", iters=2))
        test_acdc.main(["--run", str(run_dir), "--list", "val.list", "--device", "cpu", "--save_nii"])
    finally:
        os.umask(before)
    files = sorted(p for p in run_dir.rglob("*") if p.is_file())
    names = {p.relative_to(run_dir).as_posix() for p in files}
    assert {"latest.pth", "iter_2.pth", "config.json", "log.txt", "eval_val/metrics.csv",
            "eval_val/summary.json"} <= names
    assert any(n.startswith("events.out.tfevents.") for n in names) and any(n.endswith(".png") for n in names)
    assert any(n.endswith("_pred.nii.gz") for n in names)
    wrong = {p.relative_to(run_dir).as_posix(): oct(p.stat().st_mode & 0o777) for p in files
             if p.stat().st_mode & 0o777 != 0o666 & ~umask}
    assert not wrong, wrong
    folders = [run_dir, *(p for p in run_dir.rglob("*") if p.is_dir())]
    assert {p.stat().st_mode & 0o777 for p in folders} == {0o777 & ~umask}
    assert lock_modes == [0o666 & ~umask] * 3
