"""ACDC (SSL4MIS preprocessing) data: lists, paths, h5 reading and the 2D training dataset.

Layout under ``<root>``: ``data/<patientXXX_frameYY>.h5`` volumes (``image`` float in [0, 1] of shape
(D, H, W), ``label`` uint8 in 0..3), ``data/slices/<volume>_slice_<k>.h5`` with slice k = volume[k - 1]
(k from 1), and the lists ``train_slices.list``, ``train.list``, ``val.list``, ``test.list``.
The labeled slices are the first ``labeled_slice_count(labelnum)`` of ``train_slices.list``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from utils.augment import strong_2d, weak_2d
from utils.data_la import data_error, augment_streams, parse_item, read_h5_arrays, read_list  # noqa: F401
from utils.sampler import collate_two_stream  # noqa: F401  (re-exported: one collate for both tasks)

__all__ = ["NUM_CLASSES", "LABELED_SLICES", "labeled_slice_count", "slices_of_first_patients",
           "acdc_volume_path", "acdc_slice_path",
           "patient_of", "load_volume", "load_slice", "ACDCSlices", "read_list", "collate_two_stream"]

NUM_CLASSES = 4

# labeled patients -> labeled slices (first M of train_slices.list), SPEC.md section 3
LABELED_SLICES = {1: 32, 3: 68, 7: 136, 14: 256, 21: 396, 28: 512, 35: 664, 70: 1312}


def labeled_slice_count(labelnum: int) -> int:
    """Number of labeled slices for ``--labelnum`` labeled patients."""
    if isinstance(labelnum, bool) or not isinstance(labelnum, (int, np.integer)) \
            or int(labelnum) not in LABELED_SLICES:
        allowed = ", ".join(str(k) for k in LABELED_SLICES)
        raise ValueError(f"--labelnum {labelnum!r} is not an ACDC labeled-patient count; allowed: {allowed}")
    return LABELED_SLICES[int(labelnum)]


def slices_of_first_patients(slice_names: Sequence[str], n_patients: int) -> int:
    """Length of the leading run of ``slice_names`` that covers the first ``n_patients`` distinct patients
    (for data sets other than the real ACDC list, e.g. the synthetic demo; on the real
    ``train_slices.list`` it equals ``labeled_slice_count``)."""
    seen: list[str] = []
    for i, name in enumerate(slice_names):
        p = patient_of(name)
        if p not in seen:
            if len(seen) == n_patients:
                return i
            seen.append(p)
    if len(seen) < n_patients:
        raise ValueError(f"--labelnum {n_patients}: the slice list has only {len(seen)} patients")
    return len(slice_names)


def acdc_volume_path(root, name: str) -> Path:
    return Path(root) / "data" / f"{name}.h5"


def acdc_slice_path(root, name: str) -> Path:
    return Path(root) / "data" / "slices" / f"{name}.h5"


def patient_of(name: str) -> str:
    """``patient001_frame01_slice_3`` -> ``patient001``."""
    return name.split("_", 1)[0]


def load_volume(path) -> tuple[np.ndarray, np.ndarray]:
    """``(image (D,H,W), label (D,H,W))`` of one ACDC volume, exactly as stored."""
    image, label = read_h5_arrays(path, ("image", "label"))
    if image.ndim != 3 or image.shape != label.shape:
        raise data_error(f"{path}: expected 3D image and label of equal shape, got image {image.shape} "
                          f"and label {label.shape}")
    return image, label


def load_slice(path) -> tuple[np.ndarray, np.ndarray]:
    """``(image (H,W), label (H,W))`` of one ACDC slice, exactly as stored."""
    image, label = read_h5_arrays(path, ("image", "label"))
    if image.ndim != 2 or image.shape != label.shape:
        raise data_error(f"{path}: expected 2D image and label of equal shape, got image {image.shape} "
                          f"and label {label.shape}")
    return image, label


class ACDCSlices(Dataset):
    """ACDC training slices. ``dataset[(index, aug_seed)]``:

    * ``index < labeled_count``: ``dict(kind='l', index, image (1,H,W) float32, label (H,W) int64)``;
    * otherwise ``dict(kind='u', index, image_w, image_s1, image_s2)``, each ``(1,H,W)`` float32.

    (H, W) = ``patch_size`` (zoom). Images are held as float32 (cache or not, so both paths agree).
    """

    def __init__(self, root, slice_names: Sequence[str], labeled_count: int,
                 patch_size: Sequence[int] = (256, 256), cache: bool = True):
        self.root = Path(root)
        self.names = list(slice_names)
        if not 0 <= int(labeled_count) <= len(self.names):
            raise ValueError(f"labeled_count {labeled_count} must be within 0..{len(self.names)} "
                             f"(number of slices)")
        self.labeled_count = int(labeled_count)
        self.patch_size = tuple(int(p) for p in patch_size)
        if len(self.patch_size) != 2 or min(self.patch_size) < 1:
            raise ValueError(f"patch_size must be 2 positive ints, got {patch_size}")
        self.paths = [acdc_slice_path(self.root, n) for n in self.names]
        self.cache = bool(cache)
        self._images = self._labels = None
        if self.cache:
            pairs = [self._read(i) for i in range(len(self.names))]
            self._images = [p[0] for p in pairs]
            self._labels = [p[1] for p in pairs]

    @property
    def labeled_idxs(self) -> list[int]:
        return list(range(self.labeled_count))

    @property
    def unlabeled_idxs(self) -> list[int]:
        return list(range(self.labeled_count, len(self.names)))

    def __len__(self) -> int:
        return len(self.names)

    def _read(self, index: int):
        image, label = load_slice(self.paths[index])
        image = np.ascontiguousarray(image, dtype=np.float32)
        if index >= self.labeled_count:
            return image, None
        return image, np.ascontiguousarray(label, dtype=np.uint8)

    def _get(self, index: int):
        if self._images is not None:
            return self._images[index], self._labels[index]
        return self._read(index)

    def __getitem__(self, item) -> dict:
        index, seed = parse_item(item)
        if not 0 <= index < len(self.names):
            raise IndexError(f"index {index} out of range for {len(self.names)} slices")
        image, label = self._get(index)
        rng_w, rng_s1, rng_s2 = augment_streams(np.random.SeedSequence(seed))
        if index < self.labeled_count:
            x, y = weak_2d(image, label, self.patch_size, rng_w)
            return {"kind": "l", "index": index, "image": torch.from_numpy(x)[None],
                    "label": torch.from_numpy(y.astype(np.int64))}
        x_w, _ = weak_2d(image, None, self.patch_size, rng_w)
        x_s1 = strong_2d(x_w, rng_s1)
        x_s2 = strong_2d(x_w, rng_s2)
        return {"kind": "u", "index": index, "image_w": torch.from_numpy(x_w)[None],
                "image_s1": torch.from_numpy(x_s1)[None], "image_s2": torch.from_numpy(x_s2)[None]}
