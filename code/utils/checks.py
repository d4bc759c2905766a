"""Fast data-root checks. Each problem raises ``DataError`` with ONE message naming the file (or the
flag) and what was expected; success returns a summary dict (used by ``check_data.py``).

What is checked, per list entry: the file exists, is readable h5, has ``image`` and ``label`` datasets
(checked on metadata before any array is read), image float / label integer dtype, the expected ndim,
equal shapes, label values within the classes ({0, 1} LA, 0..3 ACDC), finite intensities, and for ACDC
intensities within [0, 1] (the strong 2D perturbation clips to that range). Across the list: no
duplicates, a non-empty list, ``labelnum`` not larger than the list.

Patch size: LA crops zero-pad any axis shorter than the patch (UA-MT's RandomCrop does the same and the
sliding-window evaluation pads as well), so a patch larger than a volume is not an error; the summary
counts the cases that will be padded and adds a warning. ACDC slices are zoomed to the patch, so any
positive 2D patch is valid. A patch with the wrong number of axes or a non-positive size is an error.
"""
from __future__ import annotations

from pathlib import Path
import h5py
import numpy as np

from utils import data_acdc, data_la

LA_CLASSES = 2
ACDC_CLASSES = 4
_UNIT_TOL = 1e-6


class DataError(Exception):
    """A problem with the data on disk or with a data-related flag."""


# ----------------------------------------------------------------------------------------------------
# helpers


def _check_root(root, what: str, expected: str) -> Path:
    if root is None or str(root) == "":
        raise DataError(f"{what} root not given (expected {expected})")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{what} root not found: {root} (expected a folder holding {expected})")
    return root


def _resolve_list(root: Path, list_name_or_path) -> Path:
    p = Path(list_name_or_path)
    candidates = [p] if p.is_absolute() else [root / p, p]
    for c in candidates:
        if c.is_file():
            return c
    raise DataError(f"list file not found: {candidates[0]} (expected one entry per line)")


def _read_names(list_path: Path) -> list[str]:
    try:
        names = data_la.read_list(list_path)
    except UnicodeDecodeError as exc:
        raise DataError(f"{list_path}: not a text list ({exc})") from exc
    if not names:
        raise DataError(f"{list_path}: the list is empty (expected one entry per line)")
    seen = set()
    for n in names:
        if n in seen:
            raise DataError(f"{list_path}: entry {n!r} appears more than once")
        seen.add(n)
    return names


def _check_int_flag(value, flag: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise DataError(f"{flag} must be a non-negative int, got {value!r}")
    return int(value)


def _check_patch(patch_size, ndim: int) -> tuple[int, ...] | None:
    if patch_size is None:
        return None
    try:
        patch = tuple(int(p) for p in patch_size)
    except (TypeError, ValueError):
        raise DataError(f"--patch_size must be {ndim} positive ints, got {patch_size!r}") from None
    if len(patch) != ndim or min(patch) < 1:
        raise DataError(f"--patch_size must be {ndim} positive ints, got {patch_size!r}")
    return patch


def _check_file(path: Path, ndim: int, n_classes: int, unit_range: bool, read: bool) -> dict:
    """Check one h5 file; returns per-case stats (``read=False``: metadata only)."""
    if not path.is_file():
        raise DataError(f"case file not found: {path}")
    try:
        h5 = h5py.File(path, "r")
    except OSError as exc:
        raise DataError(f"{path}: cannot open as h5 ({exc})") from exc
    with h5:
        for name in ("image", "label"):
            if not isinstance(h5.get(name), h5py.Dataset):
                raise DataError(f"{path}: no '{name}' dataset (expected 'image' and 'label', "
                                f"found {sorted(h5.keys())})")
        di, dl = h5["image"], h5["label"]
        if di.ndim != ndim:
            raise DataError(f"{path}: image has {di.ndim} dims {di.shape}, expected {ndim}")
        if dl.ndim != ndim:
            raise DataError(f"{path}: label has {dl.ndim} dims {dl.shape}, expected {ndim}")
        if di.shape != dl.shape:
            raise DataError(f"{path}: image shape {di.shape} != label shape {dl.shape} (expected equal)")
        if min(di.shape) < 1:
            raise DataError(f"{path}: empty image of shape {di.shape}")
        if di.dtype.kind != "f":
            raise DataError(f"{path}: image dtype {di.dtype}, expected a float type")
        if dl.dtype.kind not in "iu":
            raise DataError(f"{path}: label dtype {dl.dtype}, expected an integer type (uint8)")
        stats = {"file": str(path), "shape": tuple(int(s) for s in di.shape), "image_dtype": str(di.dtype),
                 "label_dtype": str(dl.dtype)}
        if not read:
            return stats
        image = di[()]
        label = dl[()]
    finite = np.isfinite(image)
    if not finite.all():
        raise DataError(f"{path}: image has {int((~finite).sum())} non-finite values (NaN/inf), "
                        f"expected finite intensities")
    lo, hi = float(image.min()), float(image.max())
    if unit_range and (lo < -_UNIT_TOL or hi > 1 + _UNIT_TOL):
        raise DataError(f"{path}: image intensities in [{lo:.4g}, {hi:.4g}], expected within [0, 1]")
    lmin, lmax = int(label.min()), int(label.max())
    if lmin < 0 or lmax >= n_classes:
        bad = np.unique(label[(label < 0) | (label >= n_classes)])[:5].tolist()
        raise DataError(f"{path}: label values {bad} outside the classes 0..{n_classes - 1}")
    counts = np.bincount(label.ravel().astype(np.intp, copy=False), minlength=n_classes)
    stats.update(min=lo, max=hi, mean=float(image.mean(dtype=np.float64)),
                 std=float(image.std(dtype=np.float64)), class_counts=counts.tolist())
    return stats


def _summarise(task: str, root: Path, list_path: Path, kind: str, names: list[str],
               cases: list[dict], n_classes: int) -> dict:
    shapes = np.array([c["shape"] for c in cases])
    read = [c for c in cases if "min" in c]
    info = {
        "task": task, "root": str(root), "list": str(list_path), "kind": kind,
        "n_cases": len(names), "n_read": len(read),
        "shape_min": tuple(int(s) for s in shapes.min(axis=0)),
        "shape_max": tuple(int(s) for s in shapes.max(axis=0)),
        "image_dtypes": sorted({c["image_dtype"] for c in cases}),
        "label_dtypes": sorted({c["label_dtype"] for c in cases}),
        "warnings": [], "cases": cases,
    }
    if read:
        counts = np.sum([c["class_counts"] for c in read], axis=0).astype(np.float64)
        info.update(
            intensity_min=min(c["min"] for c in read), intensity_max=max(c["max"] for c in read),
            mean_min=min(c["mean"] for c in read), mean_max=max(c["mean"] for c in read),
            std_min=min(c["std"] for c in read), std_max=max(c["std"] for c in read),
            class_fractions=(counts / counts.sum()).tolist(),
            n_without_foreground=sum(1 for c in read if sum(c["class_counts"][1:]) == 0),
        )
    return info


def _files_checked(paths: list[Path], cases_limit, **kw) -> list[dict]:
    limit = len(paths) if cases_limit is None else _check_int_flag(cases_limit, "--limit (cases_limit)")
    for p in paths:  # existence of every entry is cheap: check it even beyond the limit
        if not p.is_file():
            raise DataError(f"case file not found: {p}")
    return [_check_file(p, read=i < limit, **kw) for i, p in enumerate(paths)]


# ----------------------------------------------------------------------------------------------------
# public


def check_la_root(root, list_name_or_path="train.list", labelnum=None, patch_size=None,
                  cases_limit=None) -> dict:
    """Check an LA root and one of its lists; ``cases_limit`` reads only the first N cases' arrays
    (metadata of all of them is still checked)."""
    root = _check_root(root, "LA", f"a list such as train.list and '{data_la.LA_CASE_DIR}/'")
    list_path = _resolve_list(root, list_name_or_path)
    names = _read_names(list_path)
    patch = _check_patch(patch_size, 3)
    if labelnum is not None:
        labelnum = _check_int_flag(labelnum, "--labelnum")
        if labelnum > len(names):
            raise DataError(f"--labelnum {labelnum} is larger than the {len(names)} cases of {list_path}")
    paths = [data_la.la_case_path(root, n) for n in names]
    cases = _files_checked(paths, cases_limit, ndim=3, n_classes=LA_CLASSES, unit_range=False)
    for name, c in zip(names, cases):
        c["name"] = name
    info = _summarise("la", root, list_path, "volumes", names, cases, LA_CLASSES)
    info["labelnum"] = labelnum
    if patch is not None:
        info["patch_size"] = patch
        padded = [c["name"] for c in cases if any(s < p for s, p in zip(c["shape"], patch))]
        info["padded_cases"] = padded
        if padded:
            info["warnings"].append(f"{len(padded)} of {len(cases)} volumes are smaller than the patch "
                                    f"{patch} on some axis and will be zero-padded by the crop")
    return info


def _is_slice_list(names: list[str]) -> bool:
    return all("_slice_" in n for n in names)


def check_acdc_root(root, list_name_or_path="train_slices.list", labelnum=None, patch_size=None,
                    cases_limit=None) -> dict:
    """Check an ACDC root and one of its lists: a slice list (entries ``<volume>_slice_<k>``, files under
    ``data/slices/``) or a volume list (``patientXXX_frameYY``, files under ``data/``). ``labelnum`` is the
    number of labeled patients (``--labelnum``)."""
    root = _check_root(root, "ACDC", "data/, data/slices/ and lists such as train_slices.list")
    list_path = _resolve_list(root, list_name_or_path)
    names = _read_names(list_path)
    patch = _check_patch(patch_size, 2)
    slices = _is_slice_list(names)
    if not slices and any("_slice_" in n for n in names):
        raise DataError(f"{list_path}: mixes slice entries (*_slice_<k>) and volume entries")
    patients = [data_acdc.patient_of(n) for n in names]
    warnings = []
    n_labeled = None
    if labelnum is not None:
        if slices:
            try:
                n_labeled = data_acdc.labeled_slice_count(labelnum)
            except ValueError as exc:
                raise DataError(str(exc)) from None
            if n_labeled > len(names):
                raise DataError(f"--labelnum {labelnum} needs the first {n_labeled} slices labeled, but "
                                f"{list_path} has only {len(names)}")
            got = len(set(patients[:n_labeled]))
            if got != labelnum:
                warnings.append(f"the first {n_labeled} slices of {list_path.name} come from {got} "
                                f"patients, not {labelnum}")
            elif n_labeled < len(names) and patients[n_labeled] in set(patients[:n_labeled]):
                warnings.append(f"the labeled/unlabeled split of {list_path.name} at slice {n_labeled} "
                                f"cuts patient {patients[n_labeled]}")
        else:
            labelnum = _check_int_flag(labelnum, "--labelnum")
            n_patients = len(dict.fromkeys(patients))
            if labelnum > n_patients:
                raise DataError(f"--labelnum {labelnum} is larger than the {n_patients} patients of {list_path}")
    if slices:
        paths = [data_acdc.acdc_slice_path(root, n) for n in names]
    else:
        paths = [data_acdc.acdc_volume_path(root, n) for n in names]
    cases = _files_checked(paths, cases_limit, ndim=2 if slices else 3, n_classes=ACDC_CLASSES,
                           unit_range=True)
    for name, c in zip(names, cases):
        c["name"] = name
    info = _summarise("acdc", root, list_path, "slices" if slices else "volumes", names, cases,
                      ACDC_CLASSES)
    info.update(labelnum=labelnum, n_labeled=n_labeled, n_patients=len(dict.fromkeys(patients)))
    info["warnings"].extend(warnings)
    if patch is not None:
        info["patch_size"] = patch
    return info
