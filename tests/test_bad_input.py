"""Bad input gives a non-zero exit and ONE message naming the file or flag and what was expected, before the
training loop starts and before anything is written; a non-finite loss or non-finite weights stop training and keep
the last good checkpoint; unreadable checkpoints and bad cases give one line through the evaluation CLIs too.

Flags, lists, the run folder and latest.pth are refused before the training set is read; the cases themselves
are read and checked once, when the training set is built, so bad case files are refused then (still before
the training loop and before the run folder is written).

Each case runs the real entry point, ``train_la.main([...])`` / ``train_acdc.main([...])`` (the function
``python code/train_*.py`` calls), in this process, catching SystemExit; two cases also run as real
subprocesses to check the exit status and that stderr is a single line.

    python tests/test_bad_input.py      # prints the table of inputs and messages
"""
import os
import shutil
import subprocess
import sys
import time
from collections import namedtuple
from contextlib import redirect_stderr, redirect_stdout
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
from networks import build_model  # noqa: E402
from utils import loop  # noqa: E402
from utils.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from utils.data import TrainSet, case_path, read_list  # noqa: E402
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
    return case_path("la", root, read_list(root / "train.list")[i])


def acdc_slice(root: Path, i=40) -> Path:
    return case_path("acdc", root, read_list(root / "train_slices.list")[i])


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


def huge_image(root):
    image, label = read(la_case(root))
    image[1, 2, 3] = 3e38  # finite, but not a z-scored intensity
    rewrite(la_case(root), image=image, label=label)


def constant_image(root):
    image, label = read(la_case(root))
    rewrite(la_case(root), image=np.full_like(image, 0.25), label=label)


def list_a_folder(root):
    (root / "folder.list").mkdir()


def acdc_constant_slice(root):
    image, label = read(acdc_slice(root))
    rewrite(acdc_slice(root), image=np.zeros_like(image), label=label)


def acdc_shifted_slice(root):
    """Slice 9 of its volume holds slice 10 (renumbered off by one): a valid slice, only the volume shows it."""
    image, label = read(acdc_slice(root, 41))
    rewrite(acdc_slice(root), image=image, label=label)


def not_h5(root):
    la_case(root).write_bytes(os.urandom(512))


def empty_list(root):
    (root / "train.list").write_text("\n\n")


def repeated_entry(root):
    names = read_list(root / "train.list")
    (root / "train.list").write_text("\n".join(names + names[1:2]) + "\n")


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


def acdc_val_volume_missing(root):
    with open(root / "val.list", "a") as f:
        f.write("patient009_frame01\n")


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


def out_dir_a_file(out):
    shutil.rmtree(out)
    out.write_text("not a folder\n")


class Opaque:  # an arbitrary Python object
    pass


class RunsCode:  # what a malicious checkpoint holds: unpickling it calls os.system (here with "true")
    def __reduce__(self):
        return os.system, ("true",)


# ------------------------------------------------------------------------------------------------ cases
LA = "train_la.py"
ACDC = "train_acdc.py"
LA_OK = ["--labelnum", "2", "--patch_size", "16", "16", "16", "--device", "cpu", "--num_workers", "0"]
ACDC_OK = ["--labelnum", "1", "--patch_size", "32", "32", "--device", "cpu", "--num_workers", "0"]

# name; script; flags after the good ones ({tmp} filled in); mutation of the data root or (on_runs) of --out_dir;
# the expected exit code; substrings the one message must hold; data: refused while the training set reads its
# cases (False: before the training set is built)
Case = namedtuple("Case", "name script flags mutate code substrings data", defaults=(False,))
CASE_FILE = "2018LA_Seg_Training Set/synla_001/mri_norm2.h5"
CASES = [
    Case("missing root", LA, ["--root_path", "{tmp}/nowhere"], None, 1, ["data root", "nowhere", "no such folder"]),
    Case("missing list", LA, ["--train_list", "nope.list"], None, 1, ["list nope.list", "LA/nope.list", "exists"]),
    Case("empty list", LA, [], empty_list, 1, ["train.list", "empty (expected one entry per line)"]),
    Case("list a folder", LA, ["--train_list", "folder.list"], list_a_folder, 1,
         ["list folder.list", "LA/folder.list is a folder, expected a list file"]),
    Case("list with a repeated entry", LA, [], repeated_entry, 1,
         ["train.list", "'synla_001' appears more than once"]),
    Case("missing case file", LA, [], drop_case, 1, ["case file not found", CASE_FILE], True),
    Case("case file not h5", LA, [], not_h5, 1, [CASE_FILE, "unreadable h5 file"], True),
    Case("h5 without label", LA, [], only_image, 1, [CASE_FILE, "no 'label' dataset", "found ['image']"], True),
    Case("image/label shape mismatch", LA, [], shape_mismatch, 1,
         [CASE_FILE, "image (20, 20, 16) and label (20, 20, 14)", "expected two equal 3D shapes"], True),
    Case("label values outside the classes", LA, [], label_2, 1, [CASE_FILE, "label values [2]", "0..1"], True),
    Case("NaN intensity", LA, [], nan_image, 1, [CASE_FILE, "1 non-finite values"], True),
    Case("infinite intensity", LA, [], inf_image, 1, [CASE_FILE, "1 non-finite values"], True),
    Case("intensity 3e38", LA, [], huge_image, 1,
         [CASE_FILE, "image intensities in [", ", 3e+38], expected z-scored values within +-100 (the 100 published "
                     "LA images lie within [-1.02, 17.11])"], True),
    Case("image of one value", LA, [], constant_image, 1,
         [CASE_FILE, "image of one value (0.25) everywhere, expected intensities that vary"], True),
    Case("--labelnum larger than the list", LA, ["--labelnum", "10"], None, 1,
         ["--labelnum 10", "larger than the 4 cases", "train.list"]),
    Case("--labelnum equal to the list, CrossMatch", LA, ["--labelnum", "4"], None, 1,
         ["--labelnum 4", "no unlabeled case", "--method supervised"]),
    Case("--labelnum 0", LA, ["--labelnum", "0"], None, 2, ["argument --labelnum: 0: expected at least 1"]),
    Case("--optimizer adam", LA, ["--optimizer", "adam"], None, 2,
         ["train_la.py: error: argument --optimizer", "invalid choice: 'adam'", "adamw"]),
    Case("--amp fp8", LA, ["--amp", "fp8"], None, 2,
         ["--amp", "invalid choice: 'fp8'", "(choose from 'none', 'bf16')"]),
    Case("--patch_size 112 112 (LA)", LA, ["--patch_size", "112", "112"], None, 2,
         ["argument --patch_size: 112 112: expected 3 multiples of 16"]),
    Case("--patch_size 40 40 20", LA, ["--patch_size", "40", "40", "20"], None, 2,
         ["argument --patch_size: 40 40 20", "multiples of 16"]),
    Case("--labeled_bs >= --batch_size", LA, ["--batch_size", "4", "--labeled_bs", "4"], None, 2,
         ["argument --labeled_bs: 4", "between 1 and --batch_size - 1 = 3"]),
    Case("--max_iterations 0", LA, ["--max_iterations", "0"], None, 2, ["argument --max_iterations: 0", "at least 1"]),
    Case("--num_workers -1", LA, ["--num_workers", "-1"], None, 2, ["argument --num_workers: -1: expected"]),
    Case("--base_lr 0", LA, ["--base_lr", "0"], None, 2, ["argument --base_lr: 0.0", "positive"]),
    Case("--conf_thresh 1.5", LA, ["--conf_thresh", "1.5"], None, 2, ["argument --conf_thresh: 1.5", "[0, 1]"]),
    Case("--drop_strong 1", LA, ["--drop_strong", "1"], None, 2, ["argument --drop_strong: 1.0", "[0, 1)"]),
    Case("--device tpu", LA, ["--device", "tpu"], None, 1, ["--device tpu", "expected auto, cpu, cuda or cuda:N"]),
    Case("--batch_size abc", LA, ["--batch_size", "abc"], None, 2, ["--batch_size", "invalid int value: 'abc'"]),
    Case("--resume --overwrite", LA, ["--resume", "--overwrite"], None, 2, ["--resume and --overwrite"]),
    Case("--ddp_timeout 0", LA, ["--ddp_timeout", "0"], None, 2, ["argument --ddp_timeout: 0: expected a positive"]),
    Case("--out_dir is a file", LA, [], on_runs(out_dir_a_file), 1, ["--out_dir", "runs", "a file, expected a folder"]),
    Case("run folder already holds a run", LA, [], on_runs(lambda out: latest_with(out, "LA", b"x")), 1,
         ["LA_bad_2_labeled", "already holds a run", "--resume", "--overwrite"]),
    Case("run folder stopped before its first checkpoint", LA, [], on_runs(lambda out: existing_run(out, "LA")), 1,
         ["LA_bad_2_labeled", "without latest.pth", "pass --overwrite to start it again"]),
    Case("--resume with nothing to resume", LA, ["--resume"], None, 1,
         ["--resume", "LA_bad_2_labeled/latest.pth does not exist"]),
    Case("--resume, latest.pth random bytes", LA, ["--resume"],
         on_runs(lambda out: latest_with(out, "LA", os.urandom(4096))), 1,
         ["--resume", "LA_bad_2_labeled/latest.pth", "cannot be read (neither a torch zip archive"]),
    Case("--resume, latest.pth empty", LA, ["--resume"], on_runs(lambda out: latest_with(out, "LA", b"")), 1,
         ["--resume", "LA_bad_2_labeled/latest.pth", "cannot be read (empty file)"]),
    Case("--resume, latest.pth truncated", LA, ["--resume"],
         on_runs(lambda out: latest_with(out, "LA", TRUNCATED)), 1,
         ["--resume", "LA_bad_2_labeled/latest.pth", "cannot be read (a torch zip archive that is truncated"]),
    Case("--resume, latest.pth a pickled object", LA, ["--resume"],
         on_runs(lambda out: latest_with(out, "LA", {"model": Opaque()})), 1,
         ["--resume", "LA_bad_2_labeled/latest.pth", "cannot be read (it holds Python objects a weights-only load "
                                                      "refuses, such as test_bad_input.Opaque)"]),
    Case("--resume, latest.pth a malicious pickle (os.system)", LA, ["--resume"],
         on_runs(lambda out: latest_with(out, "LA", {"model": RunsCode()})), 1,
         ["--resume", "LA_bad_2_labeled/latest.pth", "cannot be read (it holds Python objects a weights-only load "
                                                      "refuses, such as posix.system)"]),
    Case("--resume, latest.pth of another network", LA, ["--resume"],
         on_runs(lambda out: latest_with(out, "LA", {"model": {"w": torch.zeros(2)}, "optimizer": {}, "iteration": 1,
                                                     "args": {}})), 1,
         ["--resume", "LA_bad_2_labeled/latest.pth", "flags that change the method differ"]),
    Case("--resume, latest.pth not a dict", LA, ["--resume"],
         on_runs(lambda out: latest_with(out, "LA", [torch.zeros(2)])), 1,
         ["LA_bad_2_labeled/latest.pth", "holds list", "expected a dict"]),
    Case("--resume, latest.pth without 'model'", LA, ["--resume"],
         on_runs(lambda out: latest_with(out, "LA", {"weights": torch.zeros(2)})), 1,
         ["LA_bad_2_labeled/latest.pth", "holds ['weights']", "'model'"]),
    Case("--resume, latest.pth without optimizer", LA, ["--resume"],
         on_runs(lambda out: latest_with(out, "LA", {"model": {"w": torch.zeros(2)}, "iteration": 3})), 1,
         ["LA_bad_2_labeled/latest.pth", "holds ['iteration', 'model']",
          "expected a dict with the keys ['model', 'optimizer', 'iteration', 'args']"]),
    Case("ACDC --labelnum 5", ACDC, ["--labelnum", "5"], None, 1, ["--labelnum 5", "expected one of 1, 3, 7, 14"]),
    Case("ACDC --labelnum 3 beyond the slice list", ACDC, ["--labelnum", "3"], None, 1,
         ["--labelnum 3", "first 68 slices", "train_slices.list has 64"]),
    Case("ACDC --patch_size 256", ACDC, ["--patch_size", "256"], None, 2,
         ["argument --patch_size: 256: expected 2 multiples of 16"]),
    Case("ACDC missing root", ACDC, ["--root_path", "{tmp}/nowhere"], None, 1,
         ["data root", "nowhere", "no such folder"]),
    Case("ACDC label values outside the classes", ACDC, [], acdc_label_7, 1,
         ["data/slices/patient002_frame01_slice_9.h5", "label values [7]", "0..3"], True),
    Case("ACDC NaN intensity", ACDC, [], acdc_nan, 1, ["_slice_9.h5", "1 non-finite values"], True),
    Case("ACDC intensity above 1", ACDC, [], acdc_above_one, 1, ["_slice_9.h5", "[0, 3.5]", "expected [0, 1]"], True),
    Case("ACDC slice of one value", ACDC, [], acdc_constant_slice, 1,
         ["_slice_9.h5: image of one value (0) everywhere, expected intensities that vary"], True),
    Case("ACDC slice that is not its volume's (renumbered)", ACDC, [], acdc_shifted_slice, 1,
         ["slice patient002_frame01_slice_9 (", "data/slices/patient002_frame01_slice_9.h5) does not equal slice 8 "
          "of volume patient002_frame01 (", "data/patient002_frame01.h5), expected a copy of it"], True),
    Case("ACDC --val_every with a missing val list", ACDC, ["--val_every", "5", "--val_list", "nope.list"], None, 1,
         ["list nope.list", "exists"]),
    Case("ACDC --val_every, a val volume missing", ACDC, ["--val_every", "5"], acdc_val_volume_missing, 1,
         ["case file not found", "data/patient009_frame01.h5"], True),
]
if not HAS_CUDA:
    CASES.append(Case("--device cuda without CUDA", LA, ["--device", "cuda"], None, 1,
                      ["--device cuda", "CUDA is not available"]))
TRUNCATED = b""  # filled in by the fixture (half of a real checkpoint)


def make_truncated(base: Path) -> bytes:
    buf = base / "full.pth"
    save_checkpoint({"model": {"w": torch.randn(4096)}, "optimizer": {}, "iteration": 1, "args": {}}, buf)
    return buf.read_bytes()[: buf.stat().st_size // 2]


@pytest.fixture(scope="module")
def masters(tmp_path_factory):
    global TRUNCATED
    base = tmp_path_factory.mktemp("bad_masters")
    la, acdc = build_roots(base)
    TRUNCATED = make_truncated(base)
    return la, acdc


class TooLate(AssertionError):
    pass


def run_case(case: Case, la_master, acdc_master, tmp: Path):
    """Run one case on fresh copies; returns (exit code, the message, seconds, files written under out).
    Raises TooLate when the run reaches the training loop (wrap_model, after the data is loaded), or (a case that is not about the case files)
    the training set."""
    task_root = la_master if case.script == LA else acdc_master
    root = shutil.copytree(task_root, tmp / task_root.name)
    out = tmp / "runs"
    out.mkdir()
    if case.mutate is not None:
        case.mutate(out if getattr(case.mutate, "on_runs", False) else root)
    before = sorted(p.relative_to(out) for p in out.rglob("*")) if out.is_dir() else []
    good = LA_OK if case.script == LA else ACDC_OK
    argv = ["--root_path", str(root), "--out_dir", str(out), "--exp", "bad", *good,
            *[f.format(tmp=tmp) for f in case.flags]]
    module = train_la if case.script == LA else train_acdc

    def too_late(what):
        def reached(*a, **k):
            raise TooLate(f"{case.name}: {what} reached; the check came too late")
        return reached
    saved = {"wrap_model": loop.wrap_model}
    if not case.data:
        saved["TrainSet"] = loop.TrainSet
    for attr in saved:
        setattr(loop, attr, too_late("the training set" if attr == "TrainSet" else "the training loop"))
    err = StringIO()
    argv0, sys.argv[0] = sys.argv[0], str(CODE / case.script)  # argparse names the program after it
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
            setattr(loop, attr, value)
    seconds = time.perf_counter() - t0
    after = sorted(p.relative_to(out) for p in out.rglob("*")) if out.is_dir() else []
    return code, message, seconds, [str(p) for p in after if p not in before]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_refused_with_one_message(case, masters, tmp_path):
    code, message, seconds, written = run_case(case, *masters, tmp_path)
    assert code == case.code, f"{case.name}: exit {code}, message {message!r}"
    assert "\n" not in message, f"{case.name}: more than one line:\n{message}"
    assert message.startswith(f"{case.script}: error: " if code == 2 else "error: "), message
    for s in case.substrings:
        assert s in message, f"{case.name}: {s!r} not in {message!r}"
    assert seconds < SECONDS, f"{case.name}: took {seconds:.1f} s"
    assert not written, f"{case.name}: wrote {written}"


def test_the_good_flags_reach_the_model(masters, tmp_path):
    """The harness is not vacuous: with good data and flags both scripts read the training set and get as far as
    building the model (where run_case stops them)."""
    for i, script in enumerate((LA, ACDC)):
        (tmp_path / str(i)).mkdir()
        with pytest.raises(TooLate, match="the training loop"):
            run_case(Case("good", script, [], None, 0, [], True), *masters, tmp_path / str(i))
        with pytest.raises(TooLate, match="the training set"):
            run_case(Case("good", script, [], None, 0, []), *masters, tmp_path / str(i) / "again")


def test_patch_larger_than_a_volume_is_padded_not_refused(masters, tmp_path):
    """LA crops zero-pad every axis (as UA-MT), so no patch is too large for a volume: no error, the run reaches
    the training loop, and the training set yields patches of the full size. (ACDC slices are zoomed to
    the patch.)"""
    la, _ = masters
    case = Case("patch larger than the volumes", LA, ["--patch_size", "32", "32", "32"], None, 0, [], True)
    with pytest.raises(TooLate, match="the training loop"):
        run_case(case, *masters, tmp_path)
    names = read_list(la / "train.list")
    ds = TrainSet("la", la, names, 2, (32, 32, 32))
    labeled, unlabeled, partner = ds[(0, 1, "l")], ds[(3, 2, "u")], ds[(2, 3, "p")]
    assert labeled["image"].shape == (1, 32, 32, 32) and labeled["label"].shape == (32, 32, 32)
    assert all(item[k].shape == (1, 32, 32, 32) for item in (unlabeled, partner)
               for k in ("image_w", "image_s1", "image_s2"))


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
    assert err.startswith(f"error: checkpoint {junk}: cannot be read")
    assert not (tmp_path / "runs").exists()


def nan_weights(task):
    state = build_model(task).state_dict()
    state[next(k for k in state if k.endswith("weight"))].fill_(float("nan"))
    return state


@pytest.mark.parametrize("script, payload, expected", [
    (test_la, b"random", "cannot be read ("),
    (test_la, {"model": nan_weights("la"), "args": {"patch_size": [16, 16, 16]}}, "weight tensors are not finite"),
    (test_la, b"", "cannot be read (empty file)"),
    (test_acdc, {"weights": torch.zeros(1)}, "holds ['weights'], expected a dict with the keys ['model']"),
    (test_acdc, {"model": Opaque()}, "cannot be read ("),
    (test_acdc, {"model": {"w": torch.zeros(1)}, "args": {"patch_size": [32, 32]}}, "its weights do not fit the UNet"),
    (test_acdc, {"model": {"w": torch.zeros(1)}}, "no patch_size in its training flags; pass --patch_size"),
])
def test_evaluation_cli_turns_bad_checkpoints_into_one_line(script, payload, expected, masters, tmp_path):
    ckpt = tmp_path / "iter_1.pth"
    if isinstance(payload, bytes):
        ckpt.write_bytes(payload)
    else:
        torch.save(payload, ckpt)
    root, list_name = (masters[0], "train.list") if script is test_la else (masters[1], "val.list")
    with pytest.raises(SystemExit) as e:
        script.main(["--ckpt", str(ckpt), "--root_path", str(root), "--list", list_name, "--device", "cpu",
                     "--out", str(tmp_path / "out")])
    assert isinstance(e.value.code, str) and "\n" not in e.value.code
    assert e.value.code.startswith(f"error: checkpoint {ckpt}") and expected in e.value.code, e.value.code


def good_checkpoint(path: Path, task: str, patch_size) -> Path:
    torch.manual_seed(0)
    save_checkpoint({"model": build_model(task).state_dict(), "iteration": 1,
                     "args": {"task": task, "patch_size": list(patch_size), "max_iterations": 1}}, path)
    return path


@pytest.mark.parametrize("task", ["la", "acdc"])
def test_evaluation_cli_refuses_a_bad_case_with_one_line(masters, tmp_path, task):
    """The test scripts read and check each case before they score it: a damaged case ends the evaluation with
    one line naming its file, and no results are written; a list naming a missing case file is refused before
    any case is scored."""
    la, acdc = masters
    out = tmp_path / "out"
    if task == "la":
        root = shutil.copytree(la, tmp_path / "LA")
        nan_image(root)  # the second case of train.list
        ckpt = good_checkpoint(tmp_path / "iter_1.pth", "la", (16, 16, 16))
        argv, script, bad, first = ["--list", "train.list"], test_la, la_case(root), read_list(root / "train.list")[0]
        expected = "1 non-finite values"
    else:
        root = shutil.copytree(acdc, tmp_path / "ACDC")
        name = read_list(root / "val.list")[1]
        path = case_path("acdc", root, name)
        image, label = read(path)
        label[0, 0, 0] = 9
        rewrite(path, image=image, label=label)
        ckpt = good_checkpoint(tmp_path / "iter_1.pth", "acdc", (32, 32))
        argv, script, bad, first = ["--list", "val.list"], test_acdc, path, read_list(root / "val.list")[0]
        expected = "label values [9] outside the classes 0..3"
    common = ["--ckpt", str(ckpt), "--root_path", str(root), "--device", "cpu", "--out", str(out), "--no_png"]
    stdout = StringIO()
    with pytest.raises(SystemExit) as e, redirect_stdout(stdout):
        script.main(common + argv)
    msg = e.value.code
    assert isinstance(msg, str) and "\n" not in msg and msg.startswith(f"error: {bad}: ") and expected in msg, msg
    scored = [line for line in stdout.getvalue().splitlines() if line.startswith(first)]
    assert scored, stdout.getvalue()  # the first case was scored before the damaged one was read
    assert not (out / "metrics.csv").exists() and not (out / "summary.json").exists()

    # a case file missing from the list: refused before the first case
    bad.unlink()
    with pytest.raises(SystemExit) as e:
        script.main(common + argv)
    msg = e.value.code
    assert isinstance(msg, str) and "\n" not in msg and msg.startswith("error: list ") and str(bad) in msg, msg
    assert "1 case files missing" in msg


@pytest.mark.parametrize("mutate, expected", [
    (huge_image, ", 3e+38], expected z-scored values within +-100 (the 100 published LA images lie within "),
    (constant_image, "image of one value (0.25) everywhere, expected intensities that vary"),
], ids=["3e38", "one_value"])
def test_implausible_intensities_are_refused_by_check_data_and_evaluation(masters, tmp_path, capsys, mutate,
                                                                          expected):
    """The same check as training's (test_bad_input_is_refused_with_one_message), on the arrays each one reads
    anyway: check_data.py and test_la.py end with the same line naming the file, and no results are written."""
    import check_data
    root = shutil.copytree(masters[0], tmp_path / "LA")
    mutate(root)
    ckpt = good_checkpoint(tmp_path / "iter_1.pth", "la", (16, 16, 16))
    assert check_data.main(["--task", "la", "--root_path", str(root)]) == 1
    line = capsys.readouterr().err.strip()
    assert line.startswith(f"error: {la_case(root)}: ") and expected in line and "\n" not in line, line
    with pytest.raises(SystemExit) as e, redirect_stdout(StringIO()):
        test_la.main(["--ckpt", str(ckpt), "--root_path", str(root), "--list", "train.list", "--device", "cpu",
                      "--out", str(tmp_path / "out"), "--no_png"])
    assert e.value.code == line
    assert not (tmp_path / "out" / "metrics.csv").exists()


def test_read_only_out_dir_and_run_folder(masters, tmp_path):
    """A read-only --out_dir is refused before the data is read; test_la.py --run on a read-only run folder before
    any case is evaluated."""
    la, _ = masters
    out = tmp_path / "runs"
    out.mkdir(mode=0o555)
    try:
        (out / "probe").touch()
        pytest.skip("this user writes into read-only folders (root); tests/faults.py uses a read-only mount instead")
    except PermissionError:
        pass
    with pytest.raises(SystemExit, match=rf"^error: --out_dir {out}: cannot write the run folder .*\(Permission"):
        train_la.main(["--root_path", str(la), "--out_dir", str(out), *LA_OK])
    run = tmp_path / "run"
    run.mkdir()
    good_checkpoint(run / "iter_1.pth", "la", (16, 16, 16))
    run.chmod(0o555)
    with pytest.raises(SystemExit, match=r"^error: output folder .*eval_train: .* is not a writable folder"):
        test_la.main(["--run", str(run), "--root_path", str(la), "--list", "train.list", "--device", "cpu"])


# ------------------------------------------------------------------------------------------------ non-finite
def nan_run(masters, tmp_path, monkeypatch, base_lr):
    """A tiny ACDC run with an absurd learning rate; records latest.pth before every iteration."""
    _, acdc = masters
    seen = []
    real = train_acdc.train_iteration

    def recording(model, optimizer, batch, it, args, device):
        latest = tmp_path / "ACDC_nan_1_labeled" / "latest.pth"
        seen.append((it, latest.read_bytes() if latest.exists() else None))
        return real(model, optimizer, batch, it, args, device)
    monkeypatch.setattr(train_acdc, "train_iteration", recording)
    argv = ["--root_path", str(acdc), "--out_dir", str(tmp_path), "--exp", "nan", *ACDC_OK, "--batch_size", "4",
            "--labeled_bs", "2", "--max_iterations", "6", "--save_every", "1", "--log_every", "1",
            "--base_lr", base_lr]
    err = StringIO()
    with redirect_stderr(err), pytest.raises(SystemExit) as e:
        train_acdc.main(argv)
    return e.value.code, err.getvalue(), seen, tmp_path / "ACDC_nan_1_labeled"


@pytest.mark.parametrize("base_lr, stop, exit_code", [
    ("1e30", "non-finite loss at iteration", 1),                        # the loss becomes NaN
    ("1e8", "error: non-finite weights after iteration", "a message"),  # a finite loss, non-finite weights after
])
def test_non_finite_training_stops_and_keeps_the_last_good_checkpoint(masters, tmp_path, monkeypatch, base_lr, stop,
                                                                      exit_code):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code, err, seen, run_dir = nan_run(masters, tmp_path, monkeypatch, base_lr)
    finally:
        torch.set_num_threads(before)
    if exit_code == 1:  # logged, then SystemExit(1)
        assert code == 1, (code, err[-2000:])
    else:  # SystemExit with the message (Python prints it and exits with 1)
        assert isinstance(code, str) and "\n" not in code, (code, err[-2000:])
    message = code if isinstance(code, str) else err
    assert stop in message, (code, err[-2000:])
    line = [line for line in message.splitlines() if "non-finite" in line][0]
    print(f"\n--base_lr {base_lr}: exit {code if isinstance(code, int) else 1}: {line}")
    assert "last checkpoint is kept" in line
    last_it, last_bytes = seen[-1]  # latest.pth as it was when the failing iteration started
    assert last_it >= 1 and (run_dir / "latest.pth").read_bytes() == last_bytes
    assert f"iteration {last_it + 1}" in line
    state = load_checkpoint(run_dir / "latest.pth")
    assert state["iteration"] == last_it
    assert all(bool(torch.isfinite(v).all()) for v in state["model"].values() if v.is_floating_point())
    assert not list(run_dir.glob("iter_*.pth")) and not list(run_dir.glob("*.tmp"))


# ------------------------------------------------------------------------------------------------ table
def main():
    """Print every case and its message."""
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        base = Path(d)
        global TRUNCATED
        la, acdc = build_roots(base / "m")
        TRUNCATED = make_truncated(base)
        for i, case in enumerate(CASES):
            tmp = base / f"c{i}"
            tmp.mkdir()
            code, message, seconds, _ = run_case(case, la, acdc, tmp)
            shown = message.replace(str(tmp), "<tmp>")
            flags = " ".join(f.replace("{tmp}", "<tmp>") for f in case.flags)
            print(f"| {case.name} | `{case.script}{' ' + flags if flags else ''}` | {code} | {seconds:.2f} | "
                  f"`{shown}` |")


if __name__ == "__main__":
    main()
