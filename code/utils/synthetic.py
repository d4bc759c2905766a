"""Small synthetic data sets in the real LA and ACDC layouts, and in those of the other 3D data sets (BraTS2019,
Pancreas-CT, a user's own), for the demo and the tests.

``make_la`` / ``make_3d``: z-scored volumes with a smooth lobed foreground blob (label 1) brighter than the
background, an unlabeled bright tube along z as a distractor (like the aorta), a smooth intensity
variation, a multiplicative bias and noise.
``make_acdc``: short-axis-like stacks: left-ventricle blood pool (3), myocardium ring (2), right-ventricle
crescent (1), inside a body ellipse with textured background, noise; two frames per patient (ED, ES);
images min-max normalised to [0, 1] (float64), labels uint8; slices written for the training volumes.

Everything is a function of ``seed``; sizes are parameters.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage

from utils.data import Layout, case_path, write_h5
from utils.datasets import load_description


def _write_list(path: Path, names: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{n}\n" for n in names), encoding="utf-8")


def _rbf_matrix(n: int, g: int) -> np.ndarray:
    """(n, g) row-normalised Gaussian weights from g coarse nodes to n points along one axis."""
    t = np.linspace(0.0, 1.0, n)[:, None]
    c = np.linspace(0.0, 1.0, g)[None, :]
    h = 0.6 / max(g - 1, 1)
    w = np.exp(-0.5 * ((t - c) / h) ** 2)
    return w / w.sum(axis=1, keepdims=True)


def _smooth_noise(shape: Sequence[int], rng: np.random.Generator, coarse: int = 4) -> np.ndarray:
    """Smooth random field of ``shape`` with values roughly in [-1, 1]: a coarse random grid
    interpolated separably with Gaussian weights (fast tensor contractions)."""
    shape = tuple(int(s) for s in shape)
    grid = rng.uniform(-1.0, 1.0, size=(coarse,) * len(shape))
    field = grid
    for axis, n in enumerate(shape):
        # contract axis `axis` (still coarse) and put the fine axis back in its place
        field = np.moveaxis(np.tensordot(field, _rbf_matrix(n, coarse), axes=([axis], [1])), -1, axis)
    field = np.ascontiguousarray(field)
    peak = np.abs(field).max()
    return field / peak if peak > 0 else field


def _jitter_shape(shape: Sequence[int], jitter: float, rng: np.random.Generator,
                  axes: Sequence[int]) -> tuple[int, ...]:
    out = list(int(s) for s in shape)
    for a in axes:
        out[a] = max(4, int(round(out[a] * (1.0 + rng.uniform(-jitter, jitter)))))
    return tuple(out)


# ----------------------------------------------------------------------------------------------------
# LA


def _la_volume(shape: tuple[int, int, int], rng: np.random.Generator):
    X, Y, Z = shape
    x, y, z = np.meshgrid(np.arange(X, dtype=np.float64), np.arange(Y, dtype=np.float64),
                          np.arange(Z, dtype=np.float64), indexing="ij")
    size = np.array(shape, dtype=np.float64)
    center = size * rng.uniform(0.38, 0.62, size=3)
    radii = size * rng.uniform(0.18, 0.28, size=3)
    theta = rng.uniform(0, np.pi)
    c, s = np.cos(theta), np.sin(theta)
    dx, dy, dz = x - center[0], y - center[1], z - center[2]
    u, v = c * dx + s * dy, -s * dx + c * dy
    level = (u / radii[0]) ** 2 + (v / radii[1]) ** 2 + (dz / radii[2]) ** 2
    level = level + 0.45 * _smooth_noise(shape, rng, coarse=4)  # bumpy, non-ellipsoidal boundary
    fg = level < 1.0
    # one or two lobes (appendage / vein-like) attached to the main body
    for _ in range(int(rng.integers(1, 3))):
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        lc = center + direction * radii * 0.95
        lr = radii * rng.uniform(0.35, 0.55, size=3)
        fg |= ((x - lc[0]) / lr[0]) ** 2 + ((y - lc[1]) / lr[1]) ** 2 + ((z - lc[2]) / lr[2]) ** 2 < 1.0
    if fg.sum() < 8:  # degenerate draw: fall back to the plain ellipsoid core
        fg = level < 1.5
    # distractor: a bright tube along z away from the foreground (not labeled)
    tube_r = min(X, Y) * rng.uniform(0.06, 0.09)
    for _ in range(20):
        tc = np.array([X, Y]) * rng.uniform(0.12, 0.88, size=2)
        tube = (x - tc[0]) ** 2 + (y - tc[1]) ** 2 < tube_r ** 2
        if not (tube & fg).any():
            break
    else:
        tube = np.zeros(shape, dtype=bool)
    contrast = rng.uniform(0.9, 1.4)
    clean = 0.35 * _smooth_noise(shape, rng, coarse=3)
    clean[tube] += contrast * rng.uniform(0.55, 0.8)
    clean[fg] += contrast
    clean = ndimage.gaussian_filter(clean, sigma=0.8)  # partial-volume blur of the edges
    bias = 1.0 + 0.2 * _smooth_noise(shape, rng, coarse=2)
    image = (clean + 1.0) * bias + rng.normal(0.0, rng.uniform(0.25, 0.4), size=shape)
    image = (image - image.mean()) / image.std()
    return image.astype(np.float32), fg.astype(np.uint8), tube


def make_la(root, n_train: int = 4, n_test: int = 2, shape: Sequence[int] = (32, 32, 24), seed: int = 0,
            shape_jitter: float = 0.1) -> Path:
    """Write an LA-format root: ``train.list``, ``test.list``, ``2018LA_Seg_Training Set/<case>/mri_norm2.h5``.

    Case ids ``synla_000``...; ``test.list`` only when ``n_test > 0``. Volume shapes are ``shape`` with
    x and y varied by up to ``shape_jitter`` (z fixed, as in the real data). Returns the root.
    """
    return make_3d(root, "la", n_train=n_train, n_test=n_test, shape=shape, seed=seed, shape_jitter=shape_jitter)


# list entries of the synthetic cases, styled after each data set's own (code/datasets/*.json)
CASE_NAMES = {"la": "synla_{:03d}", "brats2019": "BraTS19_SYN_{:03d}_1", "pancreas": "image{:04d}",
              "custom": "case_{:03d}"}


def make_3d(root, dataset: str = "la", n_train: int = 4, n_val: int = 0, n_test: int = 2,
            shape: Sequence[int] = (32, 32, 24), seed: int = 0, shape_jitter: float = 0.1, n_classes: int = 2,
            case_file: str = "data/{case}.h5") -> Path:
    """Write a root in the layout of a 3D data set's description (``la``, ``brats2019``, ``pancreas``, or
    ``custom`` with ``case_file``): the LA-like volumes of ``_la_volume``, the description's training, validation
    (when it has one; else ``n_val`` is ignored) and test lists (when ``n_test > 0``), labels stored as the data set
    distributes them (Pancreas-CT: float32). ``n_classes`` 3 labels the distractor tube 2. Returns the root."""
    root = Path(root)
    if min(n_train, n_val, n_test) < 0 or n_train + n_val + n_test == 0:
        raise ValueError(f"need n_train, n_val, n_test >= 0 and at least one case, got {n_train}, {n_val}, {n_test}")
    if n_classes not in (2, 3):
        raise ValueError(f"n_classes {n_classes}: the synthetic volumes have 2 or 3 classes")
    desc = load_description(dataset)
    n_val = n_val if desc["val_list"] else 0
    layout = Layout(desc["case_file"] or case_file, n_classes)
    names = [CASE_NAMES[dataset].format(i + (dataset == "pancreas")) for i in range(n_train + n_val + n_test)]
    for i, name in enumerate(names):
        rng = np.random.default_rng([seed, 0x1A, i])
        vol_shape = _jitter_shape(shape, shape_jitter, rng, axes=(0, 1))
        image, label, tube = _la_volume(vol_shape, rng)
        if n_classes == 3:
            label[tube] = 2
        write_h5(case_path("la", root, name, layout), image=image,
                 label=label.astype(np.float32) if desc["float_labels"] else label)
    splits = [(desc["train_list"], names[:n_train]), (desc["val_list"], names[n_train:n_train + n_val]),
              (desc["test_list"], names[n_train + n_val:])]
    for list_name, part in splits:
        if list_name and part:
            _write_list(root / list_name, part)
    return root


# ----------------------------------------------------------------------------------------------------
# ACDC


def _disc(yy, xx, cy, cx, ry, rx, angle):
    c, s = np.cos(angle), np.sin(angle)
    u = c * (yy - cy) + s * (xx - cx)
    v = -s * (yy - cy) + c * (xx - cx)
    return (u / ry) ** 2 + (v / rx) ** 2 < 1.0


def _acdc_patient(shape: tuple[int, int, int], rng: np.random.Generator):
    """Two frames (ED, ES) of one synthetic patient: list of (image float64 [0,1], label uint8)."""
    D, H, W = shape
    size = min(H, W)
    yy, xx = np.meshgrid(np.arange(H, dtype=np.float64), np.arange(W, dtype=np.float64), indexing="ij")
    cy, cx = H * rng.uniform(0.42, 0.58), W * rng.uniform(0.42, 0.58)
    r_lv = size * rng.uniform(0.09, 0.13)
    thick = size * rng.uniform(0.035, 0.055)
    ecc = rng.uniform(0.85, 1.15)
    rot = rng.uniform(0, np.pi)
    rv_dir = rng.uniform(0.75, 1.25) * np.pi      # RV on the left-ish side
    rv_scale = rng.uniform(1.0, 1.35)
    drift = rng.normal(0.0, size * 0.01, size=2)   # slice-to-slice drift of the centre
    body_ry, body_rx = H * rng.uniform(0.38, 0.46), W * rng.uniform(0.40, 0.48)
    texture = _smooth_noise((H, W), rng, coarse=6)
    levels = {"bg": rng.uniform(0.1, 0.2), "lv": rng.uniform(0.7, 0.9), "rv": rng.uniform(0.6, 0.8),
              "myo": rng.uniform(0.36, 0.46)}
    frames = []
    for frame, (lv_f, myo_f) in enumerate([(1.0, 1.0), (rng.uniform(0.6, 0.75), rng.uniform(1.2, 1.45))]):
        image = np.zeros(shape)
        label = np.zeros(shape, dtype=np.uint8)
        for k in range(D):
            t = k / max(D - 1, 1)                      # 0 base .. 1 apex
            taper = 1.0 - 0.55 * t ** 1.5
            scy, scx = cy + drift[0] * k, cx + drift[1] * k
            rl = max(r_lv * lv_f * taper, 1.0)
            rm = rl + max(thick * myo_f * (1.0 - 0.3 * t), 1.0)
            lv = _disc(yy, xx, scy, scx, rl * ecc, rl / ecc, rot)
            heart = _disc(yy, xx, scy, scx, rm * ecc, rm / ecc, rot)
            myo = heart & ~lv
            rv = np.zeros_like(lv)
            if t < 0.85 or rng.random() < 0.5:          # RV sometimes missing near the apex
                rr = rm * rv_scale * (1.0 - 0.35 * t) * (lv_f if frame else 1.0) ** 0.5
                ry = scy + np.sin(rv_dir) * rm * 0.95
                rx = scx + np.cos(rv_dir) * rm * 0.95
                rv = _disc(yy, xx, ry, rx, rr * 1.1, rr * 0.8, rv_dir) & ~ndimage.binary_dilation(heart, iterations=2)
            body = _disc(yy, xx, H / 2, W / 2, body_ry, body_rx, 0.0)
            img = np.where(body, levels["bg"] + 0.08 * texture, 0.02)
            img[rv] = levels["rv"]
            img[myo] = levels["myo"]
            img[lv] = levels["lv"]
            img = ndimage.gaussian_filter(img, 0.7) + rng.normal(0.0, rng.uniform(0.03, 0.06), size=(H, W))
            image[k] = img
            label[k][rv] = 1
            label[k][myo] = 2
            label[k][lv] = 3
        image = np.clip(image, 0.0, None)
        image = (image - image.min()) / (image.max() - image.min())
        frames.append((image.astype(np.float64), label))
    return frames


def make_acdc(root, n_train_patients: int = 3, n_val: int = 1, n_test: int = 1,
              shape: Sequence[int] = (6, 48, 48), seed: int = 0, shape_jitter: float = 0.1) -> Path:
    """Write an ACDC-format root: ``data/patientXXX_frame0{1,2}.h5`` (image (D,H,W) float64 in [0, 1],
    label uint8 0..3), ``data/slices/<volume>_slice_<k>.h5`` (k from 1, slice k = volume[k - 1]) for the
    training volumes, ``train_slices.list``, ``train.list``, ``val.list``, ``test.list``.

    Patients are numbered from 1: training first, then validation, then test; ``n_val`` / ``n_test``
    count patients (two volumes each, as in the real lists); a split without patients gets no list.
    H and W vary per patient by up to
    ``shape_jitter``. Returns the root.
    """
    root = Path(root)
    counts = (n_train_patients, n_val, n_test)
    if min(counts) < 0 or n_train_patients == 0:
        raise ValueError(f"need at least one training patient and no negative counts, got {counts}")
    lists = {"train": [], "val": [], "test": []}
    slice_names = []
    pid = 0
    for split, n in zip(("train", "val", "test"), counts):
        for _ in range(n):
            pid += 1
            rng = np.random.default_rng([seed, 0xACDC, pid])
            vol_shape = _jitter_shape(shape, shape_jitter, rng, axes=(1, 2))
            for f, (image, label) in enumerate(_acdc_patient(vol_shape, rng), start=1):
                vol = f"patient{pid:03d}_frame{f:02d}"
                write_h5(case_path("acdc", root, vol), image=image, label=label)
                lists[split].append(vol)
                if split == "train":
                    for k in range(1, image.shape[0] + 1):
                        name = f"{vol}_slice_{k}"
                        write_h5(case_path("acdc", root, name), image=image[k - 1], label=label[k - 1])
                        slice_names.append(name)
    _write_list(root / "train_slices.list", slice_names)
    for split, names in lists.items():
        if names:  # no empty lists: a split without patients has no list, as test.list in the shared data
            _write_list(root / f"{split}.list", names)
    return root
