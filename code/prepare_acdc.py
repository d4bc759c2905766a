"""Convert the ACDC challenge NIfTI files to the SSL4MIS h5 layout.

Input (``--raw_dir``)::

    <raw_dir>/training/patientXXX/patientXXX_frameYY.nii.gz      (+ patientXXX_frameYY_gt.nii.gz)
    <raw_dir>/testing/patientXXX/...                              (only with --include_testing)

Output (``--out_dir``)::

    <out_dir>/data/patientXXX_frameNN.h5                 image float64 (D, H, W) in [0, 1], label uint8 0..3
    <out_dir>/data/slices/patientXXX_frameNN_slice_<k>.h5   k = 1..D, arrays = volume[k - 1] (training volumes)
    <out_dir>/train.list, val.list, test.list            volume names
    <out_dir>/train_slices.list                          slice names of the training volumes
    <out_dir>/prepare_acdc.json                          the arguments used

Conventions (checked against SSL4MIS's ``dataloaders/acdc_data_processing.py`` and the published h5 files):

* Axes: SSL4MIS reads with SimpleITK, whose arrays are ``(z, y, x)``, the full reverse of nibabel's
  ``(x, y, z)``. So the nibabel array is transposed with ``(2, 1, 0)`` (not ``(2, 0, 1)``): slices first,
  then the NIfTI's second axis, then its first (e.g. patient002: 10 x 256 x 232).
* Intensity: per-volume min-max ``(x - min) / (max - min)``, stored float64 (min 0, max 1 exactly).
* Slices are the volume's rows with the same dtype, so slice k equals ``volume[k - 1]`` exactly. (The
  published slices are a mix of float32 and float64 files; the values are the volume's.) Slice numbering
  starts at 1. Only training volumes get slices, as in the published data.
* Frame names: ACDC names the two annotated frames by their time index (e.g. frame01 = ED and frame12 = ES);
  the published data renames them frame01, frame02 in time order (frame01 has the larger LV for all 80
  published train/val patients, i.e. it is ED). That renaming is the default; ``--keep_frame_numbers`` keeps
  the original numbers.

Split: ``--split_dir DIR`` copies DIR's ``train.list`` and ``val.list`` (and ``test.list`` if present);
otherwise a seeded shuffle of the training patients gives ``--n_test_patients`` (20) test and
``--n_val_patients`` (10) validation patients, the rest (70) train; volume names are sorted in each list.
``train_slices.list`` follows ``train.list`` order with k ascending, except that an existing list with exactly
the same slice names (in ``--split_dir`` or in the output folder) is kept in its order, because the labeled
subset is "the first M slices".

Second mode: ``--from_volumes ROOT`` rebuilds ``data/slices/`` and ``train_slices.list`` from
``ROOT/data/*.h5`` and ``ROOT/train.list`` alone (into ``--out_dir``, default ROOT).

Run: ``python code/prepare_acdc.py --raw_dir <ACDC> --out_dir data/ACDC`` or
``python code/prepare_acdc.py --from_volumes data/ACDC``.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
from utils.run import ArgumentParser

FRAME_RE = re.compile(r"^(patient\d{3})_frame(\d{2})\.nii(\.gz)?$")
PATIENT_RE = re.compile(r"^patient\d{3}$")
N_CLASSES = 4


class PrepareError(Exception):
    """A problem with the input data or arguments; the message names the file and the problem."""


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--raw_dir", help="ACDC folder with training/ (and testing/)")
    mode.add_argument("--from_volumes", metavar="ROOT",
                      help="rebuild data/slices/ and train_slices.list from ROOT/data/*.h5 and ROOT/train.list")
    p.add_argument("--out_dir", default=None,
                   help="output root (required with --raw_dir; default ROOT with --from_volumes)")
    p.add_argument("--split_dir", default=None,
                   help="folder with train.list, val.list [, test.list, train_slices.list]")
    p.add_argument("--n_val_patients", type=int, default=10)
    p.add_argument("--n_test_patients", type=int, default=20)
    p.add_argument("--seed", type=int, default=1337, help="seed of the patient split")
    p.add_argument("--include_testing", action="store_true",
                   help="also convert testing/ (needs its _gt files); its volumes are in no list")
    p.add_argument("--keep_frame_numbers", action="store_true",
                   help="keep ACDC's frame numbers instead of renaming the annotated frames frame01, frame02")
    p.add_argument("--compression", choices=["gzip", "none"], default="gzip", help="h5 dataset compression")
    args = p.parse_args(argv)
    if args.raw_dir is not None and args.out_dir is None:
        p.error("--out_dir is required with --raw_dir")
    if args.from_volumes is not None and args.split_dir is not None:
        p.error("--split_dir only applies to --raw_dir")
    if args.n_val_patients < 0 or args.n_test_patients < 0:
        p.error("--n_val_patients and --n_test_patients must be >= 0")
    return args


# ---------------------------------------------------------------------------------------------- reading


def gt_path(image_path: Path) -> Path:
    name = image_path.name
    stem, ext = (name[:-7], ".nii.gz") if name.endswith(".nii.gz") else (name[:-4], ".nii")
    return image_path.with_name(f"{stem}_gt{ext}")


def find_volumes(raw_dir: Path, subset: str, keep_frame_numbers: bool) -> dict[str, tuple[Path, Path]]:
    """{output volume name: (image path, label path)} for raw_dir/subset/patientXXX/ folders."""
    root = raw_dir / subset
    if not root.is_dir():
        raise PrepareError(f"{root}: folder does not exist")
    volumes: dict[str, tuple[Path, Path]] = {}
    patients = sorted(d for d in root.iterdir() if d.is_dir() and PATIENT_RE.match(d.name))
    if not patients:
        raise PrepareError(f"{root}: no patientXXX folders found")
    for pdir in patients:
        frames = []
        for f in sorted(pdir.iterdir()):
            m = FRAME_RE.match(f.name)
            if m is None:
                continue
            if m.group(1) != pdir.name:
                raise PrepareError(f"{f}: file of {m.group(1)} inside {pdir.name}/")
            frames.append((int(m.group(2)), f))
        if not frames:
            raise PrepareError(f"{pdir}: no {pdir.name}_frameYY.nii.gz files")
        for i, (num, f) in enumerate(sorted(frames)):
            gt = gt_path(f)
            if not gt.is_file():
                raise PrepareError(f"{gt}: missing label file (for {f})")
            number = num if keep_frame_numbers else i + 1
            volumes[f"{pdir.name}_frame{number:02d}"] = (f, gt)
    return volumes


def _read_nifti(path: Path) -> np.ndarray:
    import nibabel as nib

    if not path.is_file():
        raise PrepareError(f"{path}: missing file")
    try:
        arr = np.asarray(nib.load(str(path)).dataobj)  # (x, y, z), scaling applied
    except Exception as e:
        raise PrepareError(f"{path}: cannot read NIfTI ({e})") from e
    if arr.ndim == 4 and arr.shape[3] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise PrepareError(f"{path}: expected a 3-D volume, got shape {arr.shape}")
    return arr


def read_volume(image_path: Path, label_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Min-max normalised image (float64) and label (uint8), both (D, H, W) = nibabel axes reversed."""
    image = _read_nifti(image_path).astype(np.float64)
    label = _read_nifti(label_path)
    if image.shape != label.shape:
        raise PrepareError(f"{label_path}: label shape {label.shape} != image shape {image.shape} ({image_path})")
    if not np.isfinite(image).all():
        raise PrepareError(f"{image_path}: image has non-finite values")
    lo, hi = float(image.min()), float(image.max())
    if not hi > lo:
        raise PrepareError(f"{image_path}: constant image, cannot min-max normalise")
    labf = label.astype(np.float64)
    if not (np.all(labf == np.round(labf)) and labf.min() >= 0 and labf.max() < N_CLASSES):
        raise PrepareError(f"{label_path}: label values {np.unique(label)[:10].tolist()} are not in 0..{N_CLASSES - 1}")
    image = (image - lo) / (hi - lo)
    image = np.ascontiguousarray(image.transpose(2, 1, 0))
    label = np.ascontiguousarray(label.astype(np.uint8).transpose(2, 1, 0))
    return image, label


def read_h5_volume(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import h5py

    if not path.is_file():
        raise PrepareError(f"{path}: missing file")
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("image", "label") if k not in f]
            if missing:
                raise PrepareError(f"{path}: missing dataset(s) {missing}")
            image, label = f["image"][()], f["label"][()]
    except OSError as e:
        raise PrepareError(f"{path}: cannot read h5 ({e})") from e
    if image.ndim != 3 or image.shape != label.shape:
        raise PrepareError(f"{path}: expected 3-D image and label of equal shape, got {image.shape} / {label.shape}")
    return image, label


def read_names(path: Path) -> list[str]:
    if not path.is_file():
        raise PrepareError(f"{path}: missing file")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------- writing


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


def write_list(path: Path, names: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{n}\n" for n in names))


def write_slices(data_dir: Path, name: str, image: np.ndarray, label: np.ndarray, compression: str) -> list[str]:
    """data_dir/slices/<name>_slice_<k>.h5 for k = 1..D with slice k = volume[k - 1]; returns the slice names."""
    names = []
    for k in range(1, image.shape[0] + 1):
        sname = f"{name}_slice_{k}"
        write_h5(data_dir / "slices" / f"{sname}.h5",
                 {"image": image[k - 1], "label": label[k - 1]}, compression)
        names.append(sname)
    return names


def finish_slice_list(out_path: Path, generated: list[str], candidates: list[Path]) -> str:
    """Write train_slices.list; an existing candidate list with exactly the same names keeps its order."""
    for cand in candidates:
        if cand.is_file():
            old = read_names(cand)
            if sorted(old) == sorted(generated) and len(set(old)) == len(old):
                if cand.resolve() != out_path.resolve():
                    write_list(out_path, old)
                return f"kept the order of {cand}"
            print(f"note: {cand} names other slices than the training volumes; writing a new list", flush=True)
    write_list(out_path, generated)
    return "train.list order, k ascending"


# ---------------------------------------------------------------------------------------------- split


def patient_of(volume: str) -> str:
    return volume.split("_frame")[0]


def seeded_split(volumes: list[str], n_val: int, n_test: int, seed: int) -> dict[str, list[str]]:
    patients = sorted({patient_of(v) for v in volumes})
    if n_val + n_test > len(patients):
        raise PrepareError(f"--n_val_patients {n_val} + --n_test_patients {n_test} > {len(patients)} patients")
    order = [patients[i] for i in np.random.default_rng(seed).permutation(len(patients))]
    test_p, val_p = set(order[:n_test]), set(order[n_test:n_test + n_val])
    out = {"train": [], "val": [], "test": []}
    for v in sorted(volumes):
        p = patient_of(v)
        out["test" if p in test_p else "val" if p in val_p else "train"].append(v)
    return out


def split_from_dir(split_dir: Path, volumes: set[str]) -> dict[str, list[str]]:
    out = {}
    for part in ("train", "val", "test"):
        path = split_dir / f"{part}.list"
        if part == "test" and not path.is_file():
            out[part] = []
            continue
        names = read_names(path)
        unknown = [n for n in names if n not in volumes]
        if unknown:
            raise PrepareError(f"{path}: volumes not found in the raw data: {unknown[:5]}")
        out[part] = names
    seen: dict[str, str] = {}
    for part, names in out.items():
        for p in {patient_of(n) for n in names}:
            if p in seen and seen[p] != part:
                raise PrepareError(f"{split_dir}: patient {p} is in both {seen[p]}.list and {part}.list")
            seen[p] = part
    return out


# ---------------------------------------------------------------------------------------------- modes


def prepare_from_raw(args) -> dict[str, list[str]]:
    raw_dir, out_dir = Path(args.raw_dir), Path(args.out_dir)
    volumes = find_volumes(raw_dir, "training", args.keep_frame_numbers)
    extra = find_volumes(raw_dir, "testing", args.keep_frame_numbers) if args.include_testing else {}
    clash = sorted(set(volumes) & set(extra))
    if clash:
        raise PrepareError(f"{raw_dir}: patients in both training/ and testing/: {clash[:5]}")
    if args.split_dir is not None:
        split = split_from_dir(Path(args.split_dir), set(volumes) | set(extra))
    else:
        split = seeded_split(list(volumes), args.n_val_patients, args.n_test_patients, args.seed)
    train = set(split["train"])
    data_dir = out_dir / "data"
    slices_of: dict[str, list[str]] = {}
    all_vols = {**volumes, **extra}
    for i, name in enumerate(sorted(all_vols)):
        image, label = read_volume(*all_vols[name])
        write_h5(data_dir / f"{name}.h5", {"image": image, "label": label}, args.compression)
        if name in train:
            slices_of[name] = write_slices(data_dir, name, image, label, args.compression)
        print(f"[{i + 1}/{len(all_vols)}] {name}: {image.shape}{' + slices' if name in train else ''}", flush=True)
    for part in ("train", "val", "test"):
        write_list(out_dir / f"{part}.list", split[part])
    generated = [s for v in split["train"] for s in slices_of[v]]
    cands = [Path(args.split_dir) / "train_slices.list"] if args.split_dir is not None else []
    how = finish_slice_list(out_dir / "train_slices.list", generated, cands)
    split["train_slices"] = read_names(out_dir / "train_slices.list")
    (out_dir / "prepare_acdc.json").write_text(json.dumps(vars(args), indent=2) + "\n")
    print(f"{len(split['train'])} train / {len(split['val'])} val / {len(split['test'])} test volumes, "
          f"{len(generated)} training slices ({how}) -> {out_dir}")
    return split


def slices_from_volumes(args) -> list[str]:
    root = Path(args.from_volumes)
    out_dir = Path(args.out_dir) if args.out_dir is not None else root
    train = read_names(root / "train.list")
    (out_dir / "data" / "slices").mkdir(parents=True, exist_ok=True)
    generated = []
    for name in train:
        image, label = read_h5_volume(root / "data" / f"{name}.h5")
        generated += write_slices(out_dir / "data", name, image, label, args.compression)
    if out_dir.resolve() != root.resolve():
        shutil.copyfile(root / "train.list", out_dir / "train.list")
    how = finish_slice_list(out_dir / "train_slices.list", generated,
                            [out_dir / "train_slices.list", root / "train_slices.list"])
    print(f"{len(generated)} slices of {len(train)} training volumes ({how}) -> {out_dir}")
    return read_names(out_dir / "train_slices.list")


def main(argv=None):
    args = parse_args(argv)
    if args.from_volumes is not None:
        return slices_from_volumes(args)
    return prepare_from_raw(args)


if __name__ == "__main__":
    try:
        main()
    except PrepareError as e:
        sys.exit(f"prepare_acdc: error: {e}")
