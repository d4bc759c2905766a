"""LA (left atrium, UA-MT preprocessing) data: case lists, h5 reading and the training dataset.

Layout: ``<root>/train.list`` (one case id per line) and
``<root>/2018LA_Seg_Training Set/<case>/mri_norm2.h5`` holding ``image`` (float32, z-scored, (X, Y, Z))
and ``label`` (uint8, {0, 1}). The labeled cases are the first ``labeled_count`` of the list.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from utils.augment import strong_3d, weak_3d
from utils.sampler import collate_two_stream  # noqa: F401  (re-exported: one collate for both tasks)

__all__ = ["LA_CASE_DIR", "LA_CASE_FILE", "read_list", "la_case_path", "read_h5_arrays", "load_case",
           "LADataset", "collate_two_stream", "data_error", "parse_item", "augment_streams"]

LA_CASE_DIR = "2018LA_Seg_Training Set"
LA_CASE_FILE = "mri_norm2.h5"


def data_error(message: str) -> Exception:
    # imported lazily: utils.checks imports this module
    from utils.checks import DataError
    return DataError(message)


def read_list(path) -> list[str]:
    """Lines of a list file, stripped, blank lines skipped."""
    path = Path(path)
    if not path.is_file():
        raise data_error(f"list file not found: {path}")
    with open(path, "r", encoding="utf-8") as fh:
        return [line.strip() for line in fh if line.strip()]


def la_case_path(root, case: str) -> Path:
    return Path(root) / LA_CASE_DIR / case / LA_CASE_FILE


def read_h5_arrays(path, names: Sequence[str] = ("image", "label")) -> tuple[np.ndarray, ...]:
    """Read datasets ``names`` of an h5 file exactly as stored; a problem raises DataError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise data_error(f"h5 file not found: {path}")
    try:
        h5 = h5py.File(path, "r")
    except OSError as exc:
        raise data_error(f"{path}: cannot open as h5 ({exc})") from exc
    with h5:
        missing = [n for n in names if not isinstance(h5.get(n), h5py.Dataset)]
        if missing:
            raise data_error(f"{path}: missing dataset(s) {missing}; expected {list(names)}, "
                              f"found {sorted(h5.keys())}")
        return tuple(h5[n][()] for n in names)


def load_case(path) -> tuple[np.ndarray, np.ndarray]:
    """``(image, label)`` of one LA h5 file, exactly as stored (float32, uint8)."""
    image, label = read_h5_arrays(path, ("image", "label"))
    if image.ndim != 3 or image.shape != label.shape:
        raise data_error(f"{path}: expected 3D image and label of equal shape, got image {image.shape} "
                          f"and label {label.shape}")
    return image, label


def parse_item(item) -> tuple[int, int]:
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return int(item[0]), int(item[1])
    if isinstance(item, (int, np.integer)):
        # plain index: deterministic augmentation seeded by the index itself
        return int(item), int(item)
    raise TypeError(f"dataset item must be an (index, aug_seed) pair or an int, got {item!r}")


def augment_streams(ss: np.random.SeedSequence):
    """The three generators of one sample: weak view, strong view 1, strong view 2."""
    return [np.random.default_rng(child) for child in ss.spawn(3)]


class LADataset(Dataset):
    """LA training volumes. ``dataset[(index, aug_seed)]``:

    * ``index < labeled_count``: ``dict(kind='l', index, image (1,x,y,z) float32, label (x,y,z) int64)``,
      the weak view (rot90 + flip + crop) of image and label;
    * otherwise ``dict(kind='u', index, image_w, image_s1, image_s2)``, each ``(1,x,y,z)`` float32:
      the weak crop (label discarded) and two independent strong views of it.

    All random choices come from ``SeedSequence(aug_seed)``. With ``cache=True`` every volume is read
    once at construction (labels of unlabeled cases are not kept); otherwise read per access.
    """

    def __init__(self, root, cases: Sequence[str], labeled_count: int, patch_size: Sequence[int],
                 cache: bool = True):
        self.root = Path(root)
        self.cases = list(cases)
        if not 0 <= int(labeled_count) <= len(self.cases):
            raise ValueError(f"labeled_count {labeled_count} must be within 0..{len(self.cases)} "
                             f"(number of cases)")
        self.labeled_count = int(labeled_count)
        self.patch_size = tuple(int(p) for p in patch_size)
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"patch_size must be 3 positive ints, got {patch_size}")
        self.paths = [la_case_path(self.root, c) for c in self.cases]
        self.cache = bool(cache)
        self._images: list[np.ndarray] | None = None
        self._labels: list[np.ndarray | None] | None = None
        if self.cache:
            self._images, self._labels = [], []
            for i in range(len(self.cases)):
                image, label = self._read(i)
                self._images.append(image)
                self._labels.append(label)

    @property
    def labeled_idxs(self) -> list[int]:
        return list(range(self.labeled_count))

    @property
    def unlabeled_idxs(self) -> list[int]:
        return list(range(self.labeled_count, len(self.cases)))

    def __len__(self) -> int:
        return len(self.cases)

    def _read(self, index: int):
        image, label = load_case(self.paths[index])
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
        if not 0 <= index < len(self.cases):
            raise IndexError(f"index {index} out of range for {len(self.cases)} cases")
        image, label = self._get(index)
        rng_w, rng_s1, rng_s2 = augment_streams(np.random.SeedSequence(seed))
        if index < self.labeled_count:
            x, y = weak_3d(image, label, self.patch_size, rng_w)
            return {"kind": "l", "index": index, "image": torch.from_numpy(x)[None],
                    "label": torch.from_numpy(y.astype(np.int64))}
        x_w, _ = weak_3d(image, None, self.patch_size, rng_w)
        x_s1 = strong_3d(x_w, rng_s1)
        x_s2 = strong_3d(x_w, rng_s2)
        return {"kind": "u", "index": index, "image_w": torch.from_numpy(x_w)[None],
                "image_s1": torch.from_numpy(x_s1)[None], "image_s2": torch.from_numpy(x_s2)[None]}
