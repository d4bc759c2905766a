"""The LA and ACDC data on disk: list files, h5 cases, their checks, and the training set.

LA (UA-MT preprocessing): ``<root>/train.list``, ``<root>/test.list`` and
``<root>/2018LA_Seg_Training Set/<case>/mri_norm2.h5`` with ``image`` (float32, z-scored, (X, Y, Z)) and
``label`` (uint8, {0, 1}). The labeled cases are the first ``--labelnum`` of the training list. Other 3D data sets
(BraTS2019, Pancreas-CT, a user's own) differ in their ``Layout``: where a case's file lies and how many classes its
labels hold (utils/datasets.py reads it from the data set's description).

ACDC (SSL4MIS preprocessing): ``<root>/data/<patientXXX_frameYY>.h5`` volumes (``image`` in [0, 1], (D, H, W);
``label`` 0 bg, 1 RV, 2 Myo, 3 LV) and ``<root>/data/slices/<volume>_slice_<k>.h5`` with slice k = volume[k - 1];
lists ``train_slices.list``, ``val.list``, ``test.list``. The labeled slices are the first
``LABELED_SLICES[--labelnum]`` of ``train_slices.list``.

Every problem raises ``DataError`` with one line naming the file and what was expected.
"""
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from utils import resolve
from utils.augment import strong_2d, strong_3d, weak_2d, weak_3d

N_CLASSES = {"la": 2, "acdc": 4}
# labeled ACDC patients -> labeled slices (the first M of train_slices.list)
LABELED_SLICES = {1: 32, 3: 68, 7: 136, 14: 256, 21: 396, 28: 512, 35: 664, 70: 1312}
# LA images are z-scored per volume (UA-MT preprocessing: (image - mean) / std, then cropped around the atrium): the
# 100 published images lie within [-1.017, 17.11] (docs/RELIABILITY.md, issue 22). A value beyond +-100, 100 standard
# deviations from its volume's mean and six times the largest published one, is not a z-scored intensity (raw
# scanner values, a wrong scale, 3e38).
LA_BOUND = 100.0


class DataError(Exception):
    """A problem with the data on disk or with a data-related flag."""


@dataclass(frozen=True)
class Layout:
    """Where a 3D data set's cases lie inside its root and what their labels hold (the default: LA's)."""
    case_file: str = "2018LA_Seg_Training Set/{case}/mri_norm2.h5"  # {case} = a list entry
    n_classes: int = 2
    float_labels: bool = False  # labels stored as floats with integer values (Pancreas-CT as distributed)


LA_LAYOUT = Layout()


# ------------------------------------------------------------------------------------------------ lists
def find_list(root, name) -> Path:
    """A list given as a name inside the data root (``test.list``) or as a path."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data root {root}: no such folder (pass --root_path)")
    for candidate in (root / name, resolve(name)):
        if candidate.is_file():
            return candidate
    folder = next((c for c in (root / name, resolve(name)) if c.is_dir()), None)
    if folder is not None:
        raise DataError(f"list {name}: {folder} is a folder, expected a list file (one case per line)")
    raise DataError(f"list {name}: neither {root / name} nor {resolve(name)} exists")


def read_list(path) -> list:
    """The entries of a list file, one per line (blank lines and a UTF-8 BOM ignored); refuses an empty list
    and repeated entries."""
    path = Path(path)
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"list {path}: cannot be read as a text list ({e})") from None
    if not names:
        raise DataError(f"list {path}: empty (expected one entry per line)")
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise DataError(f"list {path}: entry {twice!r} appears more than once")
    return names


# -------------------------------------------------------------------------------------------- h5 files
def case_path(task: str, root, name: str, layout: Layout = None) -> Path:
    """The h5 file of a list entry: a 3D case (``layout``, default LA's), an ACDC volume, or an ACDC slice
    (``*_slice_<k>``)."""
    root = Path(root)
    if task == "la":
        return root / (layout or LA_LAYOUT).case_file.format(case=name)
    return root / "data" / ("slices" if "_slice_" in name else "") / f"{name}.h5"


def read_h5(path, names=("image", "label")) -> tuple:
    """The datasets ``names`` of an h5 file, as stored. Any failure (missing file, damaged header or chunk)
    raises DataError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"case file not found: {path}")
    try:
        with h5py.File(path, "r") as h5:
            missing = [n for n in names if not isinstance(h5.get(n), h5py.Dataset)]
            if missing:
                raise DataError(f"{path}: no {' or '.join(map(repr, missing))} dataset (expected {list(names)}, "
                                f"found {sorted(h5.keys())})")
            return tuple(h5[n][()] for n in names)
    except DataError:
        raise
    except Exception as e:  # h5py raises OSError, RuntimeError, KeyError, ValueError on damaged files
        raise DataError(f"{path}: unreadable h5 file ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None


def write_h5(path, **arrays) -> None:
    """Write arrays as datasets of a new h5 file (through a temporary file, renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as h5:
        for key, value in arrays.items():
            h5.create_dataset(key, data=value)
    tmp.replace(path)


def check_case(path, image, label, ndim: int, n_classes: int, unit_range: bool = False,
               float_labels: bool = False) -> None:
    """The checks every case passes before it is trained on or scored (DataError naming the file): shapes, dtypes,
    finite intensities with some spread, within [0, 1] (``unit_range``, ACDC) or within +-LA_BOUND (z-scored, LA),
    labels within the classes. ``float_labels``: a float label is accepted when its values are whole numbers."""
    if image.ndim != ndim or image.shape != label.shape or min(image.shape) < 1:
        raise DataError(f"{path}: image {image.shape} and label {label.shape}, expected two equal {ndim}D shapes")
    whole_floats = float_labels and label.dtype.kind == "f" and bool(np.all(label == np.round(label)))
    if image.dtype.kind != "f" or not (label.dtype.kind in "iu" or whole_floats):
        raise DataError(f"{path}: image {image.dtype} and label {label.dtype}, expected a float image and an "
                        f"integer label" + (" (or whole numbers stored as floats)" if float_labels else ""))
    bad = int(np.size(image) - np.count_nonzero(np.isfinite(image)))
    if bad:
        raise DataError(f"{path}: image has {bad} non-finite values (NaN/inf), expected finite intensities")
    lo, hi = float(image.min()), float(image.max())
    if lo == hi:
        raise DataError(f"{path}: image of one value ({lo:.4g}) everywhere, expected intensities that vary")
    if unit_range and (lo < -1e-6 or hi > 1 + 1e-6):
        raise DataError(f"{path}: image intensities in [{lo:.4g}, {hi:.4g}], expected [0, 1]")
    if not unit_range and max(-lo, hi) > LA_BOUND:
        raise DataError(f"{path}: image intensities in [{lo:.4g}, {hi:.4g}], expected z-scored values within "
                        f"+-{LA_BOUND:g} (the 100 published LA images lie within [-1.02, 17.11])")
    if label.min() < 0 or label.max() >= n_classes:
        values = np.unique(label[(label < 0) | (label >= n_classes)])[:5].tolist()
        raise DataError(f"{path}: label values {values} outside the classes 0..{n_classes - 1}")


def load_case(task: str, root, name: str, layout: Layout = None) -> tuple:
    """``(image, label)`` of one list entry, read and checked (ACDC: intensities within [0, 1]; 3D: the classes and
    label type of ``layout``, default LA's; a float label with whole values comes back as uint8)."""
    path = case_path(task, root, name, layout)
    image, label = read_h5(path)
    ndim = 2 if "_slice_" in name else 3
    layout = layout or LA_LAYOUT
    n_classes = layout.n_classes if task == "la" else N_CLASSES[task]
    check_case(path, image, label, ndim, n_classes, unit_range=task == "acdc",
               float_labels=task == "la" and layout.float_labels)
    return image, (label.astype(np.uint8) if label.dtype.kind == "f" else label)


def check_acdc_slice(root, name: str, image, label, volumes: dict) -> None:
    """An ACDC slice ``<volume>_slice_<k>`` must equal slice k - 1 of its volume, image and label (the SSL4MIS
    preprocessing cut them from it). ``volumes`` keeps the last volume read: a list's slices come volume by volume,
    so each volume is read once."""
    volume, k = name.rsplit("_slice_", 1)
    if volume not in volumes:
        volumes.clear()
        try:
            volumes[volume] = load_case("acdc", root, volume)
        except DataError as e:
            raise DataError(f"{e} (the volume of slice {name}, which is compared with it)") from None
    v_image, v_label = volumes[volume]
    if not (k.isdigit() and 1 <= int(k) <= len(v_image)):
        raise DataError(f"slice {name} ({case_path('acdc', root, name)}): volume {volume} has {len(v_image)} slices, "
                        f"expected a slice number 1..{len(v_image)}")
    k = int(k)
    if not (np.array_equal(image, v_image[k - 1]) and np.array_equal(label, v_label[k - 1])):
        raise DataError(f"slice {name} ({case_path('acdc', root, name)}) does not equal slice {k - 1} of volume "
                        f"{volume} ({case_path('acdc', root, volume)}), expected a copy of it")


def data_fingerprint(task: str, root, labeled: list, unlabeled: list, layout: Layout = None) -> dict:
    """What a checkpoint records of its training data, for --resume to compare: the labeled and the unlabeled
    entries in training order, and each case file's size in bytes (None for a missing file)."""
    paths = [case_path(task, root, name, layout) for name in [*labeled, *unlabeled]]
    return {"labeled": list(labeled), "unlabeled": list(unlabeled),
            "bytes": [p.stat().st_size if p.is_file() else None for p in paths]}


# ----------------------------------------------------------------------------------------- ACDC split
def patient_of(name: str) -> str:
    """``patient001_frame01_slice_3`` -> ``patient001``."""
    return name.split("_", 1)[0]


def acdc_labeled_slices(names: list, labelnum: int, list_name: str, need_unlabeled: bool = True) -> tuple:
    """``(number of labeled slices, warnings)`` for ``--labelnum`` labeled patients of a slice list."""
    if labelnum not in LABELED_SLICES:
        raise DataError(f"--labelnum {labelnum}: not an ACDC labeled-patient count; expected one of "
                        f"{', '.join(map(str, LABELED_SLICES))}")
    n = LABELED_SLICES[labelnum]
    if n > len(names) or (n == len(names) and need_unlabeled):
        raise DataError(f"--labelnum {labelnum} needs the first {n} slices labeled, {list_name} has {len(names)}"
                        + (", which leaves no unlabeled slice for CrossMatch" if n == len(names) else ""))
    patients = [patient_of(s) for s in names]
    got = len(set(patients[:n]))
    warnings = []
    if got != labelnum:
        warnings.append(f"the first {n} slices of {list_name} come from {got} patients, not {labelnum}")
    elif n < len(names) and patients[n] in patients[:n]:
        warnings.append(f"the labeled/unlabeled split of {list_name} at slice {n} cuts patient {patients[n]}")
    return n, warnings


# --------------------------------------------------------------------------------------- training set
class TrainSet(Dataset):
    """The training cases of a list, read and checked once, kept in memory; each ACDC slice is compared with its
    volume (check_acdc_slice: every volume read once more).

    ``dataset[(index, aug_seed, kind)]`` is, for kind 'l' (a labeled index), ``dict(kind, index, image
    (1, *patch), label (*patch) int64)``, the weak view of image and label; for kind 'u' (unlabeled) or 'p'
    (a CutMix partner) ``dict(kind, index, image_w, image_s1, image_s2)``, the weak view and two independent
    strong views of it. Every random choice comes from ``SeedSequence(aug_seed)`` (weak view, strong view 1,
    strong view 2: one child each). LA cases are randomly cropped to the patch (rot90 + flip first), ACDC slices
    zoomed to it. ``uint8_unlabeled`` rounds the unlabeled views to 8-bit values, as the release's ACDC image
    pipeline does (the weak view truncated, the strong views rounded).
    """

    def __init__(self, task: str, root, names, n_labeled: int, patch_size, uint8_unlabeled: bool = False,
                 layout: Layout = None):
        self.task, self.n_labeled, self.patch_size = task, n_labeled, tuple(patch_size)
        self.uint8_unlabeled = uint8_unlabeled
        self.weak, self.strong = (weak_3d, strong_3d) if task == "la" else (weak_2d, strong_2d)
        self.images, self.labels = [], []
        volumes = {}
        for i, name in enumerate(names):
            image, label = load_case(task, root, name, layout)
            if task == "acdc" and "_slice_" in name:
                check_acdc_slice(root, name, image, label, volumes)
            self.images.append(np.ascontiguousarray(image, dtype=np.float32))
            self.labels.append(np.ascontiguousarray(label, dtype=np.uint8) if i < n_labeled else None)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, item):
        index, seed, kind = item
        rng_w, rng_s1, rng_s2 = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3)]
        if kind == "l":
            x, y = self.weak(self.images[index], self.labels[index], self.patch_size, rng_w)
            return {"kind": kind, "index": index, "image": torch.from_numpy(x)[None],
                    "label": torch.from_numpy(y.astype(np.int64))}
        x_w, _ = self.weak(self.images[index], None, self.patch_size, rng_w)
        if self.uint8_unlabeled:
            x_w = np.floor(x_w * 255) / np.float32(255)
        views = [self.strong(x_w, rng) for rng in (rng_s1, rng_s2)]
        if self.uint8_unlabeled:
            views = [np.round(v * 255) / np.float32(255) for v in views]
        return {"kind": kind, "index": index, "image_w": torch.from_numpy(x_w)[None],
                "image_s1": torch.from_numpy(views[0])[None], "image_s2": torch.from_numpy(views[1])[None]}
