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


def _legendre_basis(n: int, degree: int) -> np.ndarray:
    """(n, degree + 1) Legendre polynomials P_0..P_degree on n points spanning [-1, 1]."""
    t = np.linspace(-1.0, 1.0, n) if n > 1 else np.zeros(1)
    return np.polynomial.legendre.legvander(t, degree).astype(np.float32)


def smooth_bias_field(shape: Sequence[int], rng: np.random.Generator, degree: int = 3,
                      max_log_amplitude: tuple[float, float] = (0.05, 0.26)) -> np.ndarray:
    """A smooth positive multiplicative field of ``shape`` (2D or 3D), values in [exp(-a), exp(a)].

    log field = sum of products of per-axis Legendre polynomials with total degree 1..``degree`` and
    standard-normal coefficients, rescaled so that its largest magnitude is ``a ~ U(max_log_amplitude)``
    (the default keeps the field within about [0.77, 1.30]). Computed as separable tensor contractions.
    """
    shape = tuple(int(s) for s in shape)
    d = degree + 1
    grids = np.indices((d,) * len(shape)).sum(axis=0)
    coeffs = rng.standard_normal((d,) * len(shape)).astype(np.float32)
    coeffs[(grids == 0) | (grids > degree)] = 0.0
    amplitude = rng.uniform(*max_log_amplitude)
    bases = [_legendre_basis(n, degree) for n in shape]
    # contract one coefficient axis at a time, last axis first, each step a C-ordered einsum (no BLAS:
    # BLAS threads cost far more than they save on these thin contractions inside loader workers)
    coef_letters, grid_letters = "abcdefgh", "stuvwxyz"[-len(shape):]
    t = coeffs
    for axis in range(len(shape) - 1, -1, -1):
        src = coef_letters[:axis + 1] + grid_letters[axis + 1:]
        dst = coef_letters[:axis] + grid_letters[axis:]
        t = np.einsum(f"{src},{grid_letters[axis]}{coef_letters[axis]}->{dst}", t, bases[axis])
    log_field = np.ascontiguousarray(t, dtype=np.float32)
    peak = float(np.abs(log_field).max())
    if peak > 0:
        log_field *= np.float32(amplitude / peak)
    return np.exp(log_field, out=log_field)


def _bias_and_gamma(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rescale to [0, 1], multiply by a smooth field, apply gamma, map back to the original range."""
    field = smooth_bias_field(image.shape, rng)
    gamma = np.float32(np.exp(rng.uniform(-0.5, 0.5)))
    lo = np.float32(image.min())
    hi = np.float32(image.max())
    span = hi - lo
    if not np.isfinite(span) or span <= 0:
        return image.copy()
    v = image - lo
    v *= np.float32(1.0) / span
    v *= field
    np.power(v, gamma, out=v)
    v *= span
    v += lo
    return v


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
    """LA strong view of a (weak) volume: with ``p_intensity`` a smooth multiplicative bias field and a
    random gamma (log gamma ~ U(-0.5, 0.5)) on intensities rescaled to [0, 1] and mapped back; with
    ``p_blur`` a Gaussian blur, sigma ~ U(0.1, 2). Shape kept, float32 out, input untouched."""
    out = np.array(image, dtype=np.float32, copy=True, order="C")
    if rng.random() < p_intensity:
        out = _bias_and_gamma(out, rng)
    if rng.random() < p_blur:
        out = _gaussian_blur(out, float(rng.uniform(0.1, 2.0)))
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
