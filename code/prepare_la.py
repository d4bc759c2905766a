"""Convert the 2018 Atrial Segmentation Challenge training set to the UA-MT h5 layout.

Input (``--raw_dir``): one folder per case, ``<raw_dir>/<case>/lgemri.nrrd`` (the LGE-MRI volume) and
``<raw_dir>/<case>/laendo.nrrd`` (the left-atrium cavity label, values {0, 255}; {0, 1} is accepted too).

Output (``--out_dir``)::

    <out_dir>/2018LA_Seg_Training Set/<case>/mri_norm2.h5   image float32 (X, Y, Z), label uint8 {0, 1}
    <out_dir>/train.list, <out_dir>/test.list                case names, sorted, one per line
    <out_dir>/prepare_la.json                                the arguments used

Axes are kept as pynrrd returns them (``index_order='F'``), i.e. ``(X, Y, Z)`` with z last, e.g. 199 x 143 x 88.

Preprocessing (the UA-MT convention, checked against UA-MT's ``dataloaders/la_heart_processing.py`` and
against the published h5 files):

* Intensity: z-score ``(x - mean) / std`` over the **whole, uncropped** volume, computed before the crop
  (``--norm volume``, the default). The published files therefore do not have mean 0 / std 1 over the stored
  crop (e.g. mean 1.46, std 1.65). ``--norm crop`` z-scores over the stored crop instead.
* Crop: around the bounding box of the **label**, in x and y only; z keeps all slices (every published
  volume has the full 88 slices). On each side of each cropped axis the crop keeps ``m + p`` voxels beyond
  the box (clipped to the volume), where ``m`` is drawn uniformly from the inclusive range ``--margin_xy LO HI``
  (default 10 19, UA-MT's ``randint(10, 20)``) and ``p = max(P - (max - min), 0) // 2`` widens small boxes
  towards the patch size ``P`` of ``--pad_to`` (default 112 112 80). ``--crop_z`` also crops z, with
  ``--margin_z LO HI`` (default 5 9) and the z entry of ``--pad_to``. UA-MT draws ``m`` from the global,
  unseeded numpy RNG; here it comes from a generator seeded by ``(--seed, case name)``, so a run is
  reproducible. Small difference: UA-MT's upper bound is an exclusive slice end at ``max + m + p``, which keeps
  one voxel less on the far side (9..18 in the published data); here both sides keep ``m + p`` voxels.
  A fixed margin is ``--margin_xy 25 25``; with ``--pad_to 0 0 0`` the crop is exactly box +/- margin.

  THIS CROP USES THE LABEL, so it leaks the position of the atrium into the test images as well. It is the
  lineage's convention (UA-MT, SASSNet, DTC, MC-Net, SS-Net, CrossMatch all evaluate on these crops) and is
  kept for comparability of the numbers, not because it is sound.

Split: ``--test_cases FILE`` (one case name per line) or a seeded shuffle taking ``--n_test`` (default 20)
cases for ``test.list``; the rest go to ``train.list``. The published UA-MT lists are not derivable from a
seed; pass them with ``--test_cases`` to reproduce them.

Run: ``python code/prepare_la.py --raw_dir "<...>/Training Set" --out_dir data/LA``.
"""
from __future__ import annotations

import json
import os
import sys
import zlib
from pathlib import Path

import numpy as np
from utils.run import ArgumentParser

IMAGE_NAME = "lgemri.nrrd"
LABEL_NAME = "laendo.nrrd"
CASES_DIR = "2018LA_Seg_Training Set"
H5_NAME = "mri_norm2.h5"


class PrepareError(Exception):
    """A problem with the input data or arguments; the message names the file and the problem."""


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--raw_dir", required=True, help="folder with one <case>/ folder per case")
    p.add_argument("--out_dir", required=True, help="output root (gets '2018LA_Seg_Training Set/' and the lists)")
    split = p.add_mutually_exclusive_group()
    split.add_argument("--test_cases", default=None, help="file with the test case names, one per line")
    split.add_argument("--n_test", type=int, default=20, help="number of test cases of the seeded split")
    p.add_argument("--seed", type=int, default=1337, help="seed of the split and of the random margins")
    p.add_argument("--margin_xy", type=int, nargs=2, default=[10, 19], metavar=("LO", "HI"),
                   help="x/y margin in voxels, drawn per side from the inclusive range [LO, HI]")
    p.add_argument("--margin_z", type=int, nargs=2, default=[5, 9], metavar=("LO", "HI"),
                   help="z margin range, used only with --crop_z")
    p.add_argument("--pad_to", type=int, nargs=3, default=[112, 112, 80], metavar=("PX", "PY", "PZ"),
                   help="widen boxes smaller than this by (P - extent) // 2 per side; 0 0 0 disables")
    p.add_argument("--crop_z", action="store_true", help="also crop z (UA-MT keeps all z slices)")
    p.add_argument("--norm", choices=["volume", "crop"], default="volume",
                   help="z-score over the whole volume before cropping (UA-MT) or over the crop")
    p.add_argument("--compression", choices=["gzip", "none"], default="gzip", help="h5 dataset compression")
    args = p.parse_args(argv)
    for name in ("margin_xy", "margin_z"):
        lo, hi = getattr(args, name)
        if lo < 0 or hi < lo:
            p.error(f"--{name} needs 0 <= LO <= HI, got {lo} {hi}")
    if any(v < 0 for v in args.pad_to):
        p.error(f"--pad_to must be >= 0, got {args.pad_to}")
    if args.n_test < 0:
        p.error(f"--n_test must be >= 0, got {args.n_test}")
    return args


def find_cases(raw_dir: Path) -> list[str]:
    """Every sub-folder of raw_dir is a case; sorted names."""
    if not raw_dir.is_dir():
        raise PrepareError(f"{raw_dir}: raw folder does not exist")
    cases = sorted(d.name for d in raw_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not cases:
        raise PrepareError(f"{raw_dir}: no case folders found")
    return cases


def _read_nrrd(path: Path) -> np.ndarray:
    import nrrd

    if not path.is_file():
        raise PrepareError(f"{path}: missing file")
    try:
        data, _ = nrrd.read(str(path))  # index_order='F': (X, Y, Z)
    except Exception as e:  # pynrrd raises several types for broken files
        raise PrepareError(f"{path}: cannot read nrrd ({e})") from e
    if data.ndim != 3:
        raise PrepareError(f"{path}: expected a 3-D volume, got shape {data.shape}")
    return data


def read_case(case_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Image (float64, X Y Z) and binary label (uint8 {0,1}) of one raw case; checks shapes and values."""
    img_path, lab_path = case_dir / IMAGE_NAME, case_dir / LABEL_NAME
    for path in (img_path, lab_path):
        if not path.is_file():
            raise PrepareError(f"{path}: missing file")
    image = _read_nrrd(img_path).astype(np.float64)
    label = _read_nrrd(lab_path)
    if image.shape != label.shape:
        raise PrepareError(f"{lab_path}: label shape {label.shape} != image shape {image.shape} ({img_path})")
    values = np.unique(label)
    if set(values.tolist()) <= {0, 255}:
        binary = label == 255
    elif set(values.tolist()) <= {0, 1}:
        binary = label == 1
    else:
        shown = values[:10].tolist()
        raise PrepareError(f"{lab_path}: label values {shown} are not in {{0, 255}} (or {{0, 1}})")
    if not binary.any():
        raise PrepareError(f"{lab_path}: empty label, the crop needs a foreground bounding box")
    if not np.isfinite(image).all():
        raise PrepareError(f"{img_path}: image has non-finite values")
    return image, binary.astype(np.uint8)


def case_rng(seed: int, case: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(case.encode("utf-8"))])


def crop_box(label: np.ndarray, margin_xy, margin_z, pad_to, crop_z: bool, rng) -> tuple[slice, slice, slice]:
    """Slices (x, y, z) of the crop around the label's bounding box (see the module docstring)."""
    nz = np.nonzero(label)
    box = []
    for axis in range(3):
        size = label.shape[axis]
        if axis == 2 and not crop_z:
            box.append(slice(0, size))
            continue
        lo_m, hi_m = margin_xy if axis < 2 else margin_z
        amin, amax = int(nz[axis].min()), int(nz[axis].max())
        pad = max(pad_to[axis] - (amax - amin), 0) // 2
        m_lo, m_hi = (int(v) for v in rng.integers(lo_m, hi_m + 1, size=2))
        start = max(amin - m_lo - pad, 0)
        stop = min(amax + 1 + m_hi + pad, size)
        box.append(slice(start, stop))
    return tuple(box)


def zscore(x: np.ndarray) -> np.ndarray:
    std = float(x.std())
    if not std > 0:
        raise PrepareError("constant image, cannot z-score")
    return (x - float(x.mean())) / std


def write_h5(path: Path, arrays: dict, compression: str) -> None:
    """Write datasets atomically (temporary name, then rename)."""
    import h5py

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    kw = {"compression": "gzip"} if compression == "gzip" else {}
    with h5py.File(tmp, "w") as f:
        for key, arr in arrays.items():
            f.create_dataset(key, data=arr, **kw)
    os.replace(tmp, path)


def convert_case(raw_dir: Path, out_cases: Path, case: str, args) -> tuple[tuple[int, ...], tuple[slice, ...]]:
    image, label = read_case(raw_dir / case)
    box = crop_box(label, args.margin_xy, args.margin_z, args.pad_to, args.crop_z, case_rng(args.seed, case))
    try:
        if args.norm == "volume":
            image = zscore(image)[box]
        else:
            image = zscore(image[box])
    except PrepareError as e:
        raise PrepareError(f"{raw_dir / case / IMAGE_NAME}: {e}") from None
    write_h5(out_cases / case / H5_NAME,
             {"image": image.astype(np.float32), "label": np.ascontiguousarray(label[box])}, args.compression)
    return image.shape, box


def read_names(path: Path) -> list[str]:
    if not path.is_file():
        raise PrepareError(f"{path}: missing file")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def split_cases(cases: list[str], test_cases: str | None, n_test: int, seed: int) -> tuple[list[str], list[str]]:
    if test_cases is not None:
        test = read_names(Path(test_cases))
        unknown = [c for c in test if c not in set(cases)]
        if unknown:
            raise PrepareError(f"{test_cases}: cases not in the raw folder: {unknown[:5]}")
        if len(set(test)) != len(test):
            raise PrepareError(f"{test_cases}: duplicate case names")
    else:
        if n_test > len(cases):
            raise PrepareError(f"--n_test {n_test} > number of cases {len(cases)}")
        order = np.random.default_rng(seed).permutation(len(cases))
        test = [cases[i] for i in order[:n_test]]
    test_set = set(test)
    return sorted(c for c in cases if c not in test_set), sorted(test)


def write_list(path: Path, names: list[str]) -> None:
    path.write_text("".join(f"{n}\n" for n in names))


def main(argv=None):
    args = parse_args(argv)
    raw_dir, out_dir = Path(args.raw_dir), Path(args.out_dir)
    cases = find_cases(raw_dir)
    train, test = split_cases(cases, args.test_cases, args.n_test, args.seed)
    out_cases = out_dir / CASES_DIR
    for i, case in enumerate(cases):
        shape, box = convert_case(raw_dir, out_cases, case, args)
        crop = ", ".join(f"{s.start}:{s.stop}" for s in box)
        print(f"[{i + 1}/{len(cases)}] {case}: crop [{crop}] -> {shape}", flush=True)
    write_list(out_dir / "train.list", train)
    write_list(out_dir / "test.list", test)
    (out_dir / "prepare_la.json").write_text(json.dumps(vars(args), indent=2) + "\n")
    print(f"{len(train)} train / {len(test)} test cases -> {out_dir}")
    return train, test


if __name__ == "__main__":
    try:
        main()
    except PrepareError as e:
        sys.exit(f"prepare_la: error: {e}")
