"""What test_la.py and test_acdc.py share: the flags, the checks before any work, inference (LA sliding
window, ACDC slice by slice), the printed table and the files written (docs/PROTOCOL.md).

The evaluated checkpoint of a run folder is its final one, ``iter_<max_iterations>.pth``; a "best" checkpoint
is never looked at. Results go into ``eval_<list name>/`` beside the checkpoint (or --out): ``metrics.csv``,
``summary.json``, ``png/<case>.png`` and, with --save_nii, ``predictions/<case>_{img,gt,pred}.nii.gz``.
"""
import csv
import json
import math
import os
import re
import sys
from itertools import product
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from networks import build_cml, build_model
from utils import resolve
from utils.checkpoint import CheckpointError, load_checkpoint, load_weights
from utils.data import DataError, case_path, find_list, load_case, read_list
from utils.datasets import description_of, layout_of, resolve_dataset, saved_args
from utils.flags import ArgumentParser
from utils.metrics import EMPTY_DISTANCE_OPTIONS, METRICS, multiclass_metrics
from utils.signals import Stopped, as_stopped, stop_signals_handled, stop_signals_held
from utils.training import pick_device


# --------------------------------------------------------------------------------------------- set-up
def eval_parser(description: str, n_dims: int) -> ArgumentParser:
    """The flags both test scripts share."""
    p = ArgumentParser(description=description)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run folder: evaluates its final checkpoint iter_<max_iterations>.pth")
    src.add_argument("--ckpt", help="a checkpoint file (results go next to it unless --out)")
    p.add_argument("--root_path", help="data root (default: the checkpoint's root_path)")
    p.add_argument("--list", help="list of cases: a name inside the data root, or a path (default test.list; 3D: the "
                                  "data set's test list)")
    p.add_argument("--out", help="output folder (default: eval_<list name> beside the checkpoint)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--amp", choices=["none", "bf16"], default="none", help="bf16 autocast of the forward pass")
    p.add_argument("--patch_size", type=int, nargs=n_dims, help="network input size (default: the checkpoint's)")
    p.add_argument("--empty_distance", choices=EMPTY_DISTANCE_OPTIONS, default="nan",
                   help="95HD/ASD of an empty prediction: nan = undefined, left out of the means (default); "
                        "zero = scored 0, the lineage's flattering habit")
    p.add_argument("--save_nii", action="store_true", help="write predictions/<case>_{img,gt,pred}.nii.gz")
    p.add_argument("--no_png", dest="png", action="store_false", help="no png/<case>.png overlays")
    return p


def run_evaluation(evaluate, args) -> dict:
    """``evaluate(args)`` (a test script's work) ending with one line: a bad checkpoint, case or output folder
    (exit 1); a stop signal or Ctrl-C (exit 128 + the signal number), a result file being written whole first and
    metrics.csv, summary.json not written at all."""
    try:
        with stop_signals_handled():
            return evaluate(args)
    except (CheckpointError, DataError) as e:
        raise SystemExit(f"error: {e}") from None
    except (Stopped, KeyboardInterrupt) as e:
        e = as_stopped(e)
        print(f"error: stopped by {e} while evaluating on {args.list}: metrics.csv and summary.json not written; "
              f"start the evaluation again", file=sys.stderr)
        raise SystemExit(e.exit_code) from None


def final_checkpoint(run_dir: Path) -> Path:
    """The run's ``iter_<max_iterations>.pth`` (max_iterations from config.json); without it, the highest
    ``iter_<N>.pth`` with a warning."""
    if not run_dir.is_dir():
        raise CheckpointError(f"run folder {run_dir}: no such folder")
    found = {int(m.group(1)): p for p in run_dir.iterdir() if (m := re.fullmatch(r"iter_(\d+)\.pth", p.name))}
    if not found:
        raise CheckpointError(f"run folder {run_dir}: no iter_<N>.pth checkpoint in it")
    try:
        final = json.loads((run_dir / "config.json").read_text())["args"]["max_iterations"]
    except (OSError, ValueError, KeyError, TypeError):
        final = None
    if final in found:
        return found[final]
    why = f"iter_{final}.pth is missing (unfinished run?)" if final else "no config.json with max_iterations"
    print(f"warning: run folder {run_dir}: {why}; evaluating the highest checkpoint, {found[max(found)].name}",
          file=sys.stderr)
    return found[max(found)]


def prepare(args, task: str) -> SimpleNamespace:
    """Everything the evaluation loop needs, every check done first: the checkpoint, the data root, the list and
    its case files, a writable output folder, then the model (finite weights) on the device."""
    device = pick_device(args.device)
    path = final_checkpoint(resolve(args.run)) if args.run else resolve(args.ckpt)
    state = load_checkpoint(path)
    train_args = saved_args({"task": task, **(state.get("args") or {})})  # a bare checkpoint: the task's defaults
    if not state.get("args") and getattr(args, "n_classes", None):  # ... or the classes --n_classes says
        train_args["n_classes"] = args.n_classes
    if train_args.get("task", task) != task:
        raise CheckpointError(f"checkpoint {path}: trained for {train_args['task']!r}, not {task!r}")
    patch_size = args.patch_size or train_args.get("patch_size")
    if not patch_size:
        raise CheckpointError(f"checkpoint {path}: no patch_size in its training flags; pass --patch_size")
    data = eval_dataset(args, train_args, path) if task == "la" else None  # 3D: the data set evaluated
    layout, desc = (layout_of(data), description_of(data)) if data else (None, None)
    root = resolve(data.root_path if data else args.root_path or train_args.get("root_path") or "data/ACDC")
    list_name = args.list = args.list or (desc["test_list"] if desc else "test.list")  # resolved: the stop line names it
    list_path = find_list(root, list_name)
    cases = read_list(list_path)
    missing = [c for c in cases if not case_path(task, root, c, layout).is_file()]
    if missing:
        raise DataError(f"list {list_path}: {len(missing)} case files missing, e.g. "
                        f"{case_path(task, root, missing[0], layout)}")
    out_dir = resolve(args.out) if args.out else path.parent / f"eval_{Path(list_name).stem}"
    existing = next(p for p in (out_dir, *out_dir.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise CheckpointError(f"output folder {out_dir}: {existing} is not a writable folder (pass --out)")
    final = train_args.get("max_iterations")
    if final is not None and state.get("iteration") != final:
        print(f"warning: checkpoint {path}: iteration {state.get('iteration')} is not the final one ({final})",
              file=sys.stderr)
    cml = train_args.get("method") == "cml"  # CML's two subnets predict the mean of their softmax (docs/CML.md)
    n_classes = train_args.get("n_classes") if task == "la" else None
    model = build_cml(task, n_classes) if cml else build_model(task, n_classes=n_classes)
    load_weights(model, state["model"], path)
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"checkpoint {path}: {len(bad)} weight tensors are not finite, e.g. {bad[0]}")
    return SimpleNamespace(checkpoint=path, iteration=state.get("iteration"), final=final, root=root,
                           list_path=list_path, cases=cases, out_dir=out_dir, device=device, layout=layout,
                           description=desc,
                           model=model.to(device).eval(),
                           patch_size=tuple(patch_size),
                           amp=torch.bfloat16 if args.amp == "bf16" else None,
                           method=train_args.get("method"))


def eval_dataset(args, train_args: dict, path) -> SimpleNamespace:
    """test_la.py: the data set evaluated, resolved as training resolves it: the checkpoint's (data set, case file,
    classes, data root), or --dataset's description where given; --case_file, --n_classes and --root_path win.
    CheckpointError when its classes are not those the checkpoint was trained for."""
    own = args.dataset is None  # the checkpoint's own data set
    data = SimpleNamespace(task="la", dataset=args.dataset or train_args["dataset"],
                           case_file=args.case_file or (train_args["case_file"] if own else None),
                           n_classes=args.n_classes or (train_args["n_classes"] if own else None),
                           root_path=args.root_path or (train_args.get("root_path") if own else None))
    resolve_dataset(data, flags=("root_path",))
    if data.n_classes != train_args["n_classes"]:
        raise CheckpointError(f"checkpoint {path}: trained for {train_args['n_classes']} classes, the data set "
                              f"evaluated ({data.dataset}) has {data.n_classes}")
    return data


def protocol(setup, args) -> dict:
    """The summary.json entries that say what was evaluated and how."""
    return dict(checkpoint=str(setup.checkpoint), iteration=setup.iteration, max_iterations=setup.final,
                final_checkpoint=setup.final is not None and setup.iteration == setup.final,
                root_path=str(setup.root), list=str(setup.list_path), patch_size=list(setup.patch_size),
                device=str(setup.device), amp=args.amp, empty_distance=args.empty_distance, method=setup.method)


# ------------------------------------------------------------------------------------------- inference
def window_starts(size: int, patch: int, stride: int) -> list:
    """Window offsets along one axis (``size >= patch``): regular steps, the last one flush with the end."""
    if size < patch:
        raise ValueError(f"an axis of {size} voxels is smaller than the patch ({patch}): pad it first")
    return [min(stride * i, size - patch) for i in range(math.ceil((size - patch) / stride) + 1)]


def sliding_window(model, image, patch_size=(112, 112, 80), stride_xy=18, stride_z=4, device="cpu", sw_batch=1,
                   amp_dtype=None) -> tuple:
    """LA inference of one ``(X, Y, Z)`` volume: windows of ``patch_size`` at stride ``stride_xy`` (x, y) and
    ``stride_z`` (z), a volume smaller than the patch zero-padded (odd extra voxel at the end) and cropped back,
    softmax averaged over the windows covering each voxel. ``sw_batch`` windows per forward call.
    Returns ``(probabilities (C, X, Y, Z) float32, label map (X, Y, Z) uint8)`` as numpy arrays."""
    image = np.asarray(image, dtype=np.float32)
    size = image.shape
    before = [max(p - s, 0) // 2 for s, p in zip(size, patch_size)]
    pads = [(b, max(p - s, 0) - b) for b, s, p in zip(before, size, patch_size)]
    image = np.pad(image, pads, mode="constant")
    starts = list(product(*(window_starts(s, p, t) for s, p, t in
                            zip(image.shape, patch_size, (stride_xy, stride_xy, stride_z)))))
    px, py, pz = patch_size
    model.eval()
    with torch.inference_mode():
        volume = torch.from_numpy(image).to(device)
        probs, count = None, torch.zeros(image.shape, device=device)
        for i in range(0, len(starts), sw_batch):
            chunk = starts[i:i + sw_batch]
            x = torch.stack([volume[a:a + px, b:b + py, c:c + pz] for a, b, c in chunk])[:, None]
            with torch.autocast(torch.device(device).type, dtype=amp_dtype, enabled=amp_dtype is not None):
                p = F.softmax(model(x).float(), dim=1)
            if probs is None:
                probs = torch.zeros((p.shape[1],) + image.shape, device=device)
            for (a, b, c), pw in zip(chunk, p):
                probs[:, a:a + px, b:b + py, c:c + pz] += pw
                count[a:a + px, b:b + py, c:c + pz] += 1
        probs = (probs / count)[(slice(None),) + tuple(slice(b, b + s) for b, s in zip(before, size))]
        return probs.cpu().numpy(), probs.argmax(0).to(torch.uint8).cpu().numpy()


def predict_slices(model, image, patch_size=(256, 256), device="cpu", batch_slices=16, amp_dtype=None) -> np.ndarray:
    """ACDC inference of one ``(D, H, W)`` volume: each slice zoomed to ``patch_size`` (order 0), the argmax
    zoomed back (order 0), ``batch_slices`` slices per forward call. Returns the ``(D, H, W)`` uint8 label map."""
    image = np.asarray(image, dtype=np.float32)
    (h, w), (ph, pw) = image.shape[1:], patch_size
    slices = np.stack([ndimage.zoom(s, (ph / h, pw / w), order=0) for s in image])
    out = np.empty((len(image), ph, pw), dtype=np.uint8)
    model.eval()
    with torch.inference_mode():
        for i in range(0, len(slices), batch_slices):
            x = torch.from_numpy(slices[i:i + batch_slices, None]).to(device)
            with torch.autocast(torch.device(device).type, dtype=amp_dtype, enabled=amp_dtype is not None):
                out[i:i + batch_slices] = model(x).float().argmax(1).to(torch.uint8).cpu().numpy()
    return np.stack([ndimage.zoom(s, (h / ph, w / pw), order=0) for s in out])


def acdc_validation(args, root: Path, device, rank: int):
    """--val_every N on ACDC: a ``hook(done, model, writer, log)`` for ``train_loop`` that logs the mean Dice over
    RV, Myo and LV on --val_list every N iterations (rank 0; logged only, never used to pick a checkpoint). The
    list's volumes are read and checked now, not at the first validation (DataError names a bad one)."""
    names = read_list(find_list(root, args.val_list)) if args.val_every and rank == 0 else []
    for name in names:
        load_case("acdc", root, name)

    def hook(done, model, writer, log):
        if not names or done % args.val_every:
            return
        dice = []
        for name in names:
            image, label = load_case("acdc", root, name)
            pred = predict_slices(model, image, args.patch_size, device)
            dice.append(np.mean([m["dice"] for m in multiclass_metrics(pred, label, (1, 2, 3)).values()]))
        model.train()
        writer.add_scalar("val/mean_dice", float(np.mean(dice)), done)
        log.info(f"it {done}: mean Dice on {args.val_list} {np.mean(dice):.4f} (logged only)")
    return hook


def largest_connected_component(mask) -> np.ndarray:
    """The largest connected component of a binary mask (full connectivity); an empty mask stays empty."""
    mask = np.asarray(mask) != 0
    components, n = ndimage.label(mask, structure=np.ones((3,) * mask.ndim))
    if n <= 1:
        return mask
    return components == int(np.argmax(np.bincount(components.ravel())[1:])) + 1


# ------------------------------------------------------------------------------------------- reporting
def case_note(m: dict) -> str:
    """The empty-case flag of one result in words ('' for an ordinary case)."""
    return next((text for flag, text in (("empty_pred", "empty prediction"), ("empty_label", "empty label"),
                                         ("both_empty", "both empty")) if m[flag]), "")


class Table:
    """A fixed-width text table printed line by line: a name column, then one column per metric. Values below
    0.001 print in scientific notation, so a tiny Dice does not read as 0."""

    def __init__(self, name_width: int, columns=METRICS, width: int = 10):
        self.name_width, self.columns, self.width = max(name_width, 4), list(columns), width

    def header(self) -> str:
        head = "case".ljust(self.name_width) + "".join(c.rjust(self.width) for c in self.columns) + "  note"
        return head + "\n" + "-" * len(head)

    def line(self, name: str, values: dict, note: str = "") -> str:
        cells = "".join((f"{v:.4f}" if v == 0 or not 0 < abs(v) < 1e-3 else f"{v:.2e}").rjust(self.width)
                        for v in (values[c] for c in self.columns))
        return (name.ljust(self.name_width) + cells + ("  " + note if note else "")).rstrip()

    def mean_std(self, name: str, summary: dict) -> str:
        """``<name> mean`` and ``<name> std`` lines of a summary."""
        std = {c: summary[c + "_std"] for c in self.columns}
        return self.line(f"{name} mean".strip(), summary) + "\n" + self.line(f"{name} std".strip(), std)


def _json_safe(value):
    """NaN -> null (strict JSON), numpy scalars -> Python, recursively."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    return None if isinstance(value, float) and math.isnan(value) else value


def report(table: Table, out_dir: Path, rows: list, columns: list, summary: dict) -> dict:
    """Print the means and standard deviations (per class first, if any) and the distance policy, write
    ``metrics.csv`` and ``summary.json``; returns the summary."""
    for name, per_class in summary.get("per_class", {}).items():
        print(table.mean_std(name, per_class))
    print(table.mean_std("", summary))
    print(summary["distance_policy"])
    paths = write_results(out_dir, rows, columns, summary)
    print(f"wrote {paths[0]} and {paths[1]}")
    return summary


@stop_signals_held(then_stop=False)  # a stop signal now comes too late: the evaluation is complete
def write_results(out_dir: Path, rows: list, columns: list, summary: dict) -> tuple:
    """``metrics.csv`` (a row per case, or per case and class) and ``summary.json`` (NaN as null)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out_dir / "metrics.csv", out_dir / "summary.json"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    json_path.write_text(json.dumps(_json_safe(summary), indent=2) + "\n")
    return csv_path, json_path


@stop_signals_held()  # written whole, then a stop signal stops
def save_nii(folder: Path, case: str, image, label, pred) -> None:
    """``<case>_img.nii.gz``, ``<case>_gt.nii.gz``, ``<case>_pred.nii.gz`` with an identity affine (voxel units)."""
    import nibabel as nib
    folder.mkdir(parents=True, exist_ok=True)
    for suffix, array, dtype in (("img", image, np.float32), ("gt", label, np.uint8), ("pred", pred, np.uint8)):
        nib.save(nib.Nifti1Image(np.asarray(array).astype(dtype), np.eye(4)), folder / f"{case}_{suffix}.nii.gz")


@stop_signals_held()  # written whole, then a stop signal stops
def save_overlay_png(path: Path, image, label, pred, axis: int, n_slices: int = 3) -> None:
    """``n_slices`` slices along ``axis`` side by side: the image in gray (1st-99th percentile), label outlines
    green, prediction outlines red, yellow where they meet; the slices spread over where label or prediction is."""
    from skimage import io
    from skimage.segmentation import find_boundaries
    image, label, pred = (np.moveaxis(np.asarray(a), axis, 0) for a in (image, label, pred))
    present = np.flatnonzero((label != 0).any(axis=(1, 2)) | (pred != 0).any(axis=(1, 2)))
    lo, hi = (present[0], present[-1]) if present.size else (0, len(image) - 1)
    picks = np.unique(np.linspace(lo, hi, n_slices + 2)[1:-1].round().astype(int))
    low, high = np.percentile(image, (1, 99))
    gray = np.clip((image - low) / max(high - low, 1e-8), 0, 1)
    panels = []
    for k in picks:
        rgb = np.repeat((gray[k] * 255).astype(np.uint8)[..., None], 3, axis=-1)
        in_label, in_pred = find_boundaries(label[k], mode="inner"), find_boundaries(pred[k], mode="inner")
        rgb[in_label], rgb[in_pred], rgb[in_label & in_pred] = (0, 255, 0), (255, 0, 0), (255, 255, 0)
        panels += [rgb, np.full((rgb.shape[0], 2, 3), 255, np.uint8)]
    path.parent.mkdir(parents=True, exist_ok=True)
    io.imsave(path, np.concatenate(panels[:-1], axis=1), check_contrast=False)
