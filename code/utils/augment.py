"""Weak and strong image perturbations (docs/METHOD.md, settings), numpy in / numpy out.

Every function takes a ``numpy.random.Generator`` and draws all its random choices from it, so the
same generator state gives the same output. Images come out float32 and C-contiguous, labels keep
their integer dtype. ``label`` may be ``None`` for unlabeled samples (the random draws are the same).

LA volumes are ``(X, Y, Z)`` with z last; the axial plane is axes (0, 1).
ACDC slices are ``(H, W)``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage


def _gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    # separable (scipy applies 1D filters axis by axis); 3 sigma covers 99.7% of the kernel mass
    return ndimage.gaussian_filter(image, sigma=sigma, truncate=3.0, mode="reflect").astype(np.float32, copy=False)


def bias_field(shape, coefficients, order: int = 3) -> np.ndarray:
    """torchio's BiasField: ``exp(sum_{a+b+c <= order} coefficient_abc x^a y^b z^c)`` with each axis's voxel
    centres normalised to [-1, 1]; the coefficients in torchio's order (x outermost, z innermost). float32."""
    axes = []
    for n in shape:
        r = np.arange(-n / 2, n / 2) + 0.5
        axes.append(r / r.max() if r.max() > 0 else r)
    c = np.zeros((order + 1,) * 3)
    powers = [(a, b, k) for a in range(order + 1) for b in range(order + 1 - a) for k in range(order + 1 - a - b)]
    for (a, b, k), value in zip(powers, coefficients, strict=True):
        c[a, b, k] = value
    vx, vy, vz = (np.vander(r, order + 1, increasing=True) for r in axes)
    return np.exp(np.einsum("abc,ia,jb,kc->ijk", c, vx, vy, vz, optimize=True)).astype(np.float32)


# ----------------------------------------------------------------------------------------------------
# LA (3D)


def _pad_to(arr: np.ndarray, patch: tuple[int, ...]) -> np.ndarray:
    pads = []
    for size, p in zip(arr.shape, patch):
        extra = max(p - size, 0)
        pads.append((extra // 2, extra - extra // 2))
    if not any(a or b for a, b in pads):
        return arr
    return np.pad(arr, pads, mode="constant", constant_values=0)


def random_crop(image: np.ndarray, label: np.ndarray | None, patch: Sequence[int],
                rng: np.random.Generator):
    """Random crop to ``patch``; axes shorter than the patch are first zero-padded symmetrically
    (image and label, constant 0). Returns C-contiguous copies."""
    image = _pad_to(image, patch)
    if label is not None:
        label = _pad_to(label, patch)
    starts = [int(rng.integers(0, s - p + 1)) for s, p in zip(image.shape, patch)]
    window = tuple(slice(s, s + p) for s, p in zip(starts, patch))
    image = np.ascontiguousarray(image[window], dtype=np.float32)
    if label is not None:
        label = np.ascontiguousarray(label[window])
    return image, label


def weak_3d(image: np.ndarray, label: np.ndarray | None, patch: Sequence[int],
            rng: np.random.Generator):
    """LA weak view: rot90 (k in 0..3) in the axial plane (axes 0, 1), flip along axis 0 or 1,
    then a random ``patch`` crop (zero padding first where the volume is smaller), as UA-MT's
    RandomRotFlip + RandomCrop. Returns ``(image float32, label or None)``, both C-contiguous.

    As in UA-MT the flip is always applied, so the orientation is one of the 4 reflections of the
    axial square (never the identity or a pure rotation)."""
    k = int(rng.integers(0, 4))
    axis = int(rng.integers(0, 2))
    image = np.flip(np.rot90(image, k, axes=(0, 1)), axis=axis)
    if label is not None:
        label = np.flip(np.rot90(label, k, axes=(0, 1)), axis=axis)
    return random_crop(image, label, patch, rng)


def strong_3d(image: np.ndarray, rng: np.random.Generator, p_intensity: float = 0.8,
              p_blur: float = 0.5) -> np.ndarray:
    """LA strong view of a (weak) volume, the release's torchio pipeline in NumPy/SciPy: with ``p_intensity``
    RandomBiasField() (20 coefficients U(-0.5, 0.5), order 3: ``bias_field``) then RandomGamma((-0.5, 0.5))
    (gamma = exp U(-0.5, 0.5), applied as sign(v) |v|^gamma where the volume has negative values, as torchio
    does); with ``p_blur`` RandomBlur((0.1, 2)) (a Gaussian with sigma U(0.1, 2) drawn per axis, scipy's
    gaussian_filter with its defaults). float32 out, the input untouched."""
    out = np.array(image, dtype=np.float32)
    if rng.random() < p_intensity:
        out *= bias_field(out.shape, rng.uniform(-0.5, 0.5, 20))
        gamma = float(np.exp(rng.uniform(-0.5, 0.5)))
        out = np.sign(out) * np.abs(out) ** gamma if out.min() < 0 else out ** gamma
    if rng.random() < p_blur:
        out = ndimage.gaussian_filter(out, rng.uniform(0.1, 2.0, 3))
    return np.ascontiguousarray(out, dtype=np.float32)


# ----------------------------------------------------------------------------------------------------
# ACDC (2D)


def weak_2d(image: np.ndarray, label: np.ndarray | None, patch: Sequence[int],
            rng: np.random.Generator):
    """ACDC weak view (SSL4MIS RandomGenerator): with p 0.5 rot90 (k in 0..3) + flip along a random
    axis, else with p 0.5 a rotation by U(-20, 20) degrees (nearest, same shape, zero fill); then zoom
    to ``patch`` with nearest-neighbour (order 0) interpolation for image and label."""
    if rng.random() > 0.5:
        k = int(rng.integers(0, 4))
        axis = int(rng.integers(0, 2))
        image = np.flip(np.rot90(image, k), axis=axis)
        if label is not None:
            label = np.flip(np.rot90(label, k), axis=axis)
    elif rng.random() > 0.5:
        angle = float(rng.uniform(-20.0, 20.0))
        image = ndimage.rotate(image, angle, order=0, reshape=False, mode="constant", cval=0.0)
        if label is not None:
            label = ndimage.rotate(label, angle, order=0, reshape=False, mode="constant", cval=0)
    factors = (patch[0] / image.shape[0], patch[1] / image.shape[1])
    image = ndimage.zoom(np.asarray(image, dtype=np.float32), factors, order=0)
    if label is not None:
        label = np.ascontiguousarray(ndimage.zoom(np.ascontiguousarray(label), factors, order=0))
    return np.ascontiguousarray(image, dtype=np.float32), label


def strong_2d(image: np.ndarray, rng: np.random.Generator, p_jitter: float = 0.8,
              p_blur: float = 0.5, strength: float = 0.5) -> np.ndarray:
    """ACDC strong view of a (weak) slice in [0, 1]: with ``p_jitter`` brightness (x U(0.5, 1.5)) and
    contrast (blend with the mean by U(0.5, 1.5)) in random order, clipped to [0, 1] after each, as
    torchvision ColorJitter does on a gray image; with ``p_blur`` a Gaussian blur, sigma ~ U(0.1, 2)."""
    out = np.array(image, dtype=np.float32, copy=True, order="C")
    if rng.random() < p_jitter:
        brightness = np.float32(rng.uniform(1.0 - strength, 1.0 + strength))
        contrast = np.float32(rng.uniform(1.0 - strength, 1.0 + strength))
        for op in rng.permutation(2):
            if op == 0:
                out *= brightness
            else:
                mean = np.float32(out.mean())
                out = contrast * out + (np.float32(1.0) - contrast) * mean
            np.clip(out, 0.0, 1.0, out=out)
    if rng.random() < p_blur:
        out = _gaussian_blur(out, float(rng.uniform(0.1, 2.0)))
    return np.ascontiguousarray(out, dtype=np.float32)
