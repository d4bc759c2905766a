"""What ``test_la.py`` and ``test_acdc.py`` share: finding and loading the checkpoint, the list file,
the 2D slice-wise inference, post-processing, the printed table and the files written next to a run
(``metrics.csv``, ``summary.json``, ``png/<case>.png``, ``predictions/<case>_{img,gt,pred}.nii.gz``).

The evaluated checkpoint of a run folder is its final one, ``iter_<max_iterations>.pth`` (SPEC.md 4); a
"best" checkpoint is never looked at.
"""
import argparse
import csv
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage
from skimage import io as skio
from skimage.segmentation import find_boundaries

from networks import build_model

from .checkpoint import load_checkpoint
from .data_la import read_list
from .metrics import EMPTY_DISTANCE_OPTIONS, METRICS
from .paths import resolve
from .allocator import add_malloc_arg
from .run import AMP_DTYPES, pick_device

ITER_FILE = re.compile(r"iter_(\d+)\.pth")


class EvaluationError(RuntimeError):
    """A run folder, checkpoint or list that cannot be evaluated; the message names the file."""


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------- checkpoint
def _final_iteration(run_dir: Path, newest: Path) -> Optional[int]:
    """max_iterations of the run: from config.json (top level, then its 'args'), else the newest checkpoint's args."""
    config = run_dir / "config.json"
    if config.is_file():
        try:
            cfg = json.loads(config.read_text())
        except json.JSONDecodeError as e:
            raise EvaluationError(f"{config}: not valid JSON ({e})") from None
        for source in (cfg, cfg.get("args") or {}):
            if "max_iterations" in source:
                return int(source["max_iterations"])
    args = load_checkpoint(newest).get("args") or {}
    return int(args["max_iterations"]) if "max_iterations" in args else None


def find_checkpoint(run_dir) -> Path:
    """The run's final checkpoint ``iter_<max_iterations>.pth``; if it is missing (or max_iterations unknown),
    the highest ``iter_<N>.pth`` with a warning."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise EvaluationError(f"run folder {run_dir}: no such folder")
    found = {int(m.group(1)): p for p in run_dir.iterdir() if (m := ITER_FILE.fullmatch(p.name))}
    if not found:
        raise EvaluationError(f"run folder {run_dir}: no iter_<N>.pth checkpoint in it")
    newest = found[max(found)]
    final = _final_iteration(run_dir, newest)
    if final in found:
        return found[final]
    reason = "max_iterations is unknown" if final is None else f"iter_{final}.pth does not exist (unfinished run?)"
    warn(f"run folder {run_dir}: {reason}; evaluating the highest checkpoint, {newest.name}")
    return newest


def locate_checkpoint(run: Optional[str], ckpt: Optional[str], out: Optional[str]) -> tuple:
    """``(checkpoint path, output folder)`` from the --run / --ckpt / --out flags: a run folder gives its
    final checkpoint and is the default output folder; a checkpoint file writes next to itself."""
    if run is not None:
        path = find_checkpoint(resolve(run))
    else:
        path = resolve(ckpt)
        if not path.is_file():
            raise EvaluationError(f"checkpoint {path}: no such file")
    return path, resolve(out) if out is not None else path.parent


def load_model(path: Path, task: str, device: torch.device) -> tuple:
    """``(model in eval mode on device, checkpoint dict)``; warns when the checkpoint is not the run's final one."""
    state = load_checkpoint(path)
    args = state.get("args") or {}
    if args.get("task", task) != task:
        raise EvaluationError(f"checkpoint {path}: trained for task {args['task']!r}, not {task!r}")
    final = args.get("max_iterations")
    if final is not None and state.get("iteration") != final:
        warn(f"checkpoint {path}: iteration {state.get('iteration')} is not the final one ({final})")
    model = build_model(task)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise EvaluationError(f"checkpoint {path}: its weights do not fit the {task} network: "
                              f"{str(e).splitlines()[0]}") from None
    return model.to(device).eval(), state


# --------------------------------------------------------------------------------------------- setup, CLI
def add_eval_args(p: argparse.ArgumentParser, n_dims: int) -> None:
    """The flags both test scripts share."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run folder: evaluates its final checkpoint iter_<max_iterations>.pth")
    src.add_argument("--ckpt", help="a checkpoint file (results go next to it unless --out)")
    p.add_argument("--root_path", help="data root (default: the checkpoint's root_path, else the task's folder in data/)")
    p.add_argument("--list", default="test.list", help="list file: a name inside the data root, or a path")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--amp", choices=list(AMP_DTYPES), default="none", help="autocast precision of the forward pass")
    p.add_argument("--patch_size", type=int, nargs=n_dims, help="network input size (default: the checkpoint's)")
    p.add_argument("--empty_distance", choices=list(EMPTY_DISTANCE_OPTIONS), default="nan",
                   help="hd95/asd of an empty prediction: nan = undefined, left out of the means (default); "
                        "zero = scored 0, the lineage's flattering habit")
    p.add_argument("--save_nii", action="store_true", help="write predictions/<case>_{img,gt,pred}.nii.gz")
    p.add_argument("--png", dest="png", action="store_true", default=True, help="write png/<case>.png (default)")
    p.add_argument("--no_png", dest="png", action="store_false", help="no PNG overlays")
    p.add_argument("--out", help="output folder (default: the run folder, or the checkpoint's folder)")
    add_malloc_arg(p)


@dataclass
class EvalSetup:
    """Everything a test script needs before its loop over cases."""
    checkpoint: Path
    out_dir: Path
    device: torch.device
    model: torch.nn.Module
    state: dict
    root: Path
    list_path: Path
    cases: list
    patch_size: tuple
    amp_dtype: Optional[torch.dtype]

    def info(self, args) -> dict:
        """The summary.json entries that say what was evaluated and how."""
        final = (self.state.get("args") or {}).get("max_iterations")
        return dict(checkpoint=str(self.checkpoint), iteration=self.state.get("iteration"), max_iterations=final,
                    final_checkpoint=final is not None and self.state.get("iteration") == final, root_path=str(self.root),
                    list=str(self.list_path), patch_size=list(self.patch_size), device=str(self.device),
                    amp=args.amp, empty_distance=args.empty_distance)


def prepare(args, task: str, default_root: Path, default_patch: Sequence[int]) -> EvalSetup:
    """Checkpoint, model, data root, list and patch size from the flags, falling back to the checkpoint's
    training flags, then to the defaults."""
    checkpoint, out_dir = locate_checkpoint(args.run, args.ckpt, args.out)
    device = pick_device(args.device)
    model, state = load_model(checkpoint, task, device)
    train_args = state.get("args") or {}
    root = resolve(args.root_path or train_args.get("root_path") or default_root)
    if not root.is_dir():
        raise EvaluationError(f"data root {root}: no such folder (pass --root_path)")
    list_path = resolve_list(root, args.list)
    patch_size = tuple(args.patch_size or train_args.get("patch_size") or default_patch)
    return EvalSetup(checkpoint, out_dir, device, model, state, root, list_path, read_list(list_path), patch_size,
                     AMP_DTYPES[args.amp])


def resolve_list(root: Path, name: str) -> Path:
    """A list given as a name inside the data root (``test.list``) or as a path."""
    for candidate in (Path(root) / name, resolve(name)):
        if candidate.is_file():
            return candidate
    raise EvaluationError(f"list {name}: neither {Path(root) / name} nor {resolve(name)} exists")


# ----------------------------------------------------------------------------------------------- inference
def predict_volume_slices(model: torch.nn.Module, image, patch_size: Sequence[int] = (256, 256), device="cpu",
                          batch_slices: int = 16, amp_dtype: Optional[torch.dtype] = None) -> np.ndarray:
    """Slice-wise 2D prediction of a ``(D, H, W)`` volume, as the lineage's ``test_single_volume``: each slice
    is zoomed to ``patch_size`` with ``scipy.ndimage.zoom(order=0)`` (nearest, also for the image), the argmax
    of the logits (= of the softmax) is zoomed back with order 0. ``batch_slices`` slices per forward call;
    the model is put in eval mode and left there.
    Returns the ``(D, H, W)`` uint8 label map."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3:
        raise ValueError(f"expected a (D, H, W) volume, got shape {image.shape}")
    device = torch.device(device)
    h, w = image.shape[1:]
    ph, pw = patch_size
    slices = np.stack([ndimage.zoom(s, (ph / h, pw / w), order=0) for s in image])
    out = np.empty((len(image), ph, pw), dtype=np.uint8)
    model.eval()
    with torch.inference_mode():
        for i in range(0, len(slices), batch_slices):
            x = torch.from_numpy(slices[i:i + batch_slices, None]).to(device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = model(x)
            out[i:i + batch_slices] = logits.float().argmax(dim=1).to(torch.uint8).cpu().numpy()
    return np.stack([ndimage.zoom(s, (h / ph, w / pw), order=0) for s in out])


def largest_connected_component(mask) -> np.ndarray:
    """The largest connected component of a binary mask (full connectivity: 26 neighbours in 3D, as the
    lineage's skimage-based getLargestCC); an empty mask stays empty."""
    mask = np.asarray(mask) != 0
    components, n = ndimage.label(mask, structure=ndimage.generate_binary_structure(mask.ndim, mask.ndim))
    if n <= 1:
        return mask
    sizes = np.bincount(components.ravel())[1:]
    return components == int(np.argmax(sizes)) + 1


# ----------------------------------------------------------------------------------------------- reporting
def case_note(m: dict) -> str:
    """The empty-case flag of one ``binary_metrics`` result in words ('' for an ordinary case)."""
    for flag, text in (("empty_pred", "empty prediction"), ("empty_label", "empty label"), ("both_empty", "both empty")):
        if m[flag]:
            return text
    return ""


class Table:
    """Fixed-width text table printed line by line: a name column, then one column per metric."""

    def __init__(self, name_width: int, columns: Sequence[str] = METRICS, width: int = 9):
        self.name_width, self.columns, self.width = max(name_width, 4), list(columns), width

    def header(self) -> str:
        head = "case".ljust(self.name_width) + "".join(c.rjust(self.width) for c in self.columns) + "  note"
        return head + "\n" + "-" * len(head)

    def line(self, name: str, values: dict, note: str = "") -> str:
        cells = "".join(f"{values[c]:.4f}".rjust(self.width) for c in self.columns)  # NaN prints as 'nan'
        return (name.ljust(self.name_width) + cells + ("  " + note if note else "")).rstrip()

    def mean_std(self, name: str, summary: dict) -> str:
        """Two lines: ``<name> mean`` and ``<name> std`` of a ``summarize`` result."""
        std = {c: summary[c + "_std"] for c in self.columns}
        return self.line(f"{name} mean".strip(), summary) + "\n" + self.line(f"{name} std".strip(), std)


def _json_safe(value):
    """NaN -> null (strict JSON), numpy scalars -> Python, paths -> strings, recursively."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def write_results(out_dir, rows: Sequence[dict], columns: Sequence[str], summary: dict) -> tuple:
    """``metrics.csv`` (one row per case, or per case and class; NaN written as 'nan') and ``summary.json``
    (NaN written as null) in ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out_dir / "metrics.csv", out_dir / "summary.json"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    json_path.write_text(json.dumps(_json_safe(summary), indent=2) + "\n")
    return csv_path, json_path


def save_nii(folder, case: str, image, label, pred) -> None:
    """``<case>_img.nii.gz`` (float32), ``<case>_gt.nii.gz`` and ``<case>_pred.nii.gz`` (uint8), identity
    affine (voxel units, array axes as stored)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for suffix, array, dtype in (("img", image, np.float32), ("gt", label, np.uint8), ("pred", pred, np.uint8)):
        nib.save(nib.Nifti1Image(np.asarray(array).astype(dtype), np.eye(4)), folder / f"{case}_{suffix}.nii.gz")


LABEL_RGB, PRED_RGB, BOTH_RGB = (0, 255, 0), (255, 0, 0), (255, 255, 0)


def save_overlay_png(path, image, label, pred, axis: int, n_slices: int = 3) -> None:
    """A strip of ``n_slices`` slices along ``axis``: the image in gray (1st-99th percentile window), label
    outlines green, prediction outlines red (yellow where they coincide). The slices are spread over the
    extent of label and prediction along the axis (the whole axis if both are empty)."""
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
        rgb[in_label], rgb[in_pred], rgb[in_label & in_pred] = LABEL_RGB, PRED_RGB, BOTH_RGB
        panels += [rgb, np.full((rgb.shape[0], 2, 3), 255, np.uint8)]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    skio.imsave(path, np.concatenate(panels[:-1], axis=1), check_contrast=False)
