"""Bad input gives a non-zero exit and ONE message naming the file or flag and what was expected, before any
data is loaded for training and before anything is written; a non-finite loss or non-finite weights stop
training and keep the last good checkpoint; unreadable checkpoints give one line through every CLI.

Each case runs the real entry point, ``train_la.main([...])`` / ``train_acdc.main([...])`` (the function
``python code/train_*.py`` calls), in this process, catching SystemExit; two cases also run as real
subprocesses to check the exit status and that stderr is a single line.

    python tests/test_bad_input.py      # prints the table of inputs and messages (docs/RELIABILITY.md)
"""
import os
import shutil
import subprocess
import sys
import time
from contextlib import redirect_stderr
from io import StringIO
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

CODE = Path(__file__).resolve().parents[1] / "code"
if str(CODE) not in sys.path:
    sys.path.insert(0, str(CODE))

import test_acdc  # noqa: E402  (code/test_acdc.py, the evaluation CLI)
import test_la  # noqa: E402
import train_acdc  # noqa: E402
import train_la  # noqa: E402
from utils.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from utils.data_acdc import acdc_slice_path  # noqa: E402
from utils.data_la import la_case_path, read_list  # noqa: E402
from utils.synthetic import make_acdc, make_la  # noqa: E402

SECONDS = 5.0  # every refusal must come within this (in practice well under one second)
HAS_CUDA = torch.cuda.is_available()


# ------------------------------------------------------------------------------------------------ data
def build_roots(base: Path):
    """Tiny good roots (never trained on here: the cases only need to be checked)."""
    la = make_la(base / "LA", n_train=4, n_test=0, shape=(20, 20, 16), shape_jitter=0.0)
    acdc = make_acdc(base / "ACDC", n_train_patients=2, n_val=1, n_test=0, shape=(16, 32, 32), shape_jitter=0.0)
    return la, acdc


def rewrite(path: Path, **arrays):
    path.unlink()
    with h5py.File(path, "w") as h:
        for k, v in arrays.items():
            h[k] = v


def read(path: Path):
    with h5py.File(path, "r") as h:
        return h["image"][()], h["label"][()]


def la_case(root: Path, i=1) -> Path:
    return la_case_path(root, read_list(root / "train.list")[i])


def acdc_slice(root: Path, i=40) -> Path:
    return acdc_slice_path(root, read_list(root / "train_slices.list")[i])


# mutations of a fresh copy of a good root; each returns nothing
def drop_case(root):
    la_case(root).unlink()


def only_image(root):
    image, _ = read(la_case(root))
    rewrite(la_case(root), image=image)


def shape_mismatch(root):
    image, label = read(la_case(root))
    rewrite(la_case(root), image=image, label=label[:, :, :-2])


def label_2(root):
    image, label = read(la_case(root))
    label[0, 0, 0] = 2
    rewrite(la_case(root), image=image, label=label)


def nan_image(root):
    image, label = read(la_case(root))
    image[3, 4, 5] = np.nan
    rewrite(la_case(root), image=image, label=label)


def inf_image(root):
    image, label = read(la_case(root))
    image[0, 0, 0] = np.inf
    rewrite(la_case(root), image=image, label=label)


def not_h5(root):
    la_case(root).write_bytes(os.urandom(512))


def acdc_label_7(root):
    image, label = read(acdc_slice(root))
    label[5, 5] = 7
    rewrite(acdc_slice(root), image=image, label=label)


def acdc_nan(root):
    image, label = read(acdc_slice(root))
    image[1, 2] = np.nan
    rewrite(acdc_slice(root), image=image, label=label)


def acdc_above_one(root):
    image, label = read(acdc_slice(root))
    image[1, 2] = 3.5
    rewrite(acdc_slice(root), image=image, label=label)


def on_runs(fn):
    """Mark a mutation as one of the run folder (it gets --out_dir instead of the data root)."""
    fn.on_runs = True
    return fn


def existing_run(out, task, exp="bad", labelnum=2):
    d = out / f"{task}_{exp}_{labelnum}_labeled"
    d.mkdir(parents=True)
    (d / "config.json").write_text("{}\n")
    return d


def latest_with(out, task, payload, exp="bad", labelnum=2):
    d = existing_run(out, task, exp, labelnum)
    if isinstance(payload, bytes):
        (d / "latest.pth").write_bytes(payload)
    else:
        torch.save(payload, d / "latest.pth")


class Opaque:  # an arbitrary Python object
    pass


# ------------------------------------------------------------------------------------------------ cases
LA = "train_la.py"
ACDC = "train_acdc.py"
LA_OK = ["--labelnum", "2", "--patch_size", "16", "16", "16", "--device", "cpu", "--num_workers", "0"]
ACDC_OK = ["--labelnum", "1", "--patch_size", "32", "32", "--device", "cpu", "--num_workers", "0"]

# (id, script, flags (after the good ones; {root}/{out} filled in), mutation of data or run folder,
#  expected exit code, substrings the one message must hold)
CASES = [
    ("missing root", LA, ["--root_path", "{tmp}/nowhere"], None, 1, ["LA root not found", "nowhere"]),
    ("missing list", LA, ["--train_list", "nope.list"], None, 1, ["list file not found", "nope.list"]),
    ("missing case file", LA, [], drop_case, 1, ["case file not found", "synla_001", "mri_norm2.h5"]),
    ("case file not h5", LA, [], not_h5, 1, ["synla_001", "cannot open as h5"]),
    ("h5 without label", LA, [], only_image, 1, ["synla_001", "no 'label' dataset"]),
    ("image/label shape mismatch", LA, [], shape_mismatch, 1, ["synla_001", "image shape", "!= label shape"]),
    ("label values outside the classes", LA, [], label_2, 1, ["synla_001", "label values [2]", "0..1"]),
    ("NaN intensity", LA, [], nan_image, 1, ["synla_001", "non-finite values"]),
    ("infinite intensity", LA, [], inf_image, 1, ["synla_001", "non-finite values"]),
    ("--labelnum larger than the list", LA, ["--labelnum", "10"], None, 1,
     ["--labelnum 10", "larger than the 4 cases", "train.list"]),
    ("--optimizer adam", LA, ["--optimizer", "adam"], None, 2,
     ["train_la.py: error: argument --optimizer", "invalid choice: 'adam'", "adamw"]),
    ("--amp fp8", LA, ["--amp", "fp8"], None, 2, ["--amp", "invalid choice: 'fp8'", "bf16"]),
    ("--patch_size 112 112 (LA)", LA, ["--patch_size", "112", "112"], None, 1,
     ["--patch_size 112 112", "3 positive"]),
    ("--patch_size 40 40 20", LA, ["--patch_size", "40", "40", "20"], None, 1, ["--patch_size", "multiples of 16"]),
    ("--labeled_bs >= --batch_size", LA, ["--batch_size", "4", "--labeled_bs", "4"], None, 1,
     ["--labeled_bs 4", "between 1 and --batch_size - 1 = 3"]),
    ("--max_iterations 0", LA, ["--max_iterations", "0"], None, 1, ["--max_iterations 0", "at least 1"]),
    ("--num_workers -1", LA, ["--num_workers", "-1"], None, 1, ["--num_workers -1", "0 or more"]),
    ("--base_lr 0", LA, ["--base_lr", "0"], None, 1, ["--base_lr 0.0", "positive"]),
    ("--device tpu", LA, ["--device", "tpu"], None, 1, ["--device tpu", "expected auto, cpu, cuda or cuda:N"]),
    ("--batch_size abc", LA, ["--batch_size", "abc"], None, 2, ["--batch_size", "invalid int value: 'abc'"]),
    ("--resume --overwrite", LA, ["--resume", "--overwrite"], None, 1, ["--resume and --overwrite"]),
    ("run folder already holds a run", LA, [], on_runs(lambda out: existing_run(out, "LA")), 1,
     ["LA_bad_2_labeled", "already holds a run", "--resume", "--overwrite"]),
    ("--resume with nothing to resume", LA, ["--resume"], None, 1, ["--resume", "latest.pth does not exist"]),
    ("--resume, latest.pth random bytes", LA, ["--resume"], on_runs(lambda out: latest_with(out, "LA", os.urandom(4096))), 1,
     ["latest.pth", "cannot be read", "neither a torch zip archive nor a weights-only pickle"]),
    ("--resume, latest.pth truncated", LA, ["--resume"],
     on_runs(lambda out: latest_with(out, "LA", TRUNCATED)), 1, ["latest.pth", "truncated or corrupt"]),
    ("--resume, latest.pth a pickled object", LA, ["--resume"],
     on_runs(lambda out: latest_with(out, "LA", {"model": Opaque()})), 1, ["latest.pth", "Unsupported global", "Opaque"]),
    ("--resume, latest.pth without 'model'", LA, ["--resume"],
     on_runs(lambda out: latest_with(out, "LA", {"weights": torch.zeros(2)})), 1, ["latest.pth", "no 'model'"]),
    ("--resume, latest.pth without optimizer", LA, ["--resume"],
     on_runs(lambda out: latest_with(out, "LA", {"model": {"w": torch.zeros(2)}, "iteration": 3})), 1,
     ["latest.pth", "no 'optimizer', 'scaler', 'args' entry"]),
    ("ACDC --labelnum 5", ACDC, ["--labelnum", "5"], None, 1, ["--labelnum 5", "allowed: 1, 3, 7, 14"]),
    ("ACDC --labelnum 3 beyond the slice list", ACDC, ["--labelnum", "3"], None, 1,
     ["--labelnum 3", "first 68 slices", "has only 64"]),
    ("ACDC --patch_size 256", ACDC, ["--patch_size", "256"], None, 1, ["--patch_size 256", "2 positive"]),
    ("ACDC missing root", ACDC, ["--root_path", "{tmp}/nowhere"], None, 1, ["ACDC root not found", "nowhere"]),
    ("ACDC label values outside the classes", ACDC, [], acdc_label_7, 1, ["_slice_", "label values [7]", "0..3"]),
    ("ACDC NaN intensity", ACDC, [], acdc_nan, 1, ["_slice_", "non-finite values"]),
    ("ACDC intensity above 1", ACDC, [], acdc_above_one, 1, ["_slice_", "expected within [0, 1]"]),
    ("ACDC --val_every with a missing val list", ACDC, ["--val_every", "5", "--val_list", "nope.list"], None, 1,
     ["list file not found", "nope.list"]),
]
if not HAS_CUDA:
    CASES.append(("--device cuda without CUDA", LA, ["--device", "cuda"], None, 1,
                  ["--device cuda", "CUDA is not available"]))
TRUNCATED = b""  # filled in by the fixture (half of a real checkpoint)


@pytest.fixture(scope="module")
def masters(tmp_path_factory):
    global TRUNCATED
    base = tmp_path_factory.mktemp("bad_masters")
    la, acdc = build_roots(base)
    buf = base / "full.pth"
    save_checkpoint({"model": {"w": torch.randn(4096)}, "optimizer": {}, "scaler": {}, "iteration": 1, "args": {}}, buf)
    TRUNCATED = buf.read_bytes()[: buf.stat().st_size // 2]
    return la, acdc


class DataLoadReached(AssertionError):
    pass


def run_case(case, la_master, acdc_master, tmp: Path):
    """Run one case on fresh copies; returns (exit code, the message, seconds, files written under out)."""
    name, script, flags, mutate, _, _ = case
    task_root = la_master if script == LA else acdc_master
    root = shutil.copytree(task_root, tmp / task_root.name)
    out = tmp / "runs"
    out.mkdir()
    if mutate is not None:
        mutate(out if getattr(mutate, "on_runs", False) else root)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    good = LA_OK if script == LA else ACDC_OK
    argv = ["--root_path", str(root), "--out_dir", str(out), "--exp", "bad", *good,
            *[f.format(tmp=tmp) for f in flags]]
    module = train_la if script == LA else train_acdc

    def reached(*a, **k):
        raise DataLoadReached(f"{name}: training data or model construction reached; the check came too late")
    saved = {attr: getattr(module, attr) for attr in ("LADataset", "ACDCSlices", "build_model") if hasattr(module, attr)}
    for attr in saved:
        setattr(module, attr, reached)
    err = StringIO()
    argv0, sys.argv[0] = sys.argv[0], str(CODE / script)  # argparse names the program after it
    t0 = time.perf_counter()
    try:
        with redirect_stderr(err):
            module.main(argv)
        code, message = 0, "(no error)"
    except SystemExit as e:
        if isinstance(e.code, str):
            code, message = 1, e.code  # what Python prints to stderr before exiting with status 1
        else:
            code, message = e.code, err.getvalue().strip()
    finally:
        sys.argv[0] = argv0
        for attr, value in saved.items():
            setattr(module, attr, value)
    seconds = time.perf_counter() - t0
    after = sorted(p.relative_to(out) for p in out.rglob("*"))
    return code, message, seconds, [str(p) for p in after if p not in before]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_with_one_message(case, masters, tmp_path):
    name, script, flags, _, want_code, substrings = case
    code, message, seconds, written = run_case(case, *masters, tmp_path)
    assert code == want_code, f"{name}: exit {code}, message {message!r}"
    assert "\n" not in message, f"{name}: more than one line:\n{message}"
    assert "error" in message
    for s in substrings:
        assert s in message, f"{name}: {s!r} not in {message!r}"
    assert seconds < SECONDS, f"{name}: took {seconds:.1f} s"
    assert not written, f"{name}: wrote {written}"


def test_patch_larger_than_a_volume_is_padded_not_refused(masters, tmp_path):
    """LA crops zero-pad every axis (as UA-MT), so no patch is too large for a volume: a warning, no error.
    (ACDC slices are zoomed to the patch.) The run reaches the data load."""
    case = ("patch larger than the volumes", LA, ["--patch_size", "32", "32", "32"], None, 0, [])
    with pytest.raises(DataLoadReached):
        run_case(case, *masters, tmp_path)


# ------------------------------------------------------------------------------------------------ real CLI
def test_real_cli_exit_status_and_a_single_stderr_line(masters, tmp_path):
    la, _ = masters
    bad = shutil.copytree(la, tmp_path / "LA")
    nan_image(bad)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(os.urandom(2048))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = {
        "train": subprocess.Popen([sys.executable, str(CODE / "train_la.py"), "--root_path", str(bad), "--out_dir",
                                   str(tmp_path / "runs"), *LA_OK], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=env),
        "test": subprocess.Popen([sys.executable, str(CODE / "test_la.py"), "--ckpt", str(junk), "--root_path",
                                  str(la)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env),
    }
    results = {k: (p.wait(timeout=120), p.stderr.read(), p.stdout.read()) for k, p in procs.items()}
    for p in procs.values():
        p.stdout.close()
        p.stderr.close()
    code, err, _ = results["train"]
    assert code == 1 and err.strip().count("\n") == 0, err
    assert err.startswith("error: ") and "synla_001" in err and "non-finite values" in err
    code, err, _ = results["test"]
    assert code == 1 and err.strip().count("\n") == 0, err
    assert err.startswith("error: checkpoint ") and "junk.pth: cannot be read" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("script, payload, expected", [
    (test_la, b"random", "cannot be read (neither a torch zip archive nor a weights-only pickle"),
    (test_acdc, {"weights": torch.zeros(1)}, "no 'model' entry"),
    (test_acdc, {"model": Opaque()}, "Unsupported global"),
])
def test_evaluation_cli_turns_bad_checkpoints_into_one_line(script, payload, expected, tmp_path):
    ckpt = tmp_path / "iter_1.pth"
    if isinstance(payload, bytes):
        ckpt.write_bytes(payload)
    else:
        torch.save(payload, ckpt)
    with pytest.raises(SystemExit) as e:
        script.main(["--ckpt", str(ckpt), "--root_path", str(tmp_path)])
    assert isinstance(e.value.code, str) and "\n" not in e.value.code
    assert e.value.code.startswith(f"error: checkpoint {ckpt}") and expected in e.value.code


# ------------------------------------------------------------------------------------------------ non-finite
def nan_run(masters, tmp_path, monkeypatch, base_lr):
    """A tiny ACDC run with an absurd learning rate; records latest.pth before every iteration."""
    _, acdc = masters
    seen = []
    real = train_acdc.train_iteration

    def recording(model, optimizer, scaler, batch, it, *a, **kw):
        latest = tmp_path / "ACDC_nan_1_labeled" / "latest.pth"
        seen.append((it, latest.read_bytes() if latest.exists() else None))
        return real(model, optimizer, scaler, batch, it, *a, **kw)
    monkeypatch.setattr(train_acdc, "train_iteration", recording)
    argv = ["--root_path", str(acdc), "--out_dir", str(tmp_path), "--exp", "nan", *ACDC_OK, "--batch_size", "4",
            "--labeled_bs", "2", "--max_iterations", "6", "--save_every", "1", "--log_every", "1",
            "--base_lr", base_lr]
    err = StringIO()
    with redirect_stderr(err), pytest.raises(SystemExit) as e:
        train_acdc.main(argv)
    return e.value.code, err.getvalue(), seen, tmp_path / "ACDC_nan_1_labeled"


@pytest.mark.parametrize("base_lr, stop", [
    ("1e30", "non-finite loss at iteration"),       # the loss becomes NaN
    ("1e8", "non-finite weights after iteration"),  # the loss is finite, the weights after the step are not
])
def test_non_finite_training_stops_and_keeps_the_last_good_checkpoint(masters, tmp_path, monkeypatch, base_lr, stop):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code, err, seen, run_dir = nan_run(masters, tmp_path, monkeypatch, base_lr)
    finally:
        torch.set_num_threads(before)
    message = code if isinstance(code, str) else err
    assert code not in (0, None) and stop in message, (code, err[-2000:])
    print(f"\n--base_lr {base_lr}: exit {code if isinstance(code, int) else 1}: "
          f"{[line for line in message.splitlines() if 'non-finite' in line][0]}")
    assert "last good checkpoint" in message and "kept" in message
    last_it, last_bytes = seen[-1]  # latest.pth as it was when the failing iteration started
    assert last_it >= 1 and (run_dir / "latest.pth").read_bytes() == last_bytes
    assert f"iteration {last_it + 1}" in message
    state = load_checkpoint(run_dir / "latest.pth")
    assert state["iteration"] == last_it
    assert all(bool(torch.isfinite(v).all()) for v in state["model"].values() if v.is_floating_point())
    assert not list(run_dir.glob("iter_*.pth")) and not list(run_dir.glob("*.tmp"))


# ------------------------------------------------------------------------------------------------ table
def main():
    """Print every case and its message (the list in docs/RELIABILITY.md)."""
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        base = Path(d)
        global TRUNCATED
        la, acdc = build_roots(base / "m")
        buf = base / "full.pth"
        save_checkpoint({"model": {"w": torch.randn(4096)}, "optimizer": {}, "scaler": {}, "iteration": 1,
                         "args": {}}, buf)
        TRUNCATED = buf.read_bytes()[: buf.stat().st_size // 2]
        for i, case in enumerate(CASES):
            tmp = base / f"c{i}"
            tmp.mkdir()
            code, message, seconds, _ = run_case(case, la, acdc, tmp)
            shown = message.replace(str(tmp), "<tmp>")
            flags = " ".join(f.replace("{tmp}", "<tmp>") for f in case[2])
            print(f"| {case[0]} | `{case[1]}{' ' + flags if flags else ''}` | {code} | {seconds:.2f} | `{shown}` |")


if __name__ == "__main__":
    main()
